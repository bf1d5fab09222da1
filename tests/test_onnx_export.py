"""ONNX export of tiny transformers MoE models whose experts run on this package ("unimoe" and
patch_moe), through transformers' own OnnxExporter, run on ONNX Runtime.

The oracle is the same model's eager experts (transformers' loop) in torch: the exported graph run
by ONNX Runtime must give its logits, at the traced sequence length and, exported with a dynamic
sequence axis, at two others. While exporting, both doors take the plain-aten experts forward
(integrations/export.py), so the ONNX graph holds no node of this package's ops; the export with
transformers' "grouped_mm" is the bar it is held to (the same tolerance; that export works, see
test_grouped_mm_exports_too).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
for _name in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name)
exporter_onnx = pytest.importorskip("transformers.exporters.exporter_onnx")

from tiny_hf import FAMILIES, model, tokens  # noqa: E402
from tolerance import TOL  # noqa: E402

from unimoe_kernels.integrations import experts_interface  # noqa: E402
from unimoe_kernels.integrations import transformers as hf  # noqa: E402  (registers "unimoe")

FP32 = TOL[torch.float32]


def _export(m, ids, dynamic: bool):
    """transformers' OnnxExporter on m at ids; a dynamic export marks the sequence axis only (every
    axis Dim.AUTO is several times slower to trace)."""
    shapes = {"input_ids": {1: torch.export.Dim("seq", min=2, max=32)}} if dynamic else None
    config = exporter_onnx.OnnxConfig(dynamic_shapes=shapes)
    return exporter_onnx.OnnxExporter().export(m, {"input_ids": ids}, config)


def _check(exported, ref, lengths):
    """Logits of ONNX Runtime equal ref's eager logits at each sequence length; the graph holds no
    op of this package's domain."""
    domains = {node.domain for node in exported.program.graph.all_nodes()}
    assert not any("unimoe" in d for d in domains), domains
    for n in lengths:
        ids = tokens(seq=n)
        got = exported(input_ids=ids).logits
        torch.testing.assert_close(torch.as_tensor(got), ref(ids, use_cache=False).logits, **FP32)


def _reference(family):
    ref = model(family)
    ref.set_experts_implementation("eager")
    return ref


@pytest.fixture
def exports_plainly(monkeypatch):
    """Counts the plain-aten experts calls (export.experts_forward_aten through either door)."""
    calls = []
    for module in (experts_interface, hf):
        real = module.experts_forward_aten
        spy = lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(module, "experts_forward_aten", spy)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_unimoe_exports_with_a_dynamic_sequence_axis(family, exports_plainly):
    ref = _reference(family)
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("unimoe")
    exported = _export(ours, tokens(), dynamic=True)
    assert exports_plainly  # each MoE layer traced through the plain-aten forward
    assert ours.config._experts_implementation == "unimoe"  # the exporter leaves it as it was
    _check(exported, ref, (7, 3, 12))


def test_unimoe_exports_with_static_shapes(exports_plainly):
    ref = _reference("qwen3_moe")
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("unimoe")
    _check(_export(ours, tokens(), dynamic=False), ref, (7,))
    assert exports_plainly


@pytest.mark.parametrize("family,lora_rank", [("olmoe", 0), ("mixtral", 2)])
def test_patch_moe_exports(family, lora_rank, exports_plainly):
    """PatchedExperts, also with its own LoRA (random B: the adapter changes the function; the
    reference is eager on the merged weights W + s B A)."""
    ref = _reference(family)
    ours = copy.deepcopy(ref)
    assert hf.patch_moe(ours, lora_rank=lora_rank) == 2
    if lora_rank:
        with torch.no_grad():
            for m in hf.patched_experts(ours).values():
                m.lora_B_gate_up.normal_(0.0, 0.3)
                m.lora_B_down.normal_(0.0, 0.3)
            for layer, m in zip(ref.model.layers, hf.patched_experts(ours).values()):
                gu, d = m.merged_weights()
                layer.mlp.experts.gate_up_proj.copy_(gu)
                layer.mlp.experts.down_proj.copy_(d)
    _check(_export(ours, tokens(), dynamic=False), ref, (7,))
    assert len(exports_plainly) == 2


def test_grouped_mm_exports_too():
    """The bar: transformers' own grouped_mm experts export and match eager at the same tolerance."""
    ref = _reference("mixtral")
    theirs = copy.deepcopy(ref)
    theirs.set_experts_implementation("grouped_mm")
    _check(_export(theirs, tokens(), dynamic=False), ref, (7,))
