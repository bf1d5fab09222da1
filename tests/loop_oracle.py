"""An independent per-token MoE written as plainly as possible: the oracle the layer is tested against.

It shares no code with the package: its own scores, its own top-k (a Python sort on (-score, index)
so ties go to the lowest index), its own activations and LoRA, one token and one expert at a time.
"""

import math

import torch


def _act(h, activation):
    if activation in ("swiglu", "geglu"):
        f = h.shape[-1] // 2
        gate, up = h[:f], h[f:]
        if activation == "swiglu":
            return gate * torch.sigmoid(gate) * up
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0))) * up
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    if activation == "relu":
        return torch.clamp(h, min=0)
    if activation == "silu":
        return h * torch.sigmoid(h)
    raise AssertionError(activation)


def per_token_moe(moe, x, capacity=None):
    """y [T, H] for x [T, H] through SparseMoE `moe`'s parameters (eval semantics, no jitter).

    With `capacity`, an expert takes only its first `capacity` (token, slot) pairs in token order.
    """
    router = moe.router
    ex = moe.experts
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t_count, _ = x.shape
    n_exp = moe.num_experts
    out = torch.zeros(x.shape, dtype=acc)
    taken = [0] * n_exp
    for t in range(t_count):
        xt = x[t].to(acc)
        logits = router.weight.to(acc) @ xt
        if router.scoring == "softmax":
            z = torch.exp(logits - logits.max())
            scores = z / z.sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        order = sorted(range(n_exp), key=lambda e: (-float(scores[e].detach()), e))[: router.top_k]
        w = torch.stack([scores[e] for e in order])
        if router.normalize_topk:
            w = w / w.sum()
        for j, e in enumerate(order):
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue
            h = ex.gate_up_proj[e].to(acc) @ xt
            if ex.lora_rank:
                h = h + ex.lora_scale * (ex.lora_B_gate_up[e].to(acc) @ (ex.lora_A_gate_up[e].to(acc) @ xt))
            a = _act(h, ex.activation)
            y = ex.down_proj[e].to(acc) @ a
            if ex.lora_rank:
                y = y + ex.lora_scale * (ex.lora_B_down[e].to(acc) @ (ex.lora_A_down[e].to(acc) @ a))
            out[t] += w[j] * y
    return out.to(x.dtype)
