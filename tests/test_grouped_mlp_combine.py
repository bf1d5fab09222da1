"""grouped_mlp_combine (expert MLP with gather on load and the weighted combine fused in) against the
fp64 composition permute -> reference.grouped_mlp -> unpermute, forward and every gradient,
d(routing weights) included: the Triton backward computes that one inside the activation-backward
GEMM from the tile it holds, with no copy of y_sorted or of the weighted d(out)."""

from __future__ import annotations

import pytest
import torch
from tolerance import FP32_CANCELLING, ORACLE_FP32, assert_max_err

from unimoe_kernels import reference
from unimoe_kernels.ops import grouped_mlp_combine

H, F, R, E = 40, 24, 4, 5


def make(t, k, ids, device, *, activation="swiglu", train_base=True, lora=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * F if reference.is_glu(activation) else F

    def rnd(*shape, fan_in=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5).float().to(device)

    leaves = {"x": rnd(t, H), "weights": torch.rand(t, k, generator=g, dtype=torch.float64).float().to(device),
              "w_gu": rnd(E, f_in, H, fan_in=H), "w_d": rnd(E, H, F, fan_in=F)}
    if lora:
        leaves.update(a_gu=rnd(E, R, H, fan_in=H), b_gu=rnd(E, f_in, R, fan_in=R), a_d=rnd(E, R, F, fan_in=F),
                      b_d=rnd(E, H, R, fan_in=R))
    for name, t_ in leaves.items():
        t_.requires_grad_(train_base or name not in ("w_gu", "w_d"))
    plan = reference.build_routing(torch.tensor(ids, device=device), E)
    return leaves, plan


def run(leaves, plan, activation, fn, dtype=None, **kw):
    ls = {n: (t.detach().to(dtype).requires_grad_(t.requires_grad) if dtype else t) for n, t in leaves.items()}
    lora = reference.LoRAWeights(ls["a_gu"], ls["b_gu"], ls["a_d"], ls["b_d"]) if "a_gu" in ls else None
    out = fn(ls["x"], plan, ls["weights"], ls["w_gu"], ls["w_d"], activation, lora=lora, lora_scale=2.0, **kw)
    d_out = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    need = [n for n, t in ls.items() if t.requires_grad]
    grads = torch.autograd.grad(out, [ls[n] for n in need], d_out, allow_unused=True)
    return {"out": out, **{"d" + n: (torch.zeros_like(ls[n]) if g is None else g) for n, g in zip(need, grads)}}


def composition(x, plan, weights, w_gu, w_d, activation, **kw):
    k = weights.shape[1]
    y_sorted = reference.grouped_mlp(reference.permute(x, plan, k), plan.tokens_per_expert, w_gu, w_d, activation,
                                     **kw)
    return reference.unpermute(y_sorted, plan, weights)


def assert_close_to_oracle(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32, name
        assert_max_err(got[name], want[name], ORACLE_FP32, what=name)


IDS = {
    "mixed, expert 3 empty": [[0, 2], [2, 1], [0, 2], [4, 0], [2, 4], [0, 2], [1, 0]],
    "one expert takes all (k=1, two 64-row tiles)": [[3]] * 70,
    "one token, k=3": [[0, 1, 2]],
}


@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
@pytest.mark.parametrize("activation,train_base,lora", [("swiglu", True, True), ("gelu", False, True),
                                                         ("geglu", True, False)])
def test_matches_the_composition(ids, activation, train_base, lora, device):
    t, k = len(ids), len(ids[0])
    leaves, plan = make(t, k, ids, device, activation=activation, train_base=train_base, lora=lora)
    got = run(leaves, plan, activation, grouped_mlp_combine, backend="triton")
    want = run(leaves, plan, activation, composition, dtype=torch.float64)
    assert_close_to_oracle(got, want)


@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_and_recompute_equal_the_unfused_triton_path(recompute, device):
    """With LoRA dropout (masks follow the sorted row) the fused op equals grouped_mlp_gather +
    unpermute on the same seeds, bit for bit in its outputs and to rounding in its gradients."""
    from unimoe_kernels.ops import grouped_mlp_gather, unpermute

    ids = IDS["mixed, expert 3 empty"]
    leaves, plan = make(len(ids), 2, ids, device, activation="swiglu")

    def unfused(x, plan, weights, w_gu, w_d, activation, **kw):
        return unpermute(grouped_mlp_gather(x, plan, 2, w_gu, w_d, activation, **kw), plan, weights, backend="triton")

    outs = []
    for fn in (grouped_mlp_combine, unfused):
        torch.manual_seed(4)
        outs.append(run(leaves, plan, "swiglu", fn, backend="triton", lora_dropout=0.3, training=True,
                        recompute=recompute))
    assert torch.equal(outs[0]["out"], outs[1]["out"])
    for name in outs[1]:
        torch.testing.assert_close(outs[0][name], outs[1][name], **FP32_CANCELLING,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_rank_gates_through_the_fused_op(device):
    ids = IDS["mixed, expert 3 empty"]
    leaves, plan = make(len(ids), 2, ids, device)
    n = len(ids) * 2
    g = torch.Generator().manual_seed(3)
    gates = [torch.rand(n, R, generator=g).to(device).requires_grad_() for _ in range(2)]
    got = run(leaves, plan, "swiglu", grouped_mlp_combine, backend="triton", rank_gates=gates)
    gates64 = [t.detach().double().requires_grad_() for t in gates]
    want = run(leaves, plan, "swiglu", composition, dtype=torch.float64, rank_gates=gates64)
    assert_close_to_oracle(got, want)


def test_empty_batch_and_bad_weights(device):
    leaves, _ = make(1, 2, [[0, 1]], device)
    plan = reference.build_routing(torch.zeros(0, 2, dtype=torch.int64, device=device), E)
    x = torch.zeros(0, H, device=device, requires_grad=True)
    w = torch.zeros(0, 2, device=device, requires_grad=True)
    out = grouped_mlp_combine(x, plan, w, leaves["w_gu"], leaves["w_d"], backend="triton")
    assert out.shape == (0, H)
    out.sum().backward()
    assert x.grad.shape == (0, H) and w.grad.shape == (0, 2)
    for name in ("w_gu", "w_d"):  # no rows: the trainable weights get gradients of zeros
        g = leaves[name].grad
        assert g is not None and g.shape == leaves[name].shape and not g.any(), name
    with pytest.raises(TypeError, match="weights"):
        grouped_mlp_combine(x, plan, torch.zeros(0, 2, dtype=torch.int64, device=device), leaves["w_gu"],
                            leaves["w_d"], backend="triton")
    with pytest.raises(ValueError, match="weights"):
        grouped_mlp_combine(x, plan, torch.zeros(3, 2, device=device), leaves["w_gu"], leaves["w_d"],
                            backend="triton")
