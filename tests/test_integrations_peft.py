"""Expert LoRA through PEFT and back, on tiny random Mixtral / Qwen3-MoE models (no downloads).

Oracles are independent of this package's LoRA code: PEFT itself (ParamWrapper on the 3-D expert
tensors: its logits and its LoRA gradients), and for the per-expert (Uni-MoE) layout the unpatched
host model with every expert's weights replaced by W + s * B @ A computed per projection here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tolerance import HF_GRAD_FP32, TOL  # noqa: E402

from unimoe_kernels.integrations.peft import (  # noqa: E402
    export_peft_adapter,
    grouped_to_param_wrapper,
    load_peft_adapter,
    param_wrapper_to_grouped,
)
from unimoe_kernels.integrations.transformers import patch_moe, patched_experts  # noqa: E402

VOCAB = 100
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _base(family="mixtral"):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:  # prime E=5, k=3
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=5,
                                          num_experts_per_tok=3, head_dim=8, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # clear top-k margins (HF's 0.02 init makes routers nearly uniform)
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    return model.float().eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _peft_model(base, **lora):
    cfg = peft.LoraConfig(target_modules=[], target_parameters=TARGETS, **lora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # B starts at zero; random B makes the adapter change the function
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return pm.eval()


def test_param_wrapper_conversion_round_trip_and_expert_order():
    e, r, d_in, d_out = 3, 2, 5, 7
    a, b = torch.randn(r * e, d_in), torch.randn(d_out, r * e)
    ga, gb = param_wrapper_to_grouped(a, b, e)
    assert ga.shape == (e, r, d_in) and gb.shape == (e, d_out, r)
    # Expert 1's rows of A are rows 2..3; its rank-j column of B is column j*E + 1.
    torch.testing.assert_close(ga[1], a[2:4], rtol=0, atol=0)
    torch.testing.assert_close(gb[1][:, 1], b[:, 1 * e + 1], rtol=0, atol=0)
    a2, b2 = grouped_to_param_wrapper(ga, gb)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    with pytest.raises(ValueError, match="E=4"):
        param_wrapper_to_grouped(a, b, 4)


@pytest.mark.parametrize("family,lora", [("mixtral", dict(r=3, lora_alpha=6)),
                                         ("qwen3_moe", dict(r=2, lora_alpha=4, use_rslora=True))])
def test_peft_adapter_loads_here_and_exports_back_identically(tmp_path, family, lora):
    base = _base(family)
    pm = _peft_model(base, **lora)
    ids = _ids()
    expected = pm(ids).logits
    pm.save_pretrained(tmp_path / "peft")

    model = copy.deepcopy(base)
    assert load_peft_adapter(model, tmp_path / "peft") == 2  # patches the model itself
    assert all(ex.lora_rank == lora["r"] for ex in patched_experts(model).values())
    torch.testing.assert_close(model(ids).logits, expected, **TOL[torch.float32])
    assert (base(ids).logits - expected).abs().max() > 1e-2  # the adapter matters

    state, config = export_peft_adapter(model, tmp_path / "ours")
    from safetensors.torch import load_file

    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert state.keys() == original.keys()
    for k in original:  # lossless: the same tensors, bit for bit
        assert torch.equal(state[k], original[k]), k
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, **TOL[torch.float32])


def test_gradients_equal_peft_training():
    """Training the imported adapter here gives PEFT's LoRA gradients (in PEFT's layout)."""
    base = _base()
    pm = _peft_model(base, r=2, lora_alpha=4)
    model = copy.deepcopy(base)
    load_peft_adapter(model, peft.get_peft_model_state_dict(pm), config=pm.peft_config["default"])
    ids = _ids()
    for m in (pm, model):
        m(ids, labels=ids).loss.backward()
    ours, _ = export_peft_adapter(model)
    theirs = dict(pm.named_parameters())
    for name, ex in patched_experts(model).items():
        prefix = f"base_model.model.{name}"
        for mod, a, b in ((f"{prefix}.base_layer", ex.lora_A_gate_up, ex.lora_B_gate_up),
                          (prefix, ex.lora_A_down, ex.lora_B_down)):
            ga, gb = grouped_to_param_wrapper(a.grad, b.grad)
            assert gb.abs().sum() > 0
            torch.testing.assert_close(ga, theirs[f"{mod}.lora_A.default.weight"].grad, **HF_GRAD_FP32)
            torch.testing.assert_close(gb, theirs[f"{mod}.lora_B.default.weight"].grad, **HF_GRAD_FP32)


def test_adapter_trained_here_loads_in_peft(tmp_path):
    base = _base()
    model = copy.deepcopy(base)
    patch_moe(model, lora_rank=4, lora_alpha=12)  # scale 3
    with torch.no_grad():
        for ex in patched_experts(model).values():
            ex.lora_B_gate_up.normal_(0.0, 0.2)
            ex.lora_B_down.normal_(0.0, 0.2)
    ids = _ids()
    _, config = export_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-mixtral")
    assert (config["r"], config["lora_alpha"]) == (4, 12)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_parameters"] == config["target_parameters"]
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, **TOL[torch.float32])


def test_different_scale_is_folded_into_b():
    base = _base()
    pm = _peft_model(base, r=2, lora_alpha=8)  # scale 4
    model = copy.deepcopy(base)
    patch_moe(model, lora_rank=2)  # scale 1: B must be multiplied by 4
    load_peft_adapter(model, peft.get_peft_model_state_dict(pm), config=pm.peft_config["default"])
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, pm(ids).logits, **TOL[torch.float32])


def _uni_moe_adapter(base, r, names, prefix_of):
    """A per-expert nn.Linear LoRA state dict (Uni-MoE layout) and its merged-weights oracle model."""
    g = torch.Generator().manual_seed(2)
    state, oracle = {}, copy.deepcopy(base)
    scale = 2.0  # lora_alpha 2r over rank r
    for name, host in ((n, m) for n, m in oracle.named_modules() if n.endswith("mlp.experts")):
        e, f2, h = host.gate_up_proj.shape
        f = f2 // 2
        with torch.no_grad():
            for i in range(e):
                for p, rows, (d_in, d_out) in ((names[0], slice(0, f), (h, f)), (names[1], slice(f, f2), (h, f)),
                                               (names[2], None, (f, h))):
                    a = torch.randn(r, d_in, generator=g) * 0.3
                    b = torch.randn(d_out, r, generator=g) * 0.3
                    key = f"base_model.model.{prefix_of(name)}.{i}.{p}"
                    state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, b
                    w = host.gate_up_proj[i, rows] if rows is not None else host.down_proj[i]
                    w += scale * (b @ a)
    return state, {"r": r, "lora_alpha": 2 * r}, oracle


@pytest.mark.parametrize("names,prefix_of", [
    (("gate_proj", "up_proj", "down_proj"), lambda n: n),
    # Mixtral-v4 naming under a differently named block, as Uni-MoE v1 checkpoints have it.
    (("w1", "w3", "w2"), lambda n: n.replace("mlp.experts", "block_sparse_moe.experts")),
])
def test_per_expert_linear_lora_import_and_lossless_export(names, prefix_of):
    base = _base("qwen3_moe")
    state, config, oracle = _uni_moe_adapter(base, 3, names, prefix_of)
    model = copy.deepcopy(base)
    assert load_peft_adapter(model, state, config=config, names=names, rename=prefix_of) == 2
    assert all(ex.lora_rank == 6 for ex in patched_experts(model).values())  # gate and up side by side
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, oracle(ids).logits, **TOL[torch.float32])

    out, out_config = export_peft_adapter(model, layout="per_expert", names=names, rename=prefix_of)
    assert (out_config["r"], out_config["lora_alpha"]) == (3, 6)
    assert out.keys() == state.keys()
    for k in state:
        assert torch.equal(out[k], state[k]), k


def test_per_expert_export_of_shared_a_keeps_delta_weights():
    base = _base()
    model = copy.deepcopy(base)
    patch_moe(model, lora_rank=2)
    with torch.no_grad():
        for ex in patched_experts(model).values():
            ex.lora_B_gate_up.normal_(0.0, 0.3)
            ex.lora_B_down.normal_(0.0, 0.3)
    state, config = export_peft_adapter(model, layout="per_expert")
    assert config["r"] == 2  # not in the block form: exported at its own rank
    again = copy.deepcopy(base)
    load_peft_adapter(again, state, config=config)
    ids = _ids()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, **TOL[torch.float32])


def test_missing_or_extra_adapter_keys_raise():
    base = _base()
    pm = _peft_model(base, r=2, lora_alpha=2)
    state = peft.get_peft_model_state_dict(pm)
    cfg = pm.peft_config["default"]
    one_layer = {k: v for k, v in state.items() if ".layers.0." in k}
    with pytest.raises(ValueError, match="no LoRA for experts module 'model.layers.1.mlp.experts'"):
        load_peft_adapter(copy.deepcopy(base), one_layer, config=cfg)
    extra = dict(state)
    extra["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    extra["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(ValueError, match="not patched experts"):
        load_peft_adapter(copy.deepcopy(base), extra, config=cfg)
    assert load_peft_adapter(copy.deepcopy(base), extra, config=cfg, strict=False) == 2
    bad = dict(state)
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"
    bad[key] = bad[key][:-1]
    with pytest.raises(ValueError, match="fit neither"):
        load_peft_adapter(copy.deepcopy(base), bad, config=cfg)
    patched = copy.deepcopy(base)
    patch_moe(patched, lora_rank=5)
    with pytest.raises(ValueError, match="lora_rank=5"):
        load_peft_adapter(patched, state, config=cfg)
    with pytest.raises(ValueError, match="config is required"):
        load_peft_adapter(copy.deepcopy(base), state)
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(copy.deepcopy(base), state, config={"r": 2, "use_dora": True})
    with pytest.raises(ValueError, match="no patched experts with LoRA"):
        export_peft_adapter(copy.deepcopy(base))


def test_patch_moe_refuses_experts_wrapped_by_peft():
    """LoRA asked for on experts that PEFT already wraps would leave one of the two adapters untrained."""
    pm = _peft_model(_base(), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="wrapped"):
        patch_moe(pm, lora_rank=2)


def test_peft_on_attention_must_not_silently_freeze_expert_lora():
    """get_peft_model freezes every parameter it did not create, our expert LoRA included: training
    must then raise, and mark_lora_trainable brings the experts back into training."""
    from unimoe_kernels.integrations.transformers import mark_lora_trainable

    model = _base()
    patch_moe(model, lora_rank=2)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).train()
    ids = _ids()
    with pytest.raises(RuntimeError, match="mark_lora_trainable"):
        pm(ids, labels=ids)
    with torch.no_grad():  # inference with frozen adapters is fine
        pm(ids)
    assert mark_lora_trainable(pm) == 2
    pm(ids, labels=ids).loss.backward()
    ex = patched_experts(pm)["base_model.model.model.layers.0.mlp.experts"]
    assert ex.lora_B_gate_up.grad is not None and ex.lora_B_gate_up.grad.abs().sum() > 0  # (A's is 0 while B = 0)
    q_lora = [p for n, p in pm.named_parameters() if "q_proj.lora_A" in n]
    assert q_lora and all(p.grad is not None for p in q_lora)  # PEFT's own adapters train alongside
