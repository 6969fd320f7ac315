"""Every ``python`` snippet of the README and the docs runs, so the docs stay true.

A page's snippets run in order in one fresh interpreter, as a reader follows the page,
after a prelude that gives them what a reader already has (a model, an optimizer, the
trainer objects of an adapter's section). The object stores the snippets name
(``s3://bucket``, ``gs://bucket``, a MinIO endpoint) are the loopback servers of this
folder's conftest, reached through the clients' own environment variables; the snippets
are otherwise run as written but for the few changes in `SUBSTITUTIONS`. The quickstart
has its own test (tests/test_docs.py: run twice, output checked).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import S3_KEY, S3_REGION, S3_SECRET, Server, gcs_options, s3_options

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATE = {"adapters.md"}  # independent sections: each snippet runs alone
NOT_HERE = {"quickstart.md"}

# What the test cannot do as the reader would: write to /nvme, wait an hour, reach MinIO.
SUBSTITUTIONS = {
    '"/nvme/': '"nvme/',
    '"/shared/': '"shared/',
    '"/ckpt/': '"ckpt/',
    "timeout=3600": "timeout=1",
}

TRAINING = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
sched = scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
state = {"model": model, "optimizer": opt}
start, num_steps, steps, loss = 0, 3, 3, 0.5
from checkpointing import CheckpointManager, CheckpointManagerOptions
"""

ACCELERATE = """
import torch
from accelerate import Accelerator
from checkpointing import CheckpointManagerOptions
accelerator = Accelerator(cpu=True)
data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
model, optimizer, train_loader, scheduler = accelerator.prepare(
    model, optimizer, torch.utils.data.DataLoader(data, batch_size=2), scheduler)
opts = CheckpointManagerOptions(save_interval_steps=2)
def compute_loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
"""

LIGHTNING = """
import torch
import lightning.pytorch as pl

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Data(pl.LightningDataModule):
    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
        return torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)

model, datamodule = Net(), Data()
"""

HF_TRAINER = """
import torch

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return {"x": torch.ones(4) * i, "labels": torch.zeros(2)}

model, train_dataset = Model(), Data()
"""

# A snippet that imports one of these adapters gets its trainer's objects instead.
PRELUDES = {
    "trainer_adapters.accelerate": ACCELERATE,
    "trainer_adapters.lightning": LIGHTNING,
    "trainer_adapters.hf_trainer": HF_TRAINER,
}
# Trainer libraries whose pins clash with this environment: their sections run in the
# library's own environment (tests/adapters/<dir>/test_doc_snippet.py).
SIDE_ENVIRONMENTS = {"trainer_adapters.robo_orchard", "trainer_adapters.helios"}


def snippets(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), re.M | re.S)


def programs() -> list[tuple[str, str]]:
    """(id, program) for each page, or each snippet of a page of separate sections."""
    found: list[tuple[str, str]] = []
    for page in PAGES:
        blocks = [b for b in snippets(page) if not _imports(b) & SIDE_ENVIRONMENTS]
        if page.name in NOT_HERE or not blocks:
            continue
        groups = [[b] for b in blocks] if page.name in SEPARATE else [blocks]
        for i, group in enumerate(groups):
            adapters = set().union(*map(_imports, group)) & PRELUDES.keys()
            prelude = PRELUDES[adapters.pop()] if adapters else TRAINING
            code = "\n".join(group)
            for old, new in SUBSTITUTIONS.items():
                code = code.replace(old, new)
            name = page.name if len(groups) == 1 else f"{page.name}[{i}]"
            found.append((name, prelude + "\n" + code))
    return found


def _imports(snippet: str) -> set[str]:
    return set(re.findall(r"^\s*from (trainer_adapters\.\w+) import", snippet, re.M))


def test_the_pages_have_snippets_to_run() -> None:
    names = [name for name, _ in programs()]
    assert {"README.md", "remote.md", "distributed.md", "retention.md"} <= set(names)
    assert sum(name.startswith("adapters.md") for name in names) == 3  # Accelerate, Lightning, HF


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "program"), programs(), ids=[n for n, _ in programs()])
def test_snippet_runs(
    name: str, program: str, tmp_path: Path, s3_server: Server, gcs_server: Server
) -> None:
    for fs in (
        fsspec.filesystem("s3", **s3_options(s3_server.url)),
        fsspec.filesystem("gs", **gcs_options(gcs_server.url)),
    ):
        if not fs.exists("bucket"):  # the buckets the docs name, made once per session
            if fs.protocol[0] == "s3":
                fs.call_s3("create_bucket", Bucket="bucket")
            else:
                fs.mkdir("bucket")
    for prefix in ("bucket/run1", "bucket/run1-mirror"):  # each page starts afresh
        for fs in (
            fsspec.filesystem("s3", **s3_options(s3_server.url)),
            fsspec.filesystem("gs", **gcs_options(gcs_server.url)),
        ):
            if fs.exists(prefix):
                fs.rm(prefix, recursive=True)
    program = program.replace("http://minio:9000", s3_server.url)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server.url,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "STORAGE_EMULATOR_HOST": gcs_server.url,
        "PYTHONPATH": str(ROOT),
        # A single-process job for distributed.md's init_process_group (torchrun's variables).
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=500,
    )
    assert run.returncode == 0, f"{name}:\n{program}\n{run.stdout}\n{run.stderr}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
