"""State <-> files: tree structure, safetensors data, the commit record, step names."""
