"""LoRA rank gates (mixture of rank-1 experts, Intuition-MoR1E): per routed row, a softmax over the
r rank-1 pieces of that row's expert LoRA, which the grouped-MLP kernels multiply into the LoRA
side products.

    x [T, H] --one GEMM [T, H] x [H, E*r]--> logits [T, E, r] (+ bias [T, r] per token)
      --gather the routed (token, expert) pairs--> [N, r] --r * softmax--> g [N, r] fp32

The grouped-MLP ops take (g_gate_up, g_down) through their rank_gates argument; plain torch here,
autograd carries the gradient on to x, the gate weights and the bias.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..types import compute_dtype


def lora_rank_gates(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixture-of-rank-1-experts gate of N rows: g [N, r] in fp32 (fp64 for fp64 x).

    Row n is token t = token_index[n] routed to expert e = expert_index[n]:
    g[n] = r * softmax(x[t] @ gate_weight[e]^T + bias[t]) over the r rank-1 pieces of e's LoRA.
    The factor r makes a uniform gate exactly 1 per piece, so a zero gate_weight (the init) gives
    plain LoRA and lora_alpha keeps its meaning. x [T, H]; gate_weight [E, r, H]; token_index,
    expert_index [N] integers; bias [T, r] (already broadcast per token) or None.

    The logits of every (token, expert) pair come from one dense GEMM [T, H] x [H, E*r] and the N
    routed ones are gathered: no per-expert loop, so no host sync and nothing torch.compile breaks
    on; it costs 2*T*H*E*r FLOPs, small next to the expert MLP while E*r << k*F.
    """
    e, r, h = gate_weight.shape
    acc = compute_dtype(x.dtype)
    logits = (x.to(acc) @ gate_weight.reshape(e * r, h).to(acc).t()).view(-1, e, r)
    if bias is not None:
        # Added per token before the gather: bias's gradient is then a plain sum over experts, not
        # an index_add over the k rows of each token (float atomics on GPU, run-to-run noise).
        logits = logits + bias.to(acc).unsqueeze(1)
    # With top-k routing a (token, expert) pair is routed at most once, so the gather's backward
    # writes each element of d(logits) once: deterministic although it is an indexed accumulate.
    rows = logits[token_index.to(torch.int64), expert_index.to(torch.int64)]
    return torch.softmax(rows, dim=-1) * r


__all__ = ["lora_rank_gates"]
