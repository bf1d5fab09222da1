"""patch_moe on tiny random transformers MoE models (tests/tiny_hf.py, no downloads): the patched model
must compute what the unpatched one computes (logits, router logits / aux loss, every gradient,
greedy generation), share its weight Parameters, save in the host's format, and with LoRA equal an
independent oracle: the unpatched model whose expert weights are parametrised as W + s * B @ A.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from tiny_hf import FAMILIES, VOCAB, compiled_greedy, eager_greedy  # noqa: E402
from tiny_hf import loss_and_grads as _loss_and_grads  # noqa: E402
from tiny_hf import model as _model  # noqa: E402
from tiny_hf import tokens as _tokens  # noqa: E402
from tolerance import (  # noqa: E402
    FLOOR_HF_LOGITS,
    HF_GRAD_FP32,
    MODEL_TRITON_FP32,
    MODEL_TRITON_GRAD_FP32,
    SAME_MATH_FP32,
    TOL,
    assert_flash_rule,
)

from unimoe_kernels import modules as moe_modules  # noqa: E402
from unimoe_kernels.integrations.transformers import (  # noqa: E402
    patch_moe,
    patched_experts,
    unpatch_moe,
    unsupported_reason,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_unpatched_logits_router_logits_and_grads(family):
    ref = _model(family)
    model = copy.deepcopy(ref)
    hosts = {n: (m.gate_up_proj, m.down_proj) for n, m in model.named_modules() if n.endswith("mlp.experts")}
    assert patch_moe(model) == 2  # one MoE block per layer
    for name, ex in patched_experts(model).items():
        # The same nn.Parameter objects, not copies: optimisers and save_pretrained see one tensor.
        assert ex.gate_up_proj is hosts[name][0] and ex.down_proj is hosts[name][1]
        assert ex.gate_up_proj.requires_grad  # no LoRA: nothing frozen
    assert list(model.state_dict()) == list(ref.state_dict())

    ids = _tokens()
    out, grads = _loss_and_grads(model, ids)
    ref_out, ref_grads = _loss_and_grads(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **TOL[torch.float32])
    torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, **SAME_MATH_FP32)
    for r, r_ref in zip(out.router_logits, ref_out.router_logits):
        torch.testing.assert_close(r, r_ref, **TOL[torch.float32])
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **HF_GRAD_FP32, msg=name)
    # The experts' gradients are really there (not zeros that would match trivially).
    assert grads["model.layers.0.mlp.experts.gate_up_proj"].abs().sum() > 0


def test_patched_experts_run_this_package(monkeypatch):
    """The equality above must come from our grouped MLP, not from the host's loop still running."""
    calls = []
    real = moe_modules.grouped_mlp_combine
    monkeypatch.setattr(moe_modules, "grouped_mlp_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model("mixtral")
    patch_moe(model)
    model(_tokens())
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_generate_matches_unpatched(family):
    ref = _model(family)
    model = copy.deepcopy(ref)
    patch_moe(model)
    # Prefill of 5 tokens then one-token decode steps through the KV cache (T=1 per MoE call).
    prompt = _tokens(batch=2, seq=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(model.generate(prompt, **kwargs), ref.generate(prompt, **kwargs), rtol=0, atol=0)


def test_save_pretrained_writes_host_format(tmp_path):
    from safetensors.torch import load_file

    ref = _model("qwen2_moe")
    model = copy.deepcopy(ref)
    patch_moe(model)
    model.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    saved = load_file(tmp_path / "patched" / "model.safetensors")
    saved_ref = load_file(tmp_path / "ref" / "model.safetensors")
    assert saved.keys() == saved_ref.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], saved_ref[k], rtol=0, atol=0, msg=k)
    # And the host's own class loads it back, unpatched, computing the same logits.
    reloaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "patched").eval()
    ids = _tokens()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, **TOL[torch.float32])


class _DeltaW(nn.Module):
    """Parametrisation W -> W + s * B @ A per expert: the independent LoRA oracle (PEFT's math)."""

    def __init__(self, a, b, scale):
        super().__init__()
        self.a, self.b, self.scale = nn.Parameter(a.clone()), nn.Parameter(b.clone()), scale

    def forward(self, w):
        return w + self.scale * torch.bmm(self.b, self.a)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_matches_delta_w_oracle_and_freezes_base(family):
    ref = _model(family)
    model = copy.deepcopy(ref)
    r, alpha = 4, 8.0  # scale 2 (not 1) so a wrong scale is caught
    assert patch_moe(model, lora_rank=r, lora_alpha=alpha) == 2
    with torch.no_grad():  # B starts at zero; give it values so the adapter changes the function
        for ex in patched_experts(model).values():
            ex.lora_B_gate_up.normal_(0.0, 0.1)
            ex.lora_B_down.normal_(0.0, 0.1)
    oracles = {}
    for name, ex in patched_experts(model).items():
        assert not ex.gate_up_proj.requires_grad and not ex.down_proj.requires_grad  # base frozen
        lora_names = ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down")
        assert all(getattr(ex, n).requires_grad for n in lora_names)
        host = ref.get_submodule(name)
        host.gate_up_proj.requires_grad_(False)
        host.down_proj.requires_grad_(False)
        gu, d = _DeltaW(ex.lora_A_gate_up, ex.lora_B_gate_up, 2.0), _DeltaW(ex.lora_A_down, ex.lora_B_down, 2.0)
        torch.nn.utils.parametrize.register_parametrization(host, "gate_up_proj", gu)
        torch.nn.utils.parametrize.register_parametrization(host, "down_proj", d)
        oracles[name] = (gu, d)

    ids = _tokens()
    out, _ = _loss_and_grads(model, ids)
    ref_out, _ = _loss_and_grads(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **TOL[torch.float32])
    plain = _model(family)(ids).logits
    assert (out.logits - plain).abs().max() > 1e-3  # the adapter is really applied
    for name, ex in patched_experts(model).items():
        gu, d = oracles[name]
        pairs = ((ex.lora_A_gate_up, gu.a), (ex.lora_B_gate_up, gu.b), (ex.lora_A_down, d.a), (ex.lora_B_down, d.b))
        for ours, theirs in pairs:
            assert ours.grad is not None and ours.grad.abs().sum() > 0
            torch.testing.assert_close(ours.grad, theirs.grad, **HF_GRAD_FP32)
        assert ex.gate_up_proj.grad is None  # frozen base gets no gradient


@pytest.mark.parametrize("base", ["fp32", "bf16"])
def test_lora_trains_under_cpu_bf16_autocast(base):
    """A trainer's bf16 mode: forward under torch.autocast, fp32 masters for what trains. With base
    "bf16" the host model is bf16 and the LoRA factors are fp32 (PEFT keeps adapters in fp32), so the
    experts get bf16 hidden states, bf16 base weights and fp32 adapters at once."""
    model = _model("mixtral").train()
    if base == "bf16":
        model.to(torch.bfloat16)
    patch_moe(model, lora_rank=4)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        p.requires_grad_("lora_" in name or name.endswith("mlp.gate.weight"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = _tokens()
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, losses  # six AdamW steps on one batch: clearly learning
    for name, p in trainable.items():
        if "lora_" in name:  # fp32 masters got fp32 gradients through the casts
            assert p.dtype == p.grad.dtype == torch.float32, name
    assert sum(p.grad.abs().sum() for n, p in trainable.items() if "lora_B" in n) > 0


def test_unpatch_merges_lora_into_host_weights():
    model = _model("olmoe")
    patch_moe(model, lora_rank=2)
    with torch.no_grad():
        for ex in patched_experts(model).values():
            ex.lora_B_gate_up.normal_(0.0, 0.1)
            ex.lora_B_down.normal_(0.0, 0.1)
    ids = _tokens()
    adapted = model(ids).logits
    host_type = type(next(iter(patched_experts(model).values())).host_experts)
    assert unpatch_moe(model, merge_lora=True) == 2
    assert not patched_experts(model)
    assert all(isinstance(model.model.layers[i].mlp.experts, host_type) for i in range(2))
    torch.testing.assert_close(model(ids).logits, adapted, **TOL[torch.float32])


def test_lora_finetune_of_patched_mixtral_lowers_loss():
    """A few LoRA steps (experts' adapters + routers trainable, everything else frozen) on one batch."""
    model = _model("mixtral").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch_moe(model, lora_rank=4, lora_alpha=8)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or n.endswith("mlp.gate.weight"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = _tokens(batch=4, seq=8)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids, output_router_logits=True)
        loss = out.loss + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = dict(model.named_parameters())
    for n, p in before.items():  # expert base weights and everything but the routers unchanged
        if not n.endswith("mlp.gate.weight"):
            torch.testing.assert_close(after[n].detach(), p, rtol=0, atol=0, msg=n)


def test_patch_is_idempotent_and_counts_only_new_swaps():
    model = _model("mixtral")
    assert patch_moe(model) == 2
    assert patch_moe(model) == 0
    with pytest.raises(ValueError, match="already patched with lora_rank=0"):
        patch_moe(model, lora_rank=4)  # LoRA asked for, existing experts carry none: never silent


def test_lora_request_without_moe_blocks_raises():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB)
    dense = transformers.LlamaForCausalLM(cfg)
    assert patch_moe(dense) == 0  # nothing to do is fine without LoRA
    with pytest.raises(ValueError, match="found no MoE experts"):
        patch_moe(dense, lora_rank=4)


def test_unsupported_experts_are_skipped_or_raise_with_lora():
    # A sigmoid gate is no activation kind GroupedExperts computes.
    model = _model("mixtral", hidden_act="sigmoid")
    assert "computes none of" in unsupported_reason(model.model.layers[0].mlp.experts)
    ids = _tokens()
    before = model(ids).logits
    with pytest.warns(UserWarning, match="left 2 experts module"):
        assert patch_moe(model) == 0
    torch.testing.assert_close(model(ids).logits, before)
    with pytest.raises(ValueError, match="would train nothing"):
        patch_moe(model, lora_rank=4)
    with pytest.raises(ValueError, match="could not swap"):
        patch_moe(model, strict=True)


@pytest.mark.parametrize("act,glu", [("gelu", "geglu"), ("gelu_pytorch_tanh", "geglu_tanh")])
def test_gelu_experts_patch_as_geglu_of_the_same_form(act, glu):
    ref = _model("olmoe", hidden_act=act)
    model = copy.deepcopy(ref)
    assert patch_moe(model) == 2
    assert next(iter(patched_experts(model).values())).activation == glu
    ids = _tokens()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, **TOL[torch.float32])


class _ToyExperts(nn.Module):
    """A model outside transformers that follows the v5 experts interface: patch_moe must take it."""

    def __init__(self, e=3, h=8, f=5):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * f, h) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(e, h, f) * 0.3)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                g, u = (self.gate_up_proj[e] @ hidden_states[t]).chunk(2)
                out[t] += top_k_weights[t, j] * (self.down_proj[e] @ (self.act_fn(g) * u))
        return out


def test_generic_v5_experts_interface():
    block = nn.ModuleDict({"experts": _ToyExperts()})
    ref = copy.deepcopy(block)
    assert patch_moe(block) == 1
    # Edge routing: one token (T=1 row), expert 2 unused by every token, a token whose two slots
    # name the same expert twice.
    for x, idx in ((torch.randn(1, 8), torch.tensor([[1, 0]])),
                   (torch.randn(4, 8), torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1]]))):
        w = torch.rand(idx.shape)
        torch.testing.assert_close(block["experts"](x, idx, w), ref["experts"](x, idx, w), **TOL[torch.float32])


def test_bad_arguments():
    model = _model("mixtral")
    with pytest.raises(TypeError, match="model"):
        patch_moe("not a model")
    with pytest.raises(ValueError, match="lora_rank"):
        patch_moe(model, lora_rank=-1)
    with pytest.raises(ValueError, match="lora_alpha"):
        patch_moe(model, lora_alpha=16)
    with pytest.raises(ValueError, match="lora_dropout"):
        patch_moe(model, lora_rank=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        patch_moe(model, backend="cuda")
    assert not patched_experts(model)  # a rejected call changed nothing


def test_triton_backend_matches_unpatched():
    """The Triton kernels (interpreter on CPU) behind a patched block, fwd and grads of x and LoRA."""
    ref = _model("mixtral", num_hidden_layers=1)
    model = copy.deepcopy(ref)
    patch_moe(model, lora_rank=2, backend="triton")
    ex = patched_experts(model)["model.layers.0.mlp.experts"]
    with torch.no_grad():
        ex.lora_B_gate_up.normal_(0.0, 0.1)
        ex.lora_B_down.normal_(0.0, 0.1)
    host = ref.model.layers[0].mlp.experts
    gu = _DeltaW(ex.lora_A_gate_up, ex.lora_B_gate_up, ex.lora_scale)
    d = _DeltaW(ex.lora_A_down, ex.lora_B_down, ex.lora_scale)
    torch.nn.utils.parametrize.register_parametrization(host, "gate_up_proj", gu)
    torch.nn.utils.parametrize.register_parametrization(host, "down_proj", d)
    ids = _tokens(batch=1, seq=6)
    out, _ = _loss_and_grads(model, ids)
    ref_out, _ = _loss_and_grads(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **MODEL_TRITON_FP32)
    torch.testing.assert_close(ex.lora_B_down.grad, d.b.grad, **MODEL_TRITON_GRAD_FP32)
    torch.testing.assert_close(ex.lora_A_gate_up.grad, gu.a.grad, **MODEL_TRITON_GRAD_FP32)


def test_example_script_runs(tmp_path, monkeypatch, capsys):
    """examples/patch_transformers_lora.py (linked from the README) trains and writes a PEFT adapter."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "patch_transformers_lora.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "3", "--device", "cpu", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()


def test_example_script_writes_to_a_temp_dir_by_default(tmp_path, monkeypatch, capsys):
    """Without --out the example writes into a new temporary directory, never into the cwd."""
    import runpy
    import sys
    import tempfile
    from pathlib import Path

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    script = Path(__file__).resolve().parents[1] / "examples" / "patch_transformers_lora.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "1", "--device", "cpu"])
    runpy.run_path(str(script), run_name="__main__")
    assert list(cwd.iterdir()) == []
    (out,) = tmp.iterdir()
    assert (out / "adapter_config.json").exists() and str(out) in capsys.readouterr().out


def _low_precision_rule(family, dtype, device, backend):
    """flash-attention's rule (tolerance.assert_flash_rule): the patched model's error against the fp32
    model is at most twice the unpatched model's own error in the same dtype, plus a floor."""
    ref32 = _model(family).to(device)
    low = copy.deepcopy(ref32).to(dtype)
    patched = copy.deepcopy(low)
    assert patch_moe(patched, backend=backend) == 2
    ids = _tokens().to(device)
    got, host = patched(ids).logits, low(ids).logits
    assert_flash_rule(got, host, ref32(ids).logits, floor=FLOOR_HF_LOGITS[dtype], what=f"{family} logits")


def test_triton_fp16_qwen2_moe_within_twice_host_error():
    # Qwen2-MoE: the router hands the experts weights in the model dtype (fp16), plus a shared expert.
    _low_precision_rule("qwen2_moe", torch.float16, torch.device("cpu"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_on_gpu_within_twice_host_error(family):
    _low_precision_rule(family, torch.bfloat16, torch.device("cuda"), "auto")


def test_only_moe_layers_are_patched_and_dense_mlps_left_alone():
    # decoder_sparse_step=2: layer 0 has a dense Qwen2MoeMLP, layer 1 the MoE block.
    ref = _model("qwen2_moe", decoder_sparse_step=2)
    model = copy.deepcopy(ref)
    assert patch_moe(model) == 1
    assert list(patched_experts(model)) == ["model.layers.1.mlp.experts"]
    assert type(model.model.layers[0].mlp) is type(ref.model.layers[0].mlp)
    ids = _tokens()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, **TOL[torch.float32])


def test_lora_with_trainable_base_and_mode_kept():
    model = _model("mixtral").train()
    patch_moe(model, lora_rank=2, freeze_base=False)
    ex = patched_experts(model)["model.layers.0.mlp.experts"]
    assert ex.training and ex.gate_up_proj.requires_grad and ex.lora_A_down.requires_grad
    ids = _tokens()
    model(ids, labels=ids).loss.backward()
    assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.abs().sum() > 0


INTERFACE = ("config", "num_experts", "hidden_dim", "intermediate_dim", "act_fn", "_apply_gate", "has_gate", "has_bias",
             "is_transposed", "is_concatenated", "has_post_expert_norm", "_is_expert_parallel")


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_experts_keep_the_interface_attributes(family):
    model = _model(family)
    hosts = {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    patch_moe(model)
    for name, ex in patched_experts(model).items():
        host = hosts[name]
        for attr in INTERFACE:
            assert hasattr(ex, attr), attr
            if attr not in ("_apply_gate",):
                assert getattr(ex, attr) == getattr(host, attr), attr
        assert ex.config is model.config
    # A module outside transformers gets the flags of the layout PatchedExperts holds.
    block = nn.ModuleDict({"experts": _ToyExperts()})
    patch_moe(block)
    ex = block["experts"]
    assert (ex.has_gate, ex.has_bias, ex.is_transposed, ex.is_concatenated, ex.has_post_expert_norm,
            ex._is_expert_parallel) == (True, False, False, True, False, False)


def test_patched_experts_skip_the_sentinel_index_like_the_host():
    """Index == num_experts (transformers' "expert on another rank") is skipped, not an error."""
    ref = _model("qwen3_moe")
    ref.set_experts_implementation("eager")
    host = ref.model.layers[0].mlp.experts
    model = copy.deepcopy(ref)
    patch_moe(model, lora_rank=2)
    ex = patched_experts(model)["model.layers.0.mlp.experts"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 32, generator=g)
    idx = torch.randint(0, 5, (5, 3), generator=g)
    idx[1, 0], idx[4] = 5, 5
    w = torch.rand(5, 3, generator=g)
    outs = []
    for m in (ex, host):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = m(xx, idx, ww)
        outs.append((y, *torch.autograd.grad(y, (xx, ww), torch.ones_like(y))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert outs[0][2][1, 0] == 0 and outs[0][2][4].abs().max() == 0


def test_set_experts_implementation_on_a_patched_model(monkeypatch):
    calls = []
    real = moe_modules.grouped_mlp_combine
    monkeypatch.setattr(moe_modules, "grouped_mlp_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = _model("mixtral")
    before = ref.config._experts_implementation
    model = copy.deepcopy(ref)
    patch_moe(model)
    assert model.get_experts_implementation()[""] == "unimoe"  # what runs, truthfully
    ids = _tokens()
    want = ref(ids).logits
    for impl, ours in (("grouped_mm", False), ("batched_mm", False), ("eager", False), ("unimoe", True)):
        calls.clear()
        model.set_experts_implementation(impl)
        torch.testing.assert_close(model(ids).logits, want, **TOL[torch.float32])
        assert bool(calls) == ours, impl  # transformers' kernels on the same Parameters, or ours
    unpatch_moe(model)
    assert model.config._experts_implementation == before


def test_set_experts_implementation_with_patch_lora_raises():
    model = _model("qwen2_moe")
    patch_moe(model, lora_rank=2)
    model.set_experts_implementation("grouped_mm")
    with pytest.raises(RuntimeError, match="without the adapter"):
        model(_tokens())
    model.set_experts_implementation("unimoe")
    model(_tokens())


def test_patched_model_compiles_fullgraph_and_exports():
    """_can_compile_fullgraph stays True after patch_moe, and it is true."""
    ref = _model("qwen2_moe")
    model = copy.deepcopy(ref)
    patch_moe(model)
    assert model._can_compile_fullgraph
    prompt = _tokens(batch=2, seq=5)
    want = eager_greedy(ref, prompt)
    got, graphs = compiled_greedy(model, prompt)
    assert graphs and torch.equal(got, want)
    ids = _tokens()
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
                             dynamic_shapes={"input_ids": {1: seq}, "use_cache": None})
    other = _tokens(seq=9)
    torch.testing.assert_close(ep.module()(input_ids=other, use_cache=False).logits, ref(other).logits,
                               **TOL[torch.float32])
