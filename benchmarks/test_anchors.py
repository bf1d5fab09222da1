"""The anchor adapters (anchors.py) against reference.py on one tiny shape, forward and backward.

Liger's fused MoE and moe-ops run in Triton's interpreter without a GPU, so this checks on CPU
what the layer benchmark will time on a GPU: the weight layout, the routing inputs and every
gradient (x, both expert weights, the router through the routing weights). The packages are not
installed in CI; their tests skip there. The skip reasons of the benchmark need no package.
"""

import pytest
import torch

from . import anchors, harness
from .configs import ShapeConfig

# Small enough for the interpreter (a few seconds per anchor on 2 cores), with every expert busy
# (64 rows over 4 experts) and H, F not multiples of one another, so a transposed weight fails.
CFG = ShapeConfig("anchor-check", T=32, H=48, F=16, E=4, k=2)
ADAPTED = ("liger_kernel", "moe_ops")


@pytest.mark.parametrize("name", ADAPTED)
def test_adapter_matches_reference(name):
    pytest.importorskip(name)
    moe = harness.make_moe(CFG)  # no LoRA: the router and both expert weights train
    x = harness.make_inputs(CFG, requires_grad=True)[0]
    dy = torch.randn_like(x)
    y_ref, dx_ref = harness.oracle_layer(moe, x, dy)

    y = anchors.adapter(name, moe)(x)
    harness.check_close(f"{name} y", y, y_ref)
    y.backward(dy)
    harness.check_close(f"{name} dx", x.grad, dx_ref)

    # Parameter gradients: the package's torch path (reference.py) on a copy of the same weights.
    ref = harness.twin(moe, CFG, "torch")
    ref(x.detach()).backward(dy)
    trained = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert trained == ["router.weight", "experts.gate_up_proj", "experts.down_proj"]
    for (pname, got), want in zip(moe.named_parameters(), ref.parameters()):
        harness.check_close(f"{name} d{pname}", got.grad, want.grad)


def test_skip_reasons_need_no_package():
    lora = harness.make_moe(ShapeConfig("lora", T=8, H=16, F=8, E=4, k=2, r=4))
    assert "no LoRA" in anchors.unsupported("liger_kernel", lora)
    assert "no LoRA" in anchors.unsupported("moe_ops", lora)
    odd = harness.make_moe(ShapeConfig("odd-e", T=8, H=16, F=8, E=6, k=2))
    assert "power-of-two" in anchors.unsupported("moe_ops", odd)
    assert anchors.unsupported("liger_kernel", odd) is None
    gelu = harness.make_moe(ShapeConfig("gelu", T=8, H=16, F=8, E=4, k=2, activation="gelu"))
    assert "SwiGLU only" in anchors.unsupported("liger_kernel", gelu)
    assert isinstance(anchors.provider("scattermoe", gelu), str)
    with pytest.raises(ValueError, match="anchor must be one of"):
        anchors.provider("nonesuch", gelu)
    with pytest.raises(ValueError, match="no LoRA"):
        anchors.adapter("moe_ops", lora)
