"""The package's public names: imported on first use, each typed for checkers."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import checkpointing
from checkpointing import errors


def test_every_public_name_resolves_and_is_declared_for_type_checkers() -> None:
    source = ast.parse(Path(checkpointing.__file__).read_text())
    declared = {
        alias.asname or alias.name
        for node in ast.walk(source)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("checkpointing")
        for alias in node.names
    }
    assert declared == set(checkpointing.__all__)
    for name in checkpointing.__all__:
        value = getattr(checkpointing, name)
        assert getattr(value, "__name__", name) == name
    assert "CheckpointManager" in dir(checkpointing)


def test_errors_and_options_import_without_torch() -> None:
    probe = (
        "import sys; sys.modules['torch'] = None\n"
        "from checkpointing import CheckpointError, CheckpointManagerOptions, KeepLatest\n"
        "CheckpointManagerOptions(max_to_keep=KeepLatest(2).n)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("url", "module", "extra"), [("s3://b/r", "s3fs", "s3"), ("gs://b/r", "gcsfs", "gcs")]
)
def test_a_missing_extra_is_named(url: str, module: str, extra: str) -> None:
    probe = (
        f"import sys; sys.modules[{module!r}] = None  # not installed\n"
        "from checkpointing import CheckpointManager, InvalidOptionError\n"
        f"try:\n    CheckpointManager({url!r})\n"
        "except InvalidOptionError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert f"pip install 'torch-checkpoint-manager[{extra}]'" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- docstrings
#
# The API reference (docs/api.md) is rendered from the docstrings, so every public name
# and public method must carry a Google-style docstring:
#   - a non-empty docstring, for classes, functions, methods and properties alike;
#   - ``Args:`` naming every parameter (``*args``/``**kwargs`` with their stars). For a
#     class, the constructor's parameters go in the class docstring (or its __init__'s),
#     and an ``Attributes:`` section documenting the fields counts (dataclasses);
#   - ``Returns:`` or ``Yields:`` unless the return annotation is None;
#   - ``Raises:`` naming each typed error (a CheckpointError subclass) the body raises
#     itself, InvalidOptionError excepted (a bad argument is a bug to fix, not an error to
#     handle); every ``Raises:`` entry is a real exception class;
#   - no ``Args:`` entry that is not a parameter (it would be stale).
# Exemptions: a Protocol has no constructor to document; exceptions need only a docstring.
# A method implementing the same method (same parameter names) of a base class in its MRO
# or of a public Protocol whose methods its class has, documented completely there, needs
# only a one-line docstring of its own: its Args/Returns are the protocol's.

_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+)(?: \([^)]*\))?:(?:\s|$)")


def _sections(doc: str) -> dict[str, list[str]]:
    """A cleaned docstring's Google sections: title -> the names its entries define
    (for Args, Attributes, Raises) or its lines (for the others)."""
    sections: dict[str, list[str]] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        header = _SECTION.match(lines[i])
        i += 1
        if header is None:
            continue
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
            body.append(lines[i])
            i += 1
        text = [line for line in body if line.strip()]
        if header.group(1) in ("Args", "Arguments", "Attributes", "Raises"):
            indent = min((len(line) - len(line.lstrip()) for line in text), default=0)
            found = (_ENTRY.match(line[indent:]) for line in text if not line[indent].isspace())
            text = [m.group(1) for m in found if m]
        sections[header.group(1)] = text
    return sections


def _own_doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):  # else it made one up:
        made_up = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        doc = "" if doc == made_up else doc
    return inspect.cleandoc(doc)


def _param_names(sig: inspect.Signature) -> list[str]:
    stars: dict[Any, str] = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    return [
        stars.get(p.kind, "") + p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
    ]


def _returns_something(sig: inspect.Signature) -> bool:
    return sig.return_annotation not in (None, "None", inspect.Signature.empty)


def _raised_typed_errors(fn: Any) -> set[str]:
    """The CheckpointError subclasses ``fn``'s own body raises (InvalidOptionError aside)."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    except (OSError, TypeError):
        return set()
    raised: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = getattr(exc, "id", None) or getattr(exc, "attr", None)  # X or errors.X
            kind = getattr(errors, name, None) if isinstance(name, str) else None
            if isinstance(kind, type) and issubclass(kind, errors.CheckpointError):
                assert isinstance(name, str)
                raised.add(name)
    return raised - {"InvalidOptionError"}


def _raises_problems(doc: str, raised: set[str]) -> list[str]:
    documented = _sections(doc).get("Raises", [])
    problems = [f"Raises: {name} undocumented" for name in sorted(raised - set(documented))]
    for name in documented:
        kind = getattr(errors, name, None) or getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            problems.append(f"Raises: {name} is not an exception class")
    return problems


def _callable_problems(fn: Any) -> list[str]:
    """What ``fn``'s own docstring lacks for its own signature (empty: complete)."""
    doc = _own_doc(fn)
    if not doc:
        return ["no docstring"]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    sections = _sections(doc)
    params = _param_names(sig)
    args = sections.get("Args", []) + sections.get("Arguments", [])
    problems = [f"Args: {p} undocumented" for p in params if p not in args]
    problems += [f"Args: {a} is not a parameter" for a in args if a not in params]
    if _returns_something(sig) and not (sections.get("Returns") or sections.get("Yields")):
        problems.append("no Returns/Yields")
    return problems + _raises_problems(doc, _raised_typed_errors(fn))


def _is_protocol(cls: type) -> bool:
    return typing.Protocol in cls.__bases__


def _methods(cls: type) -> dict[str, Any]:
    """Public methods and properties of ``cls``, with those it inherits (but not from
    builtins or typing), each name's resolved attribute."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass.__module__ in ("builtins", "typing"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in found:
                continue
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                found[name] = value
    return found


def _documented_elsewhere(cls: type, name: str, member: Any, protocols: list[type]) -> bool:
    """Whether ``member`` (``cls.name``) implements a completely documented method or
    property of the same name and parameters: a base class's, or one of ``protocols``
    whose methods ``cls`` all has."""

    def same_shape(other: Any) -> bool:
        if isinstance(member, property) or isinstance(other, property):
            return isinstance(member, property) and isinstance(other, property)
        if not inspect.isfunction(other):
            return False
        return _param_names(inspect.signature(other)) == _param_names(inspect.signature(member))

    candidates = [vars(base)[name] for base in cls.__mro__[1:] if name in vars(base)]
    for protocol in protocols:
        methods = {n for n, v in vars(protocol).items() if inspect.isfunction(v) and n[0] != "_"}
        if protocol is not cls and name in vars(protocol) and all(hasattr(cls, m) for m in methods):
            candidates.append(vars(protocol)[name])
    return any(same_shape(c) and not _member_problems(c) for c in candidates)


def _member_problems(member: Any) -> list[str]:
    if isinstance(member, property):
        return [] if _own_doc(member.fget) else ["no docstring"]
    return _callable_problems(member)


def _class_problems(cls: type, protocols: list[type]) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    doc = _own_doc(cls)
    if not doc:
        problems[cls.__name__] = ["no docstring"]
    if issubclass(cls, BaseException):
        return problems
    if not _is_protocol(cls):
        init = vars(cls).get("__init__")
        docs = [doc, _own_doc(init) if init else ""]
        documented = {
            name
            for d in docs
            for title in ("Args", "Arguments", "Attributes")
            for name in _sections(d).get(title, [])
        }
        try:
            params = _param_names(inspect.signature(cls))
        except (TypeError, ValueError):
            params = []
        missing = [f"Args/Attributes: {p} undocumented" for p in params if p not in documented]
        setup = [vars(cls)[n] for n in ("__init__", "__post_init__") if n in vars(cls)]
        raised = set().union(*map(_raised_typed_errors, setup))
        missing += _raises_problems("\n".join(docs), raised)
        if missing:
            problems.setdefault(cls.__name__, []).extend(missing)
    for name, member in _methods(cls).items():
        own = _member_problems(member)
        if not own:
            continue
        if _own_doc(getattr(member, "fget", member)) and _documented_elsewhere(
            cls, name, member, protocols
        ):
            continue  # one line of its own, the rest inherited
        problems[f"{cls.__name__}.{name}"] = own
    return problems


def _api_problems(names: list[str], namespace: Any) -> dict[str, list[str]]:
    """What the docstrings of ``namespace``'s public ``names`` lack, by qualified name."""
    values = [getattr(namespace, name) for name in names]
    protocols = [v for v in values if isinstance(v, type) and _is_protocol(v)]
    problems: dict[str, list[str]] = {}
    for name, value in zip(names, values, strict=True):
        if isinstance(value, type):
            problems.update(_class_problems(value, protocols))
        elif callable(value):
            found = _callable_problems(value)
            if found:
                problems[name] = found
    return problems


def test_every_public_name_and_method_has_a_complete_docstring() -> None:
    problems = _api_problems(checkpointing.__all__, checkpointing)
    report = "\n".join(f"{name}: {', '.join(found)}" for name, found in sorted(problems.items()))
    assert not problems, f"public API without complete docstrings (rules above):\n{report}"


class _Shape(typing.Protocol):
    """A protocol of the fixture below."""

    def area(self, scale: float) -> float:
        """The area.

        Args:
            scale: A factor.

        Returns:
            The scaled area.
        """
        ...


class _Square:
    """Implements `_Shape` with one-line docstrings: fine."""

    def area(self, scale: float) -> float:
        """The side squared (see `_Shape.area`)."""
        return scale

    def _helper(self) -> int:  # private: not checked
        return 0


class _Circle:
    """Implements `_Shape.area` under another parameter name: not exempt."""

    def area(self, factor: float) -> float:
        """Pi r squared."""
        return factor


class _Base:
    """A base class with a documented method."""

    def run(self, n: int) -> None:
        """Run.

        Args:
            n: How often.
        """


class _Child(_Base):
    """Overrides `run` with a one-line docstring: fine."""

    def run(self, n: int) -> None:
        """Run faster."""

    @property
    def size(self) -> int:
        return 0


@dataclasses.dataclass
class _Undocumented:
    z: int = 0


@dataclasses.dataclass
class _Point:
    """A value class.

    Attributes:
        x: Across.
    """

    x: int
    y: int


def _no_args(x: int) -> int:
    """Lacks Args and Returns.

    Raises:
        InvalidOptionError: Not raised here, but a real class.
        NoSuchError: Not an exception class.
    """
    if x < 0:
        raise errors.StepOrderError("undocumented")
    raise errors.InvalidOptionError("exempt: a bug to fix")


def _stale(x: int) -> Iterator[int]:
    """Documents a parameter it does not have.

    Args:
        x: A number.
        y: Gone.

    Yields:
        Numbers.
    """
    yield x


def _star_args(*items: int, **options: Callable[[], None]) -> None:
    """Names its variadic parameters with their stars.

    Args:
        *items: Items.
        **options: Options.
    """


def test_the_docstring_rules_and_their_exemptions() -> None:
    names = ["_Shape", "_Square", "_Circle", "_Child", "_Point", "_Undocumented"]
    names += ["_no_args", "_stale", "_star_args"]
    problems = _api_problems(names, sys.modules[__name__])
    assert problems == {
        "_Circle.area": ["Args: factor undocumented", "no Returns/Yields"],
        "_Child.size": ["no docstring"],
        "_Point": ["Args/Attributes: y undocumented"],
        "_Undocumented": ["no docstring", "Args/Attributes: z undocumented"],
        "_no_args": [
            "Args: x undocumented",
            "no Returns/Yields",
            "Raises: StepOrderError undocumented",
            "Raises: NoSuchError is not an exception class",
        ],
        "_stale": ["Args: y is not a parameter"],
    }


def test_the_api_reference_renders_every_public_name() -> None:
    page = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    rendered = set(re.findall(r"^::: checkpointing\.(?:\w+\.)*(\w+)$", page, re.M))
    for members in re.findall(r"^\s+members: \[(.*)\]$", page, re.M):
        rendered.update(name.strip() for name in members.split(","))
    if "errors" in rendered:  # the whole module
        rendered.update(n for n, v in vars(errors).items() if isinstance(v, type))
    assert sorted(set(checkpointing.__all__) - rendered) == []
