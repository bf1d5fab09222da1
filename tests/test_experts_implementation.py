"""experts_implementation="unimoe" (integrations/experts_interface.py) on tiny transformers MoE models.

The oracle is transformers itself: the same model with experts_implementation="eager" (its per-expert
loop) gives the logits, losses and every gradient "unimoe" must reproduce, and PEFT's own path
(W + s B A folded into the weight) gives the numbers and gradients of target_parameters LoRA. Also:
the sentinel expert index, the experts layout flags (run or refused with a clear error),
torch.export (static and dynamic sequence length) and fullgraph-compiled greedy generation with a
static cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from tiny_hf import FAMILIES, compiled_greedy, eager_greedy, loss_and_grads, model, tokens  # noqa: E402
from tolerance import HF_GRAD_FP32, MODEL_TRITON_FP32, MODEL_TRITON_GRAD_FP32, TOL  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

from unimoe_kernels.integrations import experts_interface  # noqa: E402
from unimoe_kernels.integrations import transformers as hf  # noqa: E402  (registers "unimoe")

FP32 = TOL[torch.float32]
GRAD = HF_GRAD_FP32


@pytest.fixture
def runs(monkeypatch):
    """Records each grouped_mlp_combine call of the "unimoe" forward: whether it got LoRA factors."""
    calls = []
    real = experts_interface.grouped_mlp_combine

    def spy(*args, **kwargs):
        calls.append(kwargs.get("lora") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_interface, "grouped_mlp_combine", spy)
    return calls


def _pair(family, **overrides):
    ref = model(family, **overrides)
    ref.set_experts_implementation("eager")
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("unimoe")
    return ref, ours


def test_registered_on_import_and_register_is_idempotent():
    assert ALL_EXPERTS_FUNCTIONS["unimoe"] is experts_interface.unimoe_experts_forward
    assert hf.register() is True and hf.register() is True
    assert "unimoe" in ALL_EXPERTS_FUNCTIONS.valid_keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_eager_logits_losses_and_every_gradient(family, runs):
    ref, ours = _pair(family)
    assert ours.get_experts_implementation()[""] == "unimoe"
    ids = tokens()
    out, grads = loss_and_grads(ours, ids)
    assert runs == [False, False]  # both MoE layers ran this package's op, without LoRA
    ref_out, ref_grads = loss_and_grads(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **FP32)
    torch.testing.assert_close(out.loss, ref_out.loss, **FP32)
    torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, **FP32)
    for r, r_ref in zip(out.router_logits, ref_out.router_logits):
        torch.testing.assert_close(r, r_ref, **FP32)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD, msg=name)
    assert grads["model.layers.0.mlp.experts.gate_up_proj"].abs().sum() > 0


def test_from_pretrained_with_unimoe(tmp_path, runs):
    ref = model("qwen2_moe")
    ref.save_pretrained(tmp_path)
    loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path, experts_implementation="unimoe").eval()
    assert loaded.config._experts_implementation == "unimoe"
    ids = tokens()
    ref.set_experts_implementation("eager")
    torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, **FP32)
    assert len(runs) == 2


def test_switching_back_and_forth(runs):
    ref, ours = _pair("olmoe")
    ids = tokens()
    want = ref(ids).logits
    for impl, ran in (("grouped_mm", 0), ("unimoe", 2), ("batched_mm", 0), ("eager", 0), ("unimoe", 2)):
        runs.clear()
        ours.set_experts_implementation(impl)
        torch.testing.assert_close(ours(ids).logits, want, **FP32)
        assert len(runs) == ran, impl


def test_sentinel_index_is_skipped_like_eager():
    """Index == num_experts (transformers' "expert on another rank") adds nothing and gets no gradient."""
    ref, ours = _pair("mixtral")
    experts = {name: m.model.layers[0].mlp.experts for name, m in (("ref", ref), ("ours", ours))}
    e = experts["ref"].num_experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g)
    idx = torch.randint(0, e, (6, 2), generator=g)
    idx[0, 1] = e
    idx[3] = e  # a token all of whose slots are elsewhere
    w = torch.rand(6, 2, generator=g)
    results = {}
    for name, ex in experts.items():
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = ex(xx, idx, ww)
        dy = torch.randn(y.shape, generator=g.manual_seed(4))
        grads = torch.autograd.grad(y, (xx, ww, ex.gate_up_proj, ex.down_proj), dy)
        results[name] = (y, *grads)
    for got, want in zip(results["ours"], results["ref"]):
        torch.testing.assert_close(got, want, **GRAD)
    y, dx, dw = results["ours"][:3]
    assert y[3].abs().max() == 0 and dx[3].abs().max() == 0
    assert dw[0, 1] == 0 and dw[3].abs().max() == 0


# --- experts layout flags -------------------------------------------------------------------------

E, H, F_, K = 3, 8, 4, 2


def _toy(flags: dict, act: str = "silu", **attrs):
    """An experts module of transformers' interface with the given @use_experts_implementation flags
    (the weights of has_gate=False are up_proj; is_transposed stores [E, in, out])."""

    @use_experts_implementation(**flags)
    class Toy(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            gated, t = flags.get("has_gate", True), flags.get("is_transposed", False)
            f_in = 2 * F_ if gated else F_
            first = (E, H, f_in) if t else (E, f_in, H)
            self.num_experts = E
            setattr(self, "gate_up_proj" if gated else "up_proj", nn.Parameter(torch.randn(first, generator=g) * 0.5))
            self.down_proj = nn.Parameter(torch.randn((E, F_, H) if t else (E, H, F_), generator=g) * 0.5)
            if flags.get("has_bias"):
                setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias",
                        nn.Parameter(torch.randn(E, f_in, generator=g)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
            self.act_fn = transformers.activations.ACT2FN[act]
            for k, v in attrs.items():
                setattr(self, k, v)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not under test")

    cfg = transformers.PretrainedConfig()
    cfg._experts_implementation = "batched_mm"
    return Toy(cfg)


def _run(module, impl):
    module.config._experts_implementation = impl
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, H, generator=g)
    idx = torch.randint(0, E, (5, K), generator=g)
    return module(x, idx, torch.rand(5, K, generator=g))


@pytest.mark.parametrize("flags,act", [({"is_transposed": True}, "silu"), ({"has_gate": False}, "relu"),
                                       ({"has_gate": False}, "gelu"), ({}, "gelu"), ({"has_gate": False}, "relu2"),
                                       ({}, "gelu_pytorch_tanh"), ({"has_gate": False}, "gelu_pytorch_tanh"),
                                       ({"has_bias": True}, "silu"),
                                       ({"has_bias": True, "is_transposed": True}, "silu"),
                                       ({"has_bias": True, "has_gate": False}, "relu"),
                                       # The default gate reads [gate; up] halves whatever the flag says.
                                       ({"is_concatenated": False}, "silu")])
def test_layouts_it_runs_equal_transformers_batched_mm(flags, act, runs):
    module = _toy(flags, act)
    want = _run(module, "batched_mm")  # transformers' own reading of the flags
    torch.testing.assert_close(_run(module, "unimoe"), want, **FP32)
    assert len(runs) == 1


@pytest.mark.parametrize("flags,attrs,match", [
    ({"has_post_expert_norm": True}, {"post_expert_norm": nn.Identity()}, "has_post_expert_norm=True.*second pass"),
    ({"has_gate": False, "act": "tanh"}, {}, r"act_fn Tanh.* computes none of .*\(silu, gelu, gelu_tanh, relu, relu2"),
    ({"act": "sigmoid"}, {}, r"_apply_gate .* computes none of .*\(swiglu, geglu, geglu_tanh, swiglu:interleaved, "
                             r"geglu:interleaved, geglu_tanh:interleaved\)"),
])
def test_layouts_it_cannot_run_raise(flags, attrs, match):
    flags = dict(flags)
    module = _toy(flags, flags.pop("act", "silu"), **attrs)
    with pytest.raises(ValueError, match=match):
        _run(module, "unimoe")


def test_custom_apply_gate_is_refused():
    """A gate no kind computes in either layout (a clamp alone, read interleaved behind
    is_concatenated=True) is refused, naming the candidates compared."""
    module = _toy({}, limit=7.0)
    type(module)._apply_gate = lambda self, gate_up: torch.clamp(gate_up[..., ::2], max=7.0) * gate_up[..., 1::2]
    with pytest.raises(ValueError, match=r"_apply_gate .* computes none of .*swiglu_clamp\(alpha=1.0,beta=0.0,limit=7"):
        _run(module, "unimoe")


# --- PEFT target_parameters LoRA --------------------------------------------------------------------


def _peft_pair(family, targets=("experts.gate_up_proj", "experts.down_proj"), r=4, alpha=8):
    peft = pytest.importorskip("peft")
    base = model(family)
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=list(targets))
    ref = peft.get_peft_model(copy.deepcopy(base), lora)
    with torch.no_grad():  # B starts at zero; random B makes the adapter change the function
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    ours = copy.deepcopy(ref)
    ref.base_model.model.set_experts_implementation("eager")
    ours.base_model.model.set_experts_implementation("unimoe")
    return ref, ours


def _peft_step(m, ids):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _saved_merged_weights(m, ids):
    """Byte sizes of the tensors a training step saves for backward whose storage is as large as an
    expert weight's but is not that Parameter's storage: a materialised W + s B A (or a view of it,
    such as the per-expert slices transformers' eager loop saves)."""
    weights = [p for n, p in m.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    sizes = {p.untyped_storage().nbytes() for p in weights}
    bases = {p.untyped_storage().data_ptr() for p in weights}
    merged = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() in sizes and storage.data_ptr() not in bases:
            merged.append(storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step = _peft_step(m, ids)
    return merged, step


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_peft_target_parameters_lora_equals_peft(family, runs):
    ref, ours = _peft_pair(family)
    ids = tokens()
    merged, (out, grads) = _saved_merged_weights(ours, ids)
    assert runs == [True, True]  # the fused LoRA path of both layers
    assert not merged  # no W + s B A kept for backward: the LoRA terms run through the rank r
    ref_merged, (ref_out, ref_grads) = _saved_merged_weights(ref, ids)
    assert ref_merged  # PEFT's own path keeps it (the check above can see one)
    torch.testing.assert_close(out.logits, ref_out.logits, **FP32)
    torch.testing.assert_close(out.loss, ref_out.loss, **FP32)
    assert grads.keys() == ref_grads.keys() and len(grads) == 8  # lora_A / lora_B of 2 weights x 2 layers
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD, msg=name)


def test_peft_lora_on_one_projection_only():
    """Only gate_up_proj adapted: the down projection runs with zero factors, numbers still PEFT's."""
    ref, ours = _peft_pair("olmoe", targets=("experts.gate_up_proj",), r=2, alpha=6)
    ids = tokens()
    out, grads = _peft_step(ours, ids)
    ref_out, ref_grads = _peft_step(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **FP32)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **GRAD, msg=name)


def test_peft_lora_on_triton_kernels(monkeypatch, runs):
    """The same through the Triton kernels (interpreter on CPU): the fused LoRA GEMMs' gradients."""
    from unimoe_kernels.ops import grouped_gemm

    launches = []
    real = grouped_gemm._triton_grouped_mlp
    monkeypatch.setattr(grouped_gemm, "_triton_grouped_mlp", lambda *a, **k: launches.append(1) or real(*a, **k))
    ref, ours = _peft_pair("qwen3_moe")
    ids = tokens(batch=1, seq=6)
    monkeypatch.setenv("UNIMOE_BACKEND", "triton")
    out, grads = _peft_step(ours, ids)
    monkeypatch.setenv("UNIMOE_BACKEND", "auto")
    assert len(launches) == 2
    ref_out, ref_grads = _peft_step(ref, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, **MODEL_TRITON_FP32)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **MODEL_TRITON_GRAD_FP32, msg=name)


# --- torch.export and torch.compile ---------------------------------------------------------------


def _package_ops(program) -> set:
    return {str(n.target) for n in program.graph_module.graph.nodes if "unimoe" in str(n.target)}


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_static_and_dynamic_sequence_length(family, runs):
    """Exported, the experts are the plain-aten forward (integrations/export.py): no op of this
    package in the program, the kernels' op not traced; eager and compiled runs keep the kernels
    (the tests above and below count their calls)."""
    ref, ours = _pair(family)
    ids = tokens()
    kwargs = {"input_ids": ids, "use_cache": False}
    static = torch.export.export(ours, (), kwargs)
    assert not _package_ops(static) and not runs
    torch.testing.assert_close(static.module()(**kwargs).logits, ref(ids, use_cache=False).logits, **FP32)
    seq = torch.export.Dim("seq", min=2, max=64)
    dynamic = torch.export.export(ours, (), kwargs, dynamic_shapes={"input_ids": {1: seq}, "use_cache": None})
    assert not _package_ops(dynamic) and not runs
    for n in (3, 11):
        other = tokens(seq=n)
        got = dynamic.module()(input_ids=other, use_cache=False).logits
        torch.testing.assert_close(got, ref(other, use_cache=False).logits, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_compiled_greedy_generation_with_static_cache_equals_eager(family, runs):
    ref, ours = _pair(family)
    assert ours._can_compile_fullgraph
    prompt = tokens(batch=2, seq=5)
    want = eager_greedy(ref, prompt)
    got, graphs = compiled_greedy(ours, prompt)
    assert graphs and runs  # the decode steps ran compiled, through this package's op
    assert torch.equal(got, want)


def test_readme_transformers_example_runs(tmp_path, runs):
    """README's transformers block as written, on a tiny saved Qwen3-MoE instead of the hub model."""
    import pathlib
    import re

    pytest.importorskip("peft")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    block = next(b for b in blocks if 'experts_implementation="unimoe"' in b)
    model("qwen3_moe").save_pretrained(tmp_path)
    code = block.replace('"Qwen/Qwen3-30B-A3B"', repr(str(tmp_path)))
    assert code != block
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    peft_model = namespace["model"]
    assert peft_model.base_model.model.config._experts_implementation == "unimoe"
    peft_model(tokens())
    assert runs == [True, True]  # PEFT's LoRA through the fused path of both layers

