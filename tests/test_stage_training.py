"""Staged training of the reference Uni-MoE with moe_every=2 (dense and MoE layers alternate): which
layers convert in stages 2 and 3, and, step by step, exactly which parameters each stage changes.
Everything else must stay bit-identical, the dense layers between the MoE layers included.

The expected sets are written here from the stage descriptions of models/unimoe.py (by parameter
name), not read from setup_stage: stage 0 the LLM; stage 1 encoders and connectors; stage 2 the
modality FFN copies of the MoE layers, at each step only those of that step's modality; stage 3
the routers and expert LoRA of the MoE layers.
"""

from __future__ import annotations

import re

import pytest
import torch

from unimoe_kernels.models import synthetic_data as sd
from unimoe_kernels.models import training as T
from unimoe_kernels.models.unimoe import ModalityFFNs, SwiGLUMLP, UniMoE, preset_config
from unimoe_kernels.modules import SparseMoE

LAYERS, MOE_EVERY = 4, 2
MOE = (1, 3)  # layer i is MoE iff (i + 1) % moe_every == 0
STEPS = {0: 1, 1: 1, 2: len(sd.MODALITIES), 3: 2}  # stage 2: one step per modality (round-robin)
LLM = ("embed_tokens.", "layers.", "norm.", "lm_head.")
MEDIA = ("vision_connector.", "audio_connector.", "image_encoder.", "audio_encoder.")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def run():
    """A micro model with 4 layers taken through one short run of every stage: per stage the
    trainable names setup_stage chose, the layer types, and the names changed by each step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; see conftest.one_thread
    try:
        torch.manual_seed(0)
        model = UniMoE(preset_config("micro", num_layers=LAYERS, moe_every=MOE_EVERY))
        out = {"select_layer": model.image_encoder.select_layer, "vit_layers": len(model.image_encoder.blocks)}
        for stage in range(4):
            ids = {id(p) for p in model.setup_stage(stage)}
            trainable = {n for n, p in model.named_parameters() if id(p) in ids}
            snaps = [_snapshot(model)]
            T.train_stage(model, stage, STEPS[stage], batch_size=8, lr=1e-2, seed=0,
                          on_step=lambda step, loss: snaps.append(_snapshot(model)))
            changed = [{n for n in a if not torch.equal(a[n], b[n])} for a, b in zip(snaps, snaps[1:])]
            out[stage] = {"trainable": trainable, "changed": changed, "all": set(snaps[0]),
                          "mlp": [type(layer.mlp) for layer in model.layers], "moes": len(model.sparse_moes())}
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("moe_every,layers", [(1, 3), (2, 4), (2, 5), (3, 6)])
def test_moe_layers_are_every_moe_every_th(moe_every, layers):
    cfg = preset_config("micro", num_layers=layers, moe_every=moe_every)
    model = UniMoE(cfg)
    want = [(i + 1) % moe_every == 0 for i in range(layers)]
    assert [cfg.is_moe_layer(i) for i in range(layers)] == want
    assert [layer.is_moe for layer in model.layers] == want
    assert model.moe_layers() == [layer for layer, m in zip(model.layers, want) if m]


def test_dense_and_moe_layers_alternate_through_the_stages(run):
    dense = [i for i in range(LAYERS) if i not in MOE]
    assert [i for i in range(LAYERS) if (i + 1) % MOE_EVERY == 0] == list(MOE)
    for stage, kind in ((0, SwiGLUMLP), (1, SwiGLUMLP), (2, ModalityFFNs), (3, SparseMoE)):
        mlp = run[stage]["mlp"]
        assert all(mlp[i] is SwiGLUMLP for i in dense), (stage, mlp)
        assert all(mlp[i] is kind for i in MOE), (stage, mlp)
    assert run[3]["moes"] == len(MOE)


def _matching(names, *patterns):
    return {n for n in names if any(re.fullmatch(p, n) for p in patterns)}


def _moe(pattern: str) -> str:
    return rf"layers\.({'|'.join(map(str, MOE))})\.mlp\." + pattern


def _expected(run, stage: int):
    """(names the stage may train, names changed by each of its steps)."""
    names = run[stage]["all"]
    if stage == 0:
        want = {n for n in names if n.startswith(LLM)}
        return want, [want] * STEPS[0]
    if stage == 1:
        # The image encoder stops after block select_layer: the blocks after it never run, so
        # nothing trains them (they are kept only so that a pretrained encoder's weights fit).
        idle = {n for n in names for j in range(run["select_layer"] + 1, run["vit_layers"])
                if n.startswith(f"image_encoder.blocks.{j}.")}
        named = {n for n in names if n.startswith(MEDIA)}
        return named, [named - idle] * STEPS[1]
    if stage == 2:
        per_step = [_matching(names, _moe(rf"ffns\.{s % len(sd.MODALITIES)}\..*")) for s in range(STEPS[2])]
        return _matching(names, _moe(r"ffns\..*")), per_step
    router, lora_b, lora_a = _moe(r"router\.weight"), _moe(r"experts\.lora_B_\w+"), _moe(r"experts\.lora_A_\w+")
    # LoRA B starts at zero, so A's first gradient is zero and AdamW leaves it unchanged.
    return _matching(names, router, lora_a, lora_b), [_matching(names, router, lora_b),
                                                      _matching(names, router, lora_a, lora_b)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_step_changes_exactly_the_stages_parameters(run, stage):
    named, per_step = _expected(run, stage)
    assert run[stage]["trainable"] == named
    assert len(run[stage]["changed"]) == len(per_step) == STEPS[stage]
    for step, (got, want) in enumerate(zip(run[stage]["changed"], per_step)):
        assert want and got == want, (f"stage {stage} step {step}: changed but should not "
                                      f"{sorted(got - want)[:6]}, unchanged but should {sorted(want - got)[:6]}")
    dense = "|".join(str(i) for i in range(LAYERS) if i not in MOE)
    dense_ffns = {n for n in run[stage]["all"] if re.match(rf"layers\.({dense})\.mlp\.", n)}
    assert dense_ffns and (stage == 0 or not any(dense_ffns & got for got in run[stage]["changed"]))
