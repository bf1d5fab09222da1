"""The README's usage example runs as written."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    y, x = namespace["y"], namespace["x"]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert namespace["moe"].experts.lora_A_gate_up.grad is not None
    assert namespace["y16"].dtype == torch.bfloat16  # the autocast lines: bf16 out of fp32 parameters
