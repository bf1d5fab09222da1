"""The MoE implementations users would pick instead of this package, as benchmark providers.

Each provider computes what SparseMoE computes in eval mode (dropless, no jitter, no LoRA dropout)
from a SparseMoE's own parameters, written the way another codebase writes it:

    x [..., H] -> x2 [T, H]
    router (every provider): logits = x2 @ router.weight^T in fp32 -> softmax|sigmoid -> torch.topk
        -> renormalise (when the module does) -> weights [T, k] fp32, ids [T, k] int64
    naive_loop_moe       for e in experts: torch.where over the one-hot mask, index rows, expert MLP,
                         index_add                        (Mixtral / Uni-MoE v1 reference code)
    onehot_dispatch_moe  dispatch mask [T, E, C] with C = the busiest expert's load (dropless),
                         einsum dispatch -> bmm expert MLP over [E, C, H] -> einsum combine
                         (DeepSpeed-MoE / Uni-MoE 8e)
    peft_delta_w_moe     W_eff = W + s * B @ A materialised per expert, then a loop over
                         expert-sorted rows                (PEFT target_parameters on 3-D experts)
    grouped_mm_moe       expert-sorted rows, torch._grouped_mm for base and LoRA GEMMs (transformers
                         v5 "grouped_mm" experts), index_add combine; grouped_mm_mlp is its expert
                         MLP alone, for the grouped_mlp op benchmark
    dense_mlp            the dense SwiGLU chain over T*k rows: same FLOPs as the MoE, no routing;
                         the roofline the benchmarks divide by

All of them read expert loads on the host where their originals do (a sync); they are baselines,
not the package's sync-free GPU path. The router's expert_bias and group-limited routing are
DeepSeek-V3 features none of these codebases have, so they raise NotImplementedError there.

flops() counts the GEMM FLOPs of the expert MLP (router excluded), with LoRA counted separately.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as nnf

from .reference import apply_activation, is_glu

# ----------------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------------


class FlopCount(NamedTuple):
    """GEMM FLOPs of one MoE expert MLP call. base: the expert weights; lora: the adapters."""

    base: int
    lora: int

    @property
    def total(self) -> int:
        return self.base + self.lora


def flops(
    T: int,
    k: int,
    H: int,
    F: int,
    activation: str = "swiglu",
    lora_rank: int = 0,
    backward: bool = False,
    base_trainable: bool = True,
) -> FlopCount:
    """FLOPs of the expert MLP for T tokens routed to k experts each (N = T*k rows).

    Base, forward: GLU 6*N*H*F (x @ [2F, H]^T is 4NHF, h @ [H, F]^T is 2NHF); non-GLU 4*N*H*F.
    Backward adds dX (1x forward) and dW (1x forward): fwd+bwd = 3x forward = 18*N*H*F for SwiGLU,
    the convention of the benchmarks and of published MoE numbers. With base_trainable=False (a frozen base under
    LoRA) no dW is computed, so fwd+bwd = 2x forward.
    LoRA, forward: per row 2r(H + F_in) for gate_up (F_in = 2F for GLU, F otherwise) plus 2r(F + H)
    for down; its backward always computes dX, dA and dB: 3x forward.
    """
    glu = is_glu(activation)  # raises for an unknown activation
    for name, v in (("T", T), ("k", k), ("H", H), ("F", F), ("lora_rank", lora_rank)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    n = T * k
    f_in = 2 * F if glu else F
    base = 2 * n * H * f_in + 2 * n * F * H
    lora = 2 * n * lora_rank * (H + f_in) + 2 * n * lora_rank * (F + H)
    if backward:
        base *= 3 if base_trainable else 2
        lora *= 3
    return FlopCount(base=base, lora=lora)


# ----------------------------------------------------------------------------------------------
# Shared pieces: checks, router, one expert MLP
# ----------------------------------------------------------------------------------------------


def _check_moe(moe, x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != moe.hidden_size:
        raise ValueError(f"{name}: x must have shape [..., hidden_size={moe.hidden_size}], got {tuple(x.shape)}")
    if moe.capacity_factor is not None:
        raise ValueError(f"{name}: baselines are dropless; moe.capacity_factor must be None, got {moe.capacity_factor}")
    if moe.training and (moe.router.router_jitter > 0 or moe.experts.lora_dropout > 0):
        # Jitter and LoRA dropout are random in training, so no other implementation can match them.
        raise ValueError(f"{name}: compare against moe.eval() (router_jitter / lora_dropout act while training)")


def route(moe, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral-style router on x2 [T, H]: (weights [T, k] fp32 (fp64 for fp64 x), ids [T, k] int64)."""
    router = moe.router
    if router.expert_bias is not None or router.n_groups > 1:
        raise NotImplementedError("baselines have no expert_bias / group-limited routing (DeepSeek-V3 features)")
    acc = torch.promote_types(x2.dtype, torch.float32)
    logits = x2.to(acc) @ router.weight.to(acc).t()
    probs = torch.softmax(logits, dim=-1) if router.scoring == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(probs, moe.top_k, dim=-1)
    if router.normalize_topk:
        # Same floor as the module: an all-zero sigmoid row stays finite.
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    if router.scaling_factor != 1.0:
        weights = weights * router.scaling_factor
    return weights, ids


def _lora(moe):
    ex = moe.experts
    if not ex.lora_rank:
        return None
    return ex.lora_A_gate_up, ex.lora_B_gate_up, ex.lora_A_down, ex.lora_B_down


def _expert_mlp(xe: torch.Tensor, e: int, moe, w_gu: torch.Tensor, w_d: torch.Tensor, lora) -> torch.Tensor:
    """One expert on its rows xe [n, H]; lora=None when LoRA is off or already merged into w_gu, w_d."""
    s = moe.experts.lora_scale
    h = xe @ w_gu[e].t()
    if lora is not None:
        h = h + ((xe @ lora[0][e].t()) @ lora[1][e].t()) * s
    h = apply_activation(h, moe.experts.activation)
    y = h @ w_d[e].t()
    if lora is not None:
        y = y + ((h @ lora[2][e].t()) @ lora[3][e].t()) * s
    return y


def _flatten(moe, x: torch.Tensor, name: str) -> torch.Tensor:
    _check_moe(moe, x, name)
    return x.reshape(-1, moe.hidden_size)


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


def naive_loop_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Mixtral / Uni-MoE v1 reference style: a Python loop over experts, torch.where per expert."""
    x2 = _flatten(moe, x, "naive_loop_moe")
    weights, ids = route(moe, x2)
    # Mixtral casts the routing weights to the activation dtype and accumulates in it.
    weights = weights.to(x2.dtype)
    out = torch.zeros_like(x2)
    ex = moe.experts
    lora = _lora(moe)
    mask = nnf.one_hot(ids, moe.num_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(moe.num_experts):
        slot, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        y = _expert_mlp(x2[tok], e, moe, ex.gate_up_proj, ex.down_proj, lora)
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out.view(x.shape)


def onehot_dispatch_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-MoE / Uni-MoE 8e style: one-hot dispatch [T, E, C], einsum in, bmm experts, einsum out.

    C is the busiest expert's load, read on the host, as DeepSpeed does without token dropping, so
    nothing is dropped. Memory and dispatch FLOPs grow as T * E * C, which is the point of measuring it.
    """
    x2 = _flatten(moe, x, "onehot_dispatch_moe")
    t, h = x2.shape
    if t == 0:
        return x.new_zeros(x.shape)
    weights, ids = route(moe, x2)
    e_count, k = moe.num_experts, moe.top_k
    onehot = nnf.one_hot(ids, e_count)  # [T, k, E]
    # Position of each (token, slot) in its expert's queue, in token order then slot order.
    flat = onehot.reshape(t * k, e_count)
    position = ((torch.cumsum(flat, 0) - 1) * flat).sum(-1).view(t, k)
    capacity = int(flat.sum(0).max())  # host sync: DeepSpeed's dropless capacity
    # The [T, E, C] masks are written by index_put rather than as an einsum of one-hots, so the
    # baseline's memory is the two masks DeepSpeed keeps, not the int64 temporaries around them.
    tok = torch.arange(t, device=x2.device).unsqueeze(1).expand(t, k)
    dispatch = x2.new_zeros(t, e_count, capacity)
    dispatch[tok, ids, position] = 1.0
    combine = weights.new_zeros(t, e_count, capacity).index_put((tok, ids, position), weights)
    dispatched = torch.einsum("tec,th->ech", dispatch, x2)  # [E, C, H]
    ex = moe.experts
    s = ex.lora_scale
    lora = _lora(moe)
    hid = torch.bmm(dispatched, ex.gate_up_proj.transpose(1, 2))
    if lora is not None:
        hid = hid + torch.bmm(torch.bmm(dispatched, lora[0].transpose(1, 2)), lora[1].transpose(1, 2)) * s
    hid = apply_activation(hid, ex.activation)
    y = torch.bmm(hid, ex.down_proj.transpose(1, 2))  # [E, C, H]
    if lora is not None:
        y = y + torch.bmm(torch.bmm(hid, lora[2].transpose(1, 2)), lora[3].transpose(1, 2)) * s
    out = torch.einsum("tec,ech->th", combine.to(x2.dtype), y)
    return out.view(x.shape)


def _sorted_rows(ids: torch.Tensor, num_experts: int):
    """(order [N] int64: expert-sorted slot indices, counts [E] int64) for ids [T, k]."""
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def peft_delta_w_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """PEFT target_parameters style: W_eff = W + s * B @ A per expert, then a loop over sorted rows.

    Without LoRA this is the plain sort-and-loop expert forward of transformers v5.
    """
    x2 = _flatten(moe, x, "peft_delta_w_moe")
    weights, ids = route(moe, x2)
    ex = moe.experts
    w_gu, w_d = ex.gate_up_proj, ex.down_proj
    lora = _lora(moe)
    if lora is not None:
        # The materialised delta-W: [E, F_in, r] @ [E, r, H] and [E, H, r] @ [E, r, F].
        w_gu = w_gu + torch.bmm(lora[1], lora[0]) * ex.lora_scale
        w_d = w_d + torch.bmm(lora[3], lora[2]) * ex.lora_scale
    k = moe.top_k
    order, counts = _sorted_rows(ids, moe.num_experts)
    tokens = order // k
    w_sorted = weights.reshape(-1)[order].to(x2.dtype)
    outs = []
    start = 0
    for e, rows in enumerate(counts.tolist()):  # host sync, as the original loop has
        if rows:
            sl = slice(start, start + rows)
            outs.append(_expert_mlp(x2[tokens[sl]], e, moe, w_gu, w_d, None) * w_sorted[sl, None])
            start += rows
    out = torch.zeros_like(x2)
    if outs:
        out = out.index_add(0, tokens, torch.cat(outs))
    return out.view(x.shape)


@functools.lru_cache(maxsize=None)
def _grouped_mm_probe(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """None when torch._grouped_mm runs forward and backward on (device_type, dtype), else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    try:
        # enable_grad: the first call may come from a no_grad forward, and backward is probed too.
        with torch.enable_grad():
            _grouped_mm_tiny(device_type, dtype)
    except Exception as err:  # any failure means "not supported here"; the reason is reported
        return f"torch._grouped_mm does not run on {device_type} {dtype}: {type(err).__name__}: {err}"
    return None


def _grouped_mm_tiny(device_type: str, dtype: torch.dtype) -> None:
    """Forward and backward of a 2-expert grouped GEMM; 16 x 16 operands keep every stride a
    multiple of 16 bytes for any dtype of >= 1 byte."""
    x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([8, 16], dtype=torch.int32, device=device_type)
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    y.backward(torch.ones_like(y))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if grouped_mm_moe can run on this device and dtype, else the reason it cannot."""
    return _grouped_mm_probe(torch.device(device).type, dtype)


def grouped_mm_mlp(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "swiglu",
    *,
    lora=None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Expert MLP over expert-grouped rows x_sorted [N, H] with torch._grouped_mm -> [N, H].

    The arguments are those of reference.grouped_mlp (lora: (A_gu, B_gu, A_d, B_d) or None); the
    LoRA terms are two more grouped GEMMs each, through the rank-r intermediate. Raises
    NotImplementedError when torch._grouped_mm is missing, does not run on x_sorted's device and
    dtype, or when a GEMM dimension breaks its 16-byte stride rule.
    """
    why = grouped_mm_supported(x_sorted.device, x_sorted.dtype)
    if why is not None:
        raise NotImplementedError(why)
    esize = x_sorted.element_size()
    # Every operand's row stride is one of H, F (or 2F) or r elements.
    dims = (("hidden_size", down_proj.shape[1]), ("ffn_hidden_size", down_proj.shape[2]),
            ("lora_rank", 0 if lora is None else lora[0].shape[1]))
    for name, dim in dims:
        if dim and (dim * esize) % 16:
            raise NotImplementedError(
                f"torch._grouped_mm needs 16-byte aligned strides: {name}={dim} x {esize} bytes is not a multiple of 16"
            )
    offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # end offset of each expert's rows

    def gmm(a, w):  # a [N, K] @ w[e]^T for w [E, out, K]
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    hid = gmm(x_sorted, gate_up_proj)
    if lora is not None:
        hid = hid + gmm(gmm(x_sorted, lora[0]), lora[1]) * lora_scale
    hid = apply_activation(hid, activation)
    y = gmm(hid, down_proj)
    if lora is not None:
        y = y + gmm(gmm(hid, lora[2]), lora[3]) * lora_scale
    return y


def grouped_mm_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm over expert-sorted rows (base and LoRA GEMMs), weighted index_add combine.

    Raises NotImplementedError where grouped_mm_mlp cannot run (see there).
    """
    x2 = _flatten(moe, x, "grouped_mm_moe")
    ex = moe.experts
    why = grouped_mm_supported(x2.device, x2.dtype)
    if why is not None:  # before routing, so an unsupported device costs nothing
        raise NotImplementedError(why)
    weights, ids = route(moe, x2)
    order, counts = _sorted_rows(ids, moe.num_experts)
    tokens = order // moe.top_k
    y = grouped_mm_mlp(
        x2.index_select(0, tokens), counts, ex.gate_up_proj, ex.down_proj, ex.activation,
        lora=_lora(moe), lora_scale=ex.lora_scale,
    )
    y = y * weights.reshape(-1)[order].to(y.dtype).unsqueeze(-1)
    out = torch.zeros_like(x2).index_add(0, tokens, y)
    return out.view(x.shape)


def dense_mlp(
    x_rows: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu"
) -> torch.Tensor:
    """Dense MLP over x_rows [N, H] with w_gate_up [2F|F, H], w_down [H, F]; N = T*k gives the MoE's FLOPs."""
    if x_rows.dim() != 2:
        raise ValueError(f"x_rows must be [N, H], got {tuple(x_rows.shape)}")
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != x_rows.shape[1]:
        raise ValueError(f"w_gate_up must be [2F or F, H={x_rows.shape[1]}], got {tuple(w_gate_up.shape)}")
    f = w_gate_up.shape[0] // 2 if is_glu(activation) else w_gate_up.shape[0]
    if w_down.shape != (x_rows.shape[1], f):
        raise ValueError(f"w_down must be [H={x_rows.shape[1]}, F={f}], got {tuple(w_down.shape)}")
    return apply_activation(x_rows @ w_gate_up.t(), activation) @ w_down.t()


PROVIDERS = {
    "naive_loop": naive_loop_moe,
    "onehot_dispatch": onehot_dispatch_moe,
    "peft_delta_w": peft_delta_w_moe,
    "grouped_mm": grouped_mm_moe,
}

__all__ = [
    "FlopCount", "flops", "route", "naive_loop_moe", "onehot_dispatch_moe", "peft_delta_w_moe",
    "grouped_mm_moe", "grouped_mm_mlp", "grouped_mm_supported", "dense_mlp", "PROVIDERS",
]
