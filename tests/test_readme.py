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
    y, x, moe, aux = namespace["y"], namespace["x"], namespace["moe"], namespace["aux"]
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert int(aux.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * moe.top_k
    # What the example's comments say: LoRA A/B and the router train, the base experts are frozen.
    assert moe.experts.lora_A_gate_up.grad is not None and moe.experts.lora_B_gate_up.grad.abs().sum() > 0
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad is None and moe.experts.down_proj.grad is None
    assert namespace["y16"].dtype == torch.bfloat16  # the autocast lines: bf16 out of fp32 parameters
