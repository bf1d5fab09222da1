"""The Triton expert MLP with per-expert biases and interleaved gate/up columns (gpt-oss's layout)
against an independent fp64 loop over tokens and their experts, forward and every gradient.

The kernels add the biases in the GEMM epilogues and compute their gradients as per-expert column
sums (of dz from the activation-backward epilogue's per-tile sums, of dy in one pass), and run the
interleaved layout in column pairs; the oracle here reads the layout with plain strided slices and
lets autograd differentiate it. Routings include an expert with no rows (its bias gradient must be
exactly zero) and one expert taking every row over several tiles.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import ORACLE_FP32, assert_max_err

from unimoe_kernels import reference
from unimoe_kernels.ops import grouped_mlp, grouped_mlp_combine, grouped_mlp_gather, unpermute
from unimoe_kernels.types import ExpertBias, is_glu, is_interleaved

H, F, R, E = 40, 24, 4, 5
CLAMP = "swiglu_clamp(alpha=1.702,beta=1.0,limit=1.5):interleaved"  # gpt-oss's gate; a limit the data reaches
ROUTINGS = {
    "mixed, expert 3 empty": [[0, 2], [2, 1], [0, 2], [4, 0], [2, 4], [0, 2], [1, 0]],
    "one expert takes all (k=1, two 64-row tiles)": [[3]] * 70,
}


def _gate_up(z: torch.Tensor, activation: str) -> torch.Tensor:
    """h of one row z [2F|F] written out per kind, reading the layout with slices."""
    if not is_glu(activation):
        return torch.nn.functional.gelu(z)
    g, u = (z[0::2], z[1::2]) if is_interleaved(activation) else z.chunk(2)
    if activation.startswith("swiglu_clamp"):
        g, u = g.clamp(max=1.5), u.clamp(-1.5, 1.5)
        return g * torch.sigmoid(1.702 * g) * (u + 1.0)
    if activation.startswith("geglu"):
        return torch.nn.functional.gelu(g) * u
    return torch.nn.functional.silu(g) * u


def oracle(p: dict, ids: torch.Tensor, activation: str, scale: float) -> torch.Tensor:
    """out[t] = sum_j w[t, j] (act(x W_gu^T + s x A_gu^T B_gu^T + b_gu) W_d^T + s h A_d^T B_d^T + b_d)."""
    out = []
    for t in range(ids.shape[0]):
        acc = 0
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            z = p["w_gu"][e] @ p["x"][t]
            if "a_gu" in p:
                z = z + scale * p["b_gu"][e] @ (p["a_gu"][e] @ p["x"][t])
            if "bias_gu" in p:
                z = z + p["bias_gu"][e]
            h = _gate_up(z, activation)
            y = p["w_d"][e] @ h
            if "a_gu" in p:
                y = y + scale * p["b_d"][e] @ (p["a_d"][e] @ h)
            if "bias_d" in p:
                y = y + p["bias_d"][e]
            acc = acc + p["weights"][t, j] * y
        out.append(acc)
    return torch.stack(out)


def make(ids, activation, biases, lora, train_base, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_in = 2 * F if is_glu(activation) else F

    def rnd(*shape, fan_in=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5).to(device)

    t, k = len(ids), len(ids[0])
    p = {"x": rnd(t, H), "weights": torch.rand(t, k, generator=g, dtype=torch.float64).to(device),
         "w_gu": rnd(E, f_in, H, fan_in=H), "w_d": rnd(E, H, F, fan_in=F)}
    if "gate_up" in biases:
        p["bias_gu"] = rnd(E, f_in)
    if "down" in biases:
        p["bias_d"] = rnd(E, H)
    if lora:
        p.update(a_gu=rnd(E, R, H, fan_in=H), b_gu=rnd(E, f_in, R, fan_in=R), a_d=rnd(E, R, F, fan_in=F),
                 b_d=rnd(E, H, R, fan_in=R))
    for name, v in p.items():
        v.requires_grad_(train_base or name not in ("w_gu", "w_d"))
    return p, torch.tensor(ids, device=device)


def grads_of(out: torch.Tensor, p: dict) -> dict:
    d_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    names = [n for n, v in p.items() if v.requires_grad]
    grads = torch.autograd.grad(out, [p[n] for n in names], d_out)
    return {"out": out, **{"d" + n: g for n, g in zip(names, grads)}}


def triton_run(p64: dict, ids: torch.Tensor, activation: str, scale: float, op: str = "combine", **kw) -> dict:
    p = {n: v.detach().float().requires_grad_(v.requires_grad) for n, v in p64.items()}
    lora = reference.LoRAWeights(p["a_gu"], p["b_gu"], p["a_d"], p["b_d"]) if "a_gu" in p else None
    bias = ExpertBias(p.get("bias_gu"), p.get("bias_d"))
    plan = reference.build_routing(ids, E)
    common = dict(lora=lora, lora_scale=scale, bias=bias, backend="triton", **kw)
    k = ids.shape[1]
    if op == "combine":
        out = grouped_mlp_combine(p["x"], plan, p["weights"], p["w_gu"], p["w_d"], activation, **common)
    elif op == "gather":
        y = grouped_mlp_gather(p["x"], plan, k, p["w_gu"], p["w_d"], activation, **common)
        out = unpermute(y, plan, p["weights"], backend="triton")
    else:  # rows already sorted: grouped_mlp over the permuted copy
        x_sorted = reference.permute(p["x"], plan, k)
        y = grouped_mlp(x_sorted, plan.tokens_per_expert, p["w_gu"], p["w_d"], activation, plan=plan, **common)
        out = unpermute(y, plan, p["weights"], backend="triton")
    return grads_of(out, p)


def assert_matches(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert_max_err(got[name], want[name], ORACLE_FP32, what=name)


@pytest.mark.parametrize("ids", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("activation,biases,lora,train_base", [
    (CLAMP, ("gate_up", "down"), False, True),  # gpt-oss
    (CLAMP, ("gate_up", "down"), True, False),  # gpt-oss with LoRA on a frozen base
    ("swiglu", ("gate_up",), True, True),
    ("geglu:interleaved", ("down",), False, True),
    ("gelu", ("gate_up", "down"), False, True),
])
def test_fused_layer_matches_the_loop(ids, activation, biases, lora, train_base, device):
    p, ids_t = make(ids, activation, biases, lora, train_base, device)
    want = grads_of(oracle(p, ids_t, activation, 2.0), p)
    assert_matches(triton_run(p, ids_t, activation, 2.0), want)


@pytest.mark.parametrize("op,recompute", [("gather", False), ("sorted", True), ("combine", True)])
def test_unfused_paths_and_recompute(op, recompute, device):
    """The bias and the interleaved layout through grouped_mlp_gather and grouped_mlp (dy per sorted
    row, not gathered), and with the pre-activation recomputed in backward."""
    ids = ROUTINGS["mixed, expert 3 empty"]
    p, ids_t = make(ids, CLAMP, ("gate_up", "down"), True, True, device, seed=1)
    want = grads_of(oracle(p, ids_t, CLAMP, 0.5), p)
    assert_matches(triton_run(p, ids_t, CLAMP, 0.5, op=op, recompute=recompute), want)


def test_an_expert_without_rows_gets_zero_bias_gradients(device):
    ids = ROUTINGS["mixed, expert 3 empty"]
    p, ids_t = make(ids, CLAMP, ("gate_up", "down"), False, True, device)
    got = triton_run(p, ids_t, CLAMP, 1.0)
    assert not got["dbias_gu"][3].any() and not got["dbias_d"][3].any()
    assert got["dbias_gu"][0].abs().sum() > 0 and got["dbias_d"][0].abs().sum() > 0


def test_bad_bias_is_refused(device):
    p, _ = make([[0]], "swiglu", (), False, True, device)
    x, w_gu, w_d = (p[n].detach().float() for n in ("x", "w_gu", "w_d"))
    counts = torch.tensor([1, 0, 0, 0, 0], device=device)
    with pytest.raises(ValueError, match=r"bias.gate_up must be a tensor \[5, 48\]"):
        grouped_mlp(x, counts, w_gu, w_d, bias=ExpertBias(torch.zeros(5, 24, device=device), None))
    with pytest.raises(ValueError, match=r"bias.down must be a tensor \[5, 40\]"):
        grouped_mlp(x, counts, w_gu, w_d, bias=ExpertBias(None, torch.zeros(4, 40, device=device)))
    with pytest.raises(TypeError, match="bias.down has dtype torch.float64"):
        grouped_mlp(x, counts, w_gu, w_d, bias=ExpertBias(None, torch.zeros(5, 40, dtype=torch.float64,
                                                                               device=device)))
    with pytest.raises(TypeError, match="ExpertBias"):
        grouped_mlp(x, counts, w_gu, w_d, bias=(torch.zeros(5, 48, device=device), None))
