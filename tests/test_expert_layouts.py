"""experts_implementation="unimoe" on the expert layouts of issue 26's table: every family of the table
that builds in this transformers, as its experts module alone, with its own config's constants.

The oracle is transformers' eager loop of the same module (its own _apply_gate / act_fn): a family
whose gate is recognised must reproduce the output and every gradient (input, routing weights, each
Parameter) in fp32, on the torch path, and its bf16 error may be at most twice eager's; a layout
the kernels cannot read yet raises the named ValueError, at the call and when "unimoe" is set on
a model. Also: the recognition never guesses (a constant other than the module's, an interleaved
read, a clamp after the activation are refused), it works under an ambient meta device,
patch_moe / GroupedExperts / PEFT take the same activation strings, and a recognised family
compiles with fullgraph=True.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import tiny_hf  # noqa: E402
from tolerance import HF_GRAD_FP32, TOL  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from unimoe_kernels import GroupedExperts  # noqa: E402
from unimoe_kernels.integrations import experts_interface  # noqa: E402
from unimoe_kernels.integrations import transformers as hf  # noqa: E402  (registers "unimoe")
from unimoe_kernels.integrations.experts_interface import (  # noqa: E402
    elementwise_activation,
    experts_activation,
)
from unimoe_kernels.types import activation_name  # noqa: E402

FP32 = TOL[torch.float32]
GRAD = HF_GRAD_FP32


def _clamp(alpha_of=None, beta=0.0, interleaved=False):
    return lambda c: activation_name("swiglu_clamp", alpha=getattr(c, alpha_of) if alpha_of else 1.0, beta=beta,
                                     limit=c.swiglu_limit, interleaved=interleaved)


def _softcap(c):
    return activation_name("swiglu_softcap", gate_cap=c.mlp_gate_softcap, up_cap=c.mlp_up_softcap)


# The activation each recognised family runs, written from its modeling code and read from its config.
RECOGNISED = {
    # gpt-oss and the privacy filter: biases on both projections, weights stored transposed;
    # gpt-oss's gate and up columns interleaved.
    "gpt_oss": _clamp("swiglu_alpha", beta=1.0, interleaved=True),
    "openai_privacy_filter": _clamp("swiglu_alpha", beta=1.0),
    "minimax_m3_vl": _clamp("swiglu_alpha", beta=1.0),
    "deepseek_v4": _clamp(), "hy_v4": _clamp(), "hy_v4_vl": _clamp(), "glm5_next": _clamp(),
    "bailing_hybrid": "swiglu", "step3p7": "swiglu", "beam": "swiglu",  # no per-layer limit; beam in fp32
    "inkling2": _softcap, "inkling2_loop": _softcap,
    "gemma4": "geglu_tanh", "diffusion_gemma": "geglu_tanh",
    "nemotron_h": "relu2", "ergo": "relu2",
}
# The layouts the kernels do not read yet, and what the ValueError names.
REFUSED = {
    "muse_spark": "has_post_expert_norm=True.*second pass",
}
assert set(RECOGNISED) | set(REFUSED) == set(tiny_hf.LAYOUT_EXPERTS)


def _experts(family, **kw):
    if tiny_hf.experts_config(family) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    return tiny_hf.experts(family, **kw)


def _expected(family, module):
    want = RECOGNISED[family]
    return want if isinstance(want, str) else want(module.config)


@pytest.fixture
def runs(monkeypatch):
    """Activations of the "unimoe" forward's grouped_mlp_combine calls."""
    calls = []
    real = experts_interface.grouped_mlp_combine

    def spy(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_interface, "grouped_mlp_combine", spy)
    return calls


def _unimoe(module):
    ours = copy.deepcopy(module)
    ours.config._experts_implementation = "unimoe"
    return ours


def _outputs_and_grads(module, x, ids, w, call=None):
    """(y, dx, dw, d each parameter) for a fixed random cotangent."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = (module if call is None else call)(x, ids, w)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    params = [p for _, p in module.named_parameters()]
    return (y, *torch.autograd.grad(y, [x, w, *params], dy))


def _assert_same(got, want, names):
    """fp32 equality up to reassociation. atol scales with the tensor: its entries are sums of
    terms of up to its largest magnitude (~10 here), so a near-zero entry carries rounding of that
    size, not of its own (PEFT's W + s B A against the rank-r path, above all)."""
    for g, r, name in zip(got, want, names, strict=True):
        tol = dict(FP32 if name == "output" else GRAD)
        tol["atol"] *= max(1.0, float(r.detach().abs().max()))
        torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", sorted(RECOGNISED))
def test_recognised_family_equals_eager_output_and_every_gradient(family, runs):
    ref = _experts(family)
    assert experts_activation(ref) == _expected(family, ref)
    ours = _unimoe(ref)
    x, ids, w = tiny_hf.routing()
    got = _outputs_and_grads(ours, x, ids, w)
    assert runs == [_expected(family, ref)]  # this package's op ran, with that activation
    want = _outputs_and_grads(ref, x, ids, w)
    names = ["output", "x", "weights", *(n for n, _ in ref.named_parameters())]
    _assert_same(got, want, names)
    for name, g in zip(names[3:], got[3:]):
        if "norm" not in name:
            assert g.abs().sum() > 0, name


def test_clamped_gate_with_a_gelu_act_fn_is_geglu_clamp(runs):
    """DeepSeek-V4's gate is act_fn(min(g, limit)) * clamp(u): with a gelu act_fn (its test configs'
    hidden_act) that is geglu_clamp, recognised and equal to eager like the silu form."""
    ref = _experts("deepseek_v4", hidden_act="gelu")
    want_act = activation_name("geglu_clamp", beta=0.0, limit=ref.config.swiglu_limit)
    assert experts_activation(ref) == want_act
    x, ids, w = tiny_hf.routing()
    got = _outputs_and_grads(_unimoe(ref), x, ids, w)
    assert runs == [want_act]
    _assert_same(got, _outputs_and_grads(ref, x, ids, w), ["output", "x", "weights", "gate_up_proj", "down_proj"])


@pytest.mark.parametrize("family", sorted(RECOGNISED))
def test_bf16_error_at_most_twice_eagers(family):
    """Same bf16 module and inputs through "unimoe" and transformers' eager loop, each against the
    fp64 eager output: ours may round differently (its activation and combine), not worse than 2x."""
    ref = _experts(family)
    x, ids, w = tiny_hf.routing(tokens=64)
    exact = copy.deepcopy(ref).double()(x.double(), ids, w.double())
    eager = copy.deepcopy(ref).bfloat16()
    errors = [(m(x.bfloat16(), ids, w.bfloat16()).double() - exact).abs().max() for m in (eager, _unimoe(eager))]
    assert errors[1] <= 2 * errors[0], errors


@pytest.mark.parametrize("family", ["deepseek_v4", "minimax_m3_vl", "inkling2"])
def test_constants_are_hit_by_the_probe_inputs(family):
    """The tiny configs put the clamp / caps inside the range of the pre-activations, so the equality
    above covers both sides of each (and the clamp's zero gradient)."""
    module = _experts(family)
    x, _, _ = tiny_hf.routing()
    z = torch.einsum("th,efh->tef", x, module.gate_up_proj.detach())
    bound = getattr(module.config, "swiglu_limit", None) or module.config.mlp_gate_softcap
    assert 0.05 < (z.abs() > bound).float().mean() < 0.95


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_layout_not_read_yet_is_refused_by_name(family, runs):
    ours = _unimoe(_experts(family))
    x, ids, w = tiny_hf.routing()
    with pytest.raises(ValueError, match=f'experts_implementation="unimoe" cannot run .*{REFUSED[family]}'):
        ours(x, ids, w)
    assert not runs


@pytest.mark.parametrize("family", ["bailing_hybrid", "step3p7"])
def test_per_layer_limit_is_refused_where_set_and_plain_where_not(family):
    """Their clamp comes after the activation (min(silu(g), L) * clamp(u)), which no kind computes:
    refused on a layer with a limit, plain SwiGLU on a layer without one."""
    with_limit = _experts(family, layer_idx=0, swiglu_limits=[2.5, 0.0])
    without = _experts(family, layer_idx=1, swiglu_limits=[2.5, 0.0])
    assert with_limit.limit == 2.5 and without.limit is None
    tried = r"swiglu_clamp\(alpha=1.0,beta=0.0,limit=2.5\)"
    with pytest.raises(ValueError, match=f"_apply_gate .*computes none of .*{tried}"):
        experts_activation(with_limit)
    assert experts_activation(without) == "swiglu"


# --- the recognition never guesses --------------------------------------------------------------


def _gated(gate, **attrs):
    """A gated experts module of transformers' interface whose _apply_gate is `gate`."""

    @use_experts_implementation
    class Toy(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.num_experts = tiny_hf.EXPERTS_E
            self.gate_up_proj = nn.Parameter(torch.randn(tiny_hf.EXPERTS_E, 2 * tiny_hf.EXPERTS_F, tiny_hf.EXPERTS_H))
            self.down_proj = nn.Parameter(torch.randn(tiny_hf.EXPERTS_E, tiny_hf.EXPERTS_H, tiny_hf.EXPERTS_F))
            for k, v in attrs.items():
                setattr(self, k, v)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not under test")

        _apply_gate = gate

    return Toy(transformers.PretrainedConfig())


def _clamped_silu(limit):
    def gate(self, gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    return gate


def test_a_constant_other_than_the_modules_is_refused():
    assert experts_activation(_gated(_clamped_silu(7.0), limit=7.0)) == "swiglu_clamp(alpha=1.0,beta=0.0,limit=7.0)"
    with pytest.raises(ValueError, match="computes none of"):
        experts_activation(_gated(_clamped_silu(7.0), limit=6.0))
    with pytest.raises(ValueError, match="computes none of"):  # the same clamp on the gate only
        experts_activation(_gated(lambda self, t: nn.functional.silu(t.chunk(2, -1)[0].clamp(max=7.0))
                                  * t.chunk(2, -1)[1], limit=7.0))


def test_an_expected_activation_is_confirmed_not_trusted():
    """Constants under a name the recognition does not read: refused alone, run when the caller
    names the activation, refused when the caller names another."""
    module = _gated(_clamped_silu(5.0), cap=5.0)
    with pytest.raises(ValueError, match="computes none of"):
        experts_activation(module)
    right = "swiglu_clamp(alpha=1.0,beta=0.0,limit=5.0)"
    assert experts_activation(module, right) == right
    with pytest.raises(ValueError, match=r"computes none of .*limit=5.5"):
        experts_activation(module, "swiglu_clamp(alpha=1.0,beta=0.0,limit=5.5)")
    with pytest.raises(ValueError, match="activation must be one of"):
        experts_activation(module, "swish")


def test_probe_runs_under_an_ambient_meta_device():
    """A model built under `with torch.device("meta")` (from_pretrained does) is recognised there:
    the probe is made on the CPU whatever the ambient device."""
    with torch.device("meta"):
        module = tiny_hf.experts("deepseek_v4")
        assert module.gate_up_proj.is_meta
        assert experts_activation(module) == _expected("deepseek_v4", module)
        assert elementwise_activation(nn.SiLU()) == "silu"  # a fresh act_fn: probed here, not cached


# --- refused when set ---------------------------------------------------------------------------


def _tiny_gpt_oss(**kw):
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=100, **kw)
    return transformers.GptOssForCausalLM(cfg)


def test_set_experts_implementation_refuses_at_once():
    model = _tiny_gpt_oss()
    before = model.config._experts_implementation
    # A layout no kernel reads (muse_spark's norm after each expert), here on both layers' experts.
    for layer in model.model.layers:
        layer.mlp.experts.has_post_expert_norm = True
    where = r"\[model\.layers\.0\.mlp\.experts and 1 other experts module\(s\)\]"
    with pytest.raises(ValueError, match=f"has_post_expert_norm=True.*{where}"):
        model.set_experts_implementation("unimoe")
    assert model.config._experts_implementation == before  # left as it was
    ok = tiny_hf.model("olmoe")
    ok.set_experts_implementation("unimoe")  # a model it can run is accepted
    assert ok.config._experts_implementation == "unimoe"


def test_gpt_oss_model_runs_on_unimoe(tmp_path, runs):
    """A whole tiny gpt-oss (biases, transposed and interleaved weights, clamped gate) set to "unimoe"
    at load: loss and every gradient equal eager's in fp32, and it runs in bf16."""
    torch.manual_seed(0)
    eager = _tiny_gpt_oss().float().eval()
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "bias" in name and "experts" in name:
                p.normal_(0.0, 0.5)  # transformers initialises them to zero: make them count
    eager.save_pretrained(tmp_path)
    ours = transformers.GptOssForCausalLM.from_pretrained(tmp_path, experts_implementation="unimoe").float().eval()
    assert ours.config._experts_implementation == "unimoe"
    ids = tiny_hf.tokens()
    got, want = tiny_hf.loss_and_grads(ours, ids), tiny_hf.loss_and_grads(eager, ids)
    assert len(runs) == 2 and all(r.endswith(":interleaved") for r in runs)
    torch.testing.assert_close(got[0].loss, want[0].loss, **FP32)
    torch.testing.assert_close(got[0].logits, want[0].logits, **FP32)
    for name in want[1]:
        g, r = got[1][name], want[1][name]
        tol = dict(GRAD)
        tol["atol"] *= max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        logits = ours.to(torch.bfloat16)(ids).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


# --- patch_moe, GroupedExperts, PEFT, compile ---------------------------------------------------


def _holder(module):
    holder = nn.Module()
    holder.experts = module
    return holder


@pytest.mark.parametrize("family", ["deepseek_v4", "inkling2", "gemma4", "beam"])
def test_patch_moe_and_grouped_experts_take_the_activation_strings(family):
    ref = _experts(family)
    act = _expected(family, ref)
    holder = _holder(copy.deepcopy(ref))
    assert hf.patch_moe(holder, strict=True) == 1
    patched = holder.experts
    assert isinstance(patched, hf.PatchedExperts) and patched.activation == act
    x, ids, w = tiny_hf.routing()
    names = ["output", "x", "weights", "gate_up_proj", "down_proj"]
    want = _outputs_and_grads(ref, x, ids, w)
    _assert_same(_outputs_and_grads(patched, x, ids, w), want, names)
    # A framework author's own layer: GroupedExperts with the same string and weights.
    layer = GroupedExperts(tiny_hf.EXPERTS_E, tiny_hf.EXPERTS_H, tiny_hf.EXPERTS_F, activation=act, backend="torch")
    with torch.no_grad():
        layer.gate_up_proj.copy_(ref.gate_up_proj)
        layer.down_proj.copy_(ref.down_proj)
    _assert_same(_outputs_and_grads(layer, x, ids, w), want, names)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_moe_and_grouped_experts_take_biases_and_the_interleaved_gate(backend):
    """gpt-oss's experts held untransposed ([E, 2F, H], as GroupedExperts holds them): patch_moe swaps
    such a host (biases, interleaved gate/up), and GroupedExperts(bias=True) with the ":interleaved"
    clamp string loaded from gpt-oss's weights equals gpt-oss's eager experts, output and gradients."""
    ref = _experts("gpt_oss")
    act = _expected("gpt_oss", ref)
    weights = {"gate_up_proj": ref.gate_up_proj.detach().transpose(1, 2), "down_proj": ref.down_proj.detach().mT,
               "gate_up_proj_bias": ref.gate_up_proj_bias.detach(), "down_proj_bias": ref.down_proj_bias.detach()}

    @use_experts_implementation(is_concatenated=False, has_bias=True)
    class Untransposed(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.num_experts, self.alpha, self.limit = tiny_hf.EXPERTS_E, ref.alpha, ref.limit
            for name, w in weights.items():
                setattr(self, name, nn.Parameter(w.clone()))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not under test")

        _apply_gate = type(ref)._apply_gate

    holder = _holder(Untransposed(transformers.PretrainedConfig()))
    assert hf.patch_moe(holder, strict=True, backend=backend) == 1
    layer = GroupedExperts(tiny_hf.EXPERTS_E, tiny_hf.EXPERTS_H, tiny_hf.EXPERTS_F, activation=act, bias=True,
                           backend=backend)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer, name).copy_(w)
    x, ids, w = tiny_hf.routing()
    want = _outputs_and_grads(ref, x, ids, w)
    # ref's weight gradients in the untransposed layout, in _outputs_and_grads' parameter order.
    by_name = dict(zip((n for n, _ in ref.named_parameters()), want[3:]))
    by_name = {n: (g.transpose(1, 2) if g.dim() == 3 else g) for n, g in by_name.items()}
    for ours in (holder.experts, layer):
        assert ours.activation == act and ours.has_bias
        got = _outputs_and_grads(ours, x, ids, w)
        names = [n for n, _ in ours.named_parameters()]
        _assert_same(got, (*want[:3], *(by_name[n] for n in names)), ["output", "x", "weights", *names])


def test_patch_moe_activation_is_confirmed_per_module():
    ref = _experts("deepseek_v4")
    right = _expected("deepseek_v4", ref)
    assert hf.patch_moe(_holder(copy.deepcopy(ref)), strict=True, activation=right) == 1
    with pytest.raises(ValueError, match="patch_moe could not swap.*computes none of"):
        hf.patch_moe(_holder(copy.deepcopy(ref)), strict=True, activation=right.replace("beta=0.0", "beta=1.0"))


def test_patch_moe_lora_on_a_clamped_gate_equals_eager_on_the_merged_weights():
    """LoRA gradients from the merged weight's: dA = s B^T dW, dB = s dW A^T per expert."""
    ref = _experts("deepseek_v4")
    holder = _holder(copy.deepcopy(ref))
    hf.patch_moe(holder, lora_rank=2, lora_alpha=3.0)
    patched = holder.experts
    with torch.no_grad():
        patched.lora_B_gate_up.normal_(0.0, 0.3)
        patched.lora_B_down.normal_(0.0, 0.3)
        merged = copy.deepcopy(ref)
        gu, d = patched.merged_weights()
        merged.gate_up_proj.copy_(gu)
        merged.down_proj.copy_(d)
    x, ids, w = tiny_hf.routing()
    y, dx, dw, da_gu, db_gu, da_d, db_d = _lora_grads(patched, x, ids, w)
    y_ref, dx_ref, dw_ref, dgu, dd = _outputs_and_grads(merged, x, ids, w)
    s = patched.lora_scale
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(dx, dx_ref, **GRAD)
    torch.testing.assert_close(dw, dw_ref, **GRAD)
    for da, db, dm, a, b, name in ((da_gu, db_gu, dgu, patched.lora_A_gate_up, patched.lora_B_gate_up, "gate_up"),
                                   (da_d, db_d, dd, patched.lora_A_down, patched.lora_B_down, "down")):
        torch.testing.assert_close(da, s * b.detach().transpose(1, 2) @ dm, **GRAD, msg=name)
        torch.testing.assert_close(db, s * dm @ a.detach().transpose(1, 2), **GRAD, msg=name)


def _lora_grads(patched, x, ids, w):
    """(y, dx, dw, dA_gu, dB_gu, dA_d, dB_d) of a patched module with LoRA (its base frozen)."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = patched(x, ids, w)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    factors = [patched.lora_A_gate_up, patched.lora_B_gate_up, patched.lora_A_down, patched.lora_B_down]
    return (y, *torch.autograd.grad(y, [x, w, *factors], dy))


@pytest.mark.parametrize("family,targets", [("minimax_m3_vl", ("experts.gate_up_proj", "experts.down_proj")),
                                            ("nemotron_h", ("experts.up_proj",)),
                                            ("gpt_oss", ("experts.gate_up_proj", "experts.down_proj"))])
def test_peft_target_parameters_lora_equals_peft(family, targets, runs):
    peft = pytest.importorskip("peft")
    base = _holder(_experts(family))
    cls, expected = type(base.experts), _expected(family, base.experts)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                       target_parameters=list(targets)), base)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    ours = copy.deepcopy(ref)
    inner = next(m for m in ours.modules() if type(m) is cls)
    inner.config._experts_implementation = "unimoe"
    x, ids, w = tiny_hf.routing()
    lora = [n for n, _ in ref.named_parameters() if "lora_" in n]
    grads = {}
    for name, m in (("ours", ours), ("ref", ref)):
        xx = x.clone().requires_grad_(True)
        y = m.experts(xx, ids, w)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        params = dict(m.named_parameters())
        grads[name] = (y, *torch.autograd.grad(y, [xx, *(params[n] for n in lora)], dy))
    assert runs == [expected]
    _assert_same(grads["ours"], grads["ref"], ["output", "x", *lora])


def test_fullgraph_compile_of_a_recognised_family(runs):
    ref = _experts("deepseek_v4")
    ours = _unimoe(ref)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x, ids, w = tiny_hf.routing()
    torch._dynamo.reset()
    got = _outputs_and_grads(ours, x, ids, w, call=compiled)
    torch._dynamo.reset()
    assert runs  # traced through this package's op
    want = _outputs_and_grads(ref, x, ids, w)
    _assert_same(got, want, ["output", "x", "weights", "gate_up_proj", "down_proj"])
