"""The README's example runs as written (docs that are true)."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 10, 256)
    assert namespace["layer"].weight.grad is None and namespace["layer"].lora_A.weight.grad is not None
