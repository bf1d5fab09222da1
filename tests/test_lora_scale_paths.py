"""A LoRA scale other than 1 (lora_alpha != r, and rsLoRA's alpha / sqrt(r)) through every path that
moves expert LoRA between forms: the layer's own forward, PatchedExperts.merged_weights and
unpatch_moe(merge_lora=True), export_peft_adapter in both layouts, load_peft_adapter into patched
models of another scale and into unpatched ones, and the experts interface's joining of two
projections' factors. Each delta W is checked against alpha / r * B @ A formed here, in fp64,
from the test's own alpha and r (never from a module's lora_scale), and each round trip against
the model's outputs before it.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_hf import model as hf_model  # noqa: E402
from tiny_hf import tokens  # noqa: E402
from tolerance import TOL  # noqa: E402

from unimoe_kernels import reference  # noqa: E402
from unimoe_kernels.integrations.experts_interface import _joint_lora  # noqa: E402
from unimoe_kernels.integrations.peft import export_peft_adapter, load_peft_adapter  # noqa: E402
from unimoe_kernels.integrations.transformers import patch_moe, patched_experts, unpatch_moe  # noqa: E402
from unimoe_kernels.modules import GroupedExperts  # noqa: E402

R, ALPHA = 3, 7.0  # scale 7/3: not 1, not an integer, not a power of two
FP32 = TOL[torch.float32]
PREFIX = "base_model.model."

pytestmark = pytest.mark.usefixtures("one_thread")


def _fill_lora(model_or_module, seed: int = 0) -> None:
    """Random A and B (B starts at zero, which would hide any scale)."""
    g = torch.Generator().manual_seed(seed)
    mods = patched_experts(model_or_module).values() if not isinstance(model_or_module, GroupedExperts) \
        else [model_or_module]
    with torch.no_grad():
        for ex in mods:
            for name in ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down"):
                p = getattr(ex, name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _delta(a: torch.Tensor, b: torch.Tensor, alpha: float, r: float) -> torch.Tensor:
    """alpha / r * B_e @ A_e per expert, fp64: A [E, r, in], B [E, out, r] -> [E, out, in]."""
    return torch.stack([b[e].double() @ a[e].double() for e in range(a.shape[0])]) * (alpha / r)


def _module_deltas(ex, alpha: float, r: float):
    return (_delta(ex.lora_A_gate_up.detach(), ex.lora_B_gate_up.detach(), alpha, r),
            _delta(ex.lora_A_down.detach(), ex.lora_B_down.detach(), alpha, r))


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(got.double(), want.double(), **FP32, msg=what)


def _patched(alpha=ALPHA, rank=R, family="mixtral"):
    model = hf_model(family)
    patch_moe(model, lora_rank=rank, lora_alpha=alpha)
    _fill_lora(model)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_forward_is_the_merged_weights_mlp(backend):
    e, h, f, t, k = 3, 16, 12, 9, 2
    ex = GroupedExperts(e, h, f, lora_rank=R, lora_alpha=ALPHA, backend=backend)
    _fill_lora(ex)
    x = torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    got = ex(x, ids, w)
    d_gu, d_d = _module_deltas(ex, ALPHA, R)
    w_gu = ex.gate_up_proj.detach().double() + d_gu
    w_d = ex.down_proj.detach().double() + d_d
    want = torch.zeros(t, h, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            z = w_gu[ids[i, j]] @ x[i].double()
            want[i] += w[i, j].double() * (w_d[ids[i, j]] @ reference.apply_activation(z, "swiglu"))
    _close(got, want)


def test_merged_weights_and_unpatch_merge():
    model = _patched()
    ids = tokens()
    adapted = model(ids).logits.detach()
    want = {}
    for name, ex in patched_experts(model).items():
        d_gu, d_d = _module_deltas(ex, ALPHA, R)
        want[name] = (ex.gate_up_proj.detach().double() + d_gu, ex.down_proj.detach().double() + d_d)
        gu, d = ex.merged_weights()
        _close(gu, want[name][0], f"{name} merged gate_up_proj")
        _close(d, want[name][1], f"{name} merged down_proj")
    assert unpatch_moe(model, merge_lora=True) == 2
    for name, (gu, d) in want.items():
        host = model.get_submodule(name)
        _close(host.gate_up_proj, gu, f"{name} host gate_up_proj")
        _close(host.down_proj, d, f"{name} host down_proj")
    torch.testing.assert_close(model(ids).logits, adapted, **FP32)


def _param_wrapper_deltas(state: dict, config: dict, name: str, num_experts: int):
    """Deltas of one experts module from PEFT's ParamWrapper keys, read here: expert e owns rows
    e*r .. e*r+r-1 of lora_A and columns e, E+e, 2E+e, ... of lora_B."""
    r, alpha = config["r"], config["lora_alpha"]
    out = []
    for mod in (f"{PREFIX}{name}.base_layer", f"{PREFIX}{name}"):
        a, b = state[f"{mod}.lora_A.weight"], state[f"{mod}.lora_B.weight"]
        out.append(torch.stack([b[:, e::num_experts].double() @ a[e * r:(e + 1) * r].double()
                                for e in range(num_experts)]) * (alpha / r))
    return out


def test_target_parameters_export_and_import_keep_the_scale():
    model = _patched()
    ids = tokens()
    adapted = model(ids).logits.detach()
    state, config = export_peft_adapter(model)
    assert config["r"] == R and config["lora_alpha"] / config["r"] == pytest.approx(ALPHA / R, rel=1e-12)
    deltas = {}
    for name, ex in patched_experts(model).items():
        deltas[name] = _module_deltas(ex, ALPHA, R)
        for got, want, what in zip(_param_wrapper_deltas(state, config, name, ex.num_experts), deltas[name],
                                   ("gate_up", "down")):
            _close(got, want, f"{name} exported {what}")

    # Into a model patched with another scale (B rescaled), and into an unpatched one (patched here).
    other_alpha = 2.0
    for target, alpha in ((_patched(alpha=other_alpha), other_alpha), (hf_model("mixtral"), None)):
        assert load_peft_adapter(target, state, config=config) == 2
        for name, ex in patched_experts(target).items():
            a = alpha if alpha is not None else ex.lora_alpha  # the patch chose it; its scale is checked below
            assert ex.lora_rank == R
            for got, want, what in zip(_module_deltas(ex, a, R), deltas[name], ("gate_up", "down")):
                _close(got, want, f"{name} imported {what}")
            assert ex.lora_alpha / ex.lora_rank == pytest.approx(ALPHA / R if alpha is None else alpha / R, rel=1e-12)
        torch.testing.assert_close(target(ids).logits, adapted, **FP32)


def _per_expert_deltas(state: dict, config: dict, name: str, num_experts: int, names=("gate_proj", "up_proj",
                                                                                          "down_proj")):
    """(gate_up [E, 2F, H], down [E, H, F]) deltas from per-expert nn.Linear LoRA keys, read here."""
    s = config["lora_alpha"] / config["r"]
    per = {p: torch.stack([state[f"{PREFIX}{name}.{e}.{p}.lora_B.weight"].double()
                           @ state[f"{PREFIX}{name}.{e}.{p}.lora_A.weight"].double() for e in range(num_experts)]) * s
           for p in names}
    return torch.cat([per[names[0]], per[names[1]]], 1), per[names[2]]


def test_per_expert_export_of_shared_a_keeps_the_scale():
    """Gate and up share A here, so the export is at rank R with lora_alpha = scale * R."""
    model = _patched()
    ids = tokens()
    adapted = model(ids).logits.detach()
    state, config = export_peft_adapter(model, layout="per_expert")
    assert config["r"] == R and config["lora_alpha"] / config["r"] == pytest.approx(ALPHA / R, rel=1e-12)
    for name, ex in patched_experts(model).items():
        for got, want, what in zip(_per_expert_deltas(state, config, name, ex.num_experts),
                                   _module_deltas(ex, ALPHA, R), ("gate_up", "down")):
            _close(got, want, f"{name} exported {what}")
    again = hf_model("mixtral")
    load_peft_adapter(again, state, config=config)
    torch.testing.assert_close(again(ids).logits, adapted, **FP32)


def _per_expert_adapter(model, r: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, host in ((n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")):
        e, f2, h = host.gate_up_proj.shape
        f = f2 // 2
        for i in range(e):
            for p, (d_in, d_out) in (("gate_proj", (h, f)), ("up_proj", (h, f)), ("down_proj", (f, h))):
                state[f"{PREFIX}{name}.{i}.{p}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.3
                state[f"{PREFIX}{name}.{i}.{p}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.3
    return state


@pytest.mark.parametrize("patched_alpha", [None, 5.0])
def test_per_expert_import_and_lossless_export_keep_the_scale(patched_alpha):
    """A Uni-MoE style adapter (r=2, alpha=7: scale 3.5) into an unpatched model (rank 2r, patched
    here) or into one patched at rank 2r with another alpha; merged weights are W + 3.5 B A per
    projection, and the export keeps every delta (the adapter itself when the scales agree)."""
    r, alpha = 2, 7.0
    base = hf_model("qwen3_moe")
    state = _per_expert_adapter(base, r)
    config = {"r": r, "lora_alpha": alpha}
    model = copy.deepcopy(base)
    if patched_alpha is not None:
        patch_moe(model, lora_rank=2 * r, lora_alpha=patched_alpha)
    assert load_peft_adapter(model, state, config=config) == 2
    for name, ex in patched_experts(model).items():
        want_gu, want_d = _per_expert_deltas(state, config, name, ex.num_experts)
        host = base.get_submodule(name)
        gu, d = ex.merged_weights()
        _close(gu, host.gate_up_proj.detach().double() + want_gu, f"{name} merged gate_up_proj")
        _close(d, host.down_proj.detach().double() + want_d, f"{name} merged down_proj")
    out, out_config = export_peft_adapter(model, layout="per_expert")
    assert out.keys() == state.keys() and out_config["r"] == r
    for name, ex in patched_experts(model).items():
        for got, want in zip(_per_expert_deltas(out, out_config, name, ex.num_experts),
                             _per_expert_deltas(state, config, name, ex.num_experts)):
            _close(got, want, f"{name} exported")
    if patched_alpha is None:  # the model took the adapter's scale: the very same adapter comes back
        assert out_config["lora_alpha"] == alpha
        for k in state:
            assert torch.equal(out[k], state[k]), k
    else:  # the model's own scale, B rescaled to keep each delta
        assert out_config["lora_alpha"] / r == pytest.approx(patched_alpha / (2 * r), rel=1e-12)


def test_rslora_scale_on_import_and_export():
    """use_rslora: scale alpha / sqrt(r) = 6 / 2 = 3; exported as a plain adapter of that scale."""
    r, alpha = 4, 6.0
    model = hf_model("mixtral")
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, host in ((n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")):
        e, f2, h = host.gate_up_proj.shape
        for mod, (d_in, d_out) in ((f"{PREFIX}{name}.base_layer", (h, f2)), (f"{PREFIX}{name}", (f2 // 2, h))):
            state[f"{mod}.lora_A.weight"] = torch.randn(r * e, d_in, generator=g) * 0.3
            state[f"{mod}.lora_B.weight"] = torch.randn(d_out, r * e, generator=g) * 0.3
    base = copy.deepcopy(model)
    load_peft_adapter(model, state, config={"r": r, "lora_alpha": alpha, "use_rslora": True})
    rs_config = {"r": r, "lora_alpha": alpha / r**0.5 * r}  # the same scale written as plain alpha / r
    for name, ex in patched_experts(model).items():
        want_gu, want_d = _param_wrapper_deltas(state, rs_config, name, ex.num_experts)
        gu, d = ex.merged_weights()
        host = base.get_submodule(name)
        _close(gu, host.gate_up_proj.detach().double() + want_gu, f"{name} merged gate_up_proj")
        _close(d, host.down_proj.detach().double() + want_d, f"{name} merged down_proj")
    out, out_config = export_peft_adapter(model)
    assert out_config["use_rslora"] is False and out_config["lora_alpha"] / out_config["r"] == pytest.approx(3.0)
    for name, ex in patched_experts(model).items():
        for got, want in zip(_param_wrapper_deltas(out, out_config, name, ex.num_experts),
                             _param_wrapper_deltas(state, rs_config, name, ex.num_experts)):
            _close(got, want, name)


def test_joint_lora_folds_each_projections_scale():
    """Two projections with their own rank and scale (or one without an adapter) become one rank and
    one scale for the kernels, each delta unchanged."""
    g = torch.Generator().manual_seed(4)
    e, h, f2, f = 3, 10, 8, 4
    w1, w2 = torch.zeros(e, f2, h), torch.zeros(e, h, f)
    first = (torch.randn(e, 2, h, generator=g), torch.randn(e, f2, 2, generator=g), 0.75)
    second = (torch.randn(e, 3, f, generator=g), torch.randn(e, h, 3, generator=g), 2.5)
    for one, two in ((first, second), (first, None), (None, second)):
        lora, scale = _joint_lora(one, two, w1, w2)
        for (a, b), given, w in (((lora.a_gate_up, lora.b_gate_up), one, w1), ((lora.a_down, lora.b_down), two, w2)):
            want = _delta(given[0], given[1], given[2], 1.0) if given is not None else torch.zeros(w.shape)
            _close(_delta(a, b, scale, 1.0), want)
