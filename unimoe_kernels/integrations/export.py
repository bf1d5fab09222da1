"""The experts forward in plain aten ops, taken by both transformers doors only while a model is being
exported (torch.export, torch.onnx.export, transformers' exporters).

Why: the kernels' path is made of this package's custom ops (unimoe::routing_plan_c,
unimoe::torch_grouped_mlp_fwd, the Triton ops), which tracers see as opaque nodes. An exporter to
another runtime has no translation for them (ONNX: "No ONNX function found for
unimoe.routing_plan_c"), and a saved ExportedProgram holding them loads only where this package is
imported. While exporting, the same function is written with the aten ops transformers'
"grouped_mm" experts use, which every exporter lowers (ONNX: torchlib's or transformers' own
translation of aten::_grouped_mm):

    ids, weights [T, k] (sentinel slots already sent to expert 0 with weight 0)
    order = argsort(ids.flatten())                  slots sorted by expert
    offs  = cumsum(#slots of each expert)           [E] int32, from a one-hot count
    rows  = x[order // k]                           [N, H]
    z = rows W_gu[e]^T (+ s (rows' A_gu[e]^T) B_gu[e]^T) (+ b_gu[e])  one grouped GEMM over all experts
    h = apply_activation(z, activation)             the torch path's own elementwise code
    y = h W_d[e]^T (+ s (h' A_d[e]^T) B_d[e]^T) (+ b_d[e])  [N, H]
    out[t] = sum_j weights[t, j] y[slot t*k+j]      in fp32, back in x's dtype

x' and h' are the LoRA inputs (dropout while training); the optional biases are gathered per sorted
row (b[expert]), an index_select every exporter lowers. A grouped GEMM is what transformers'
"grouped_mm" experts run while exporting: torch._grouped_mm for bf16 (the only dtype its shape
function takes) and transformers' own op transformers::grouped_mm_fallback otherwise, which
transformers' exporters translate (ONNX: one MatMul per expert). So an exported "unimoe" model is the
graph an exported "grouped_mm" one is. The LoRA GEMMs, and every GEMM when transformers is not
loaded, gather each slot's expert matrix and run one batched GEMM: cheap for the rank-r factors,
[N, out, in] for a base weight. Outside export the kernels run; `exporting()` decides, and it is
False under torch.compile.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ..activations import apply_activation
from ..types import ExpertBias, LoRAWeights

# The stride alignment (bytes) torch._grouped_mm's CPU kernel needs when the program runs in torch.
_GMM_ALIGN = 16


def exporting() -> bool:
    """Whether the caller is being traced by an exporter: torch.export (also inside torch.onnx.export
    with dynamo=True and transformers' exporters) or the TorchScript-based torch.onnx.export. False
    under torch.compile and in eager code."""
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False
    # Not imported yet: no ONNX export can be under way, and importing it here would cost seconds.
    onnx = sys.modules.get("torch.onnx")
    return bool(onnx is not None and onnx.is_in_onnx_export())


def _gmm_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or a.dtype != torch.bfloat16 or b.dtype != a.dtype:
        return False
    for t in (a, b):
        if 1 not in (t.stride(-1), t.stride(-2)):
            return False
        if any(s * t.element_size() % _GMM_ALIGN for s in t.stride() if s != 1):
            return False
    return True


def _transformers_grouped_mm():
    """transformers' grouped GEMM op (registered by transformers.integrations.moe), or None."""
    if "transformers.integrations.moe" not in sys.modules:
        return None
    return getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)


def _grouped_linear(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """a [N, in] rows sorted by expert -> [N, out], row r times w[expert[r]]^T (w [E, out, in])."""
    wt = w.transpose(1, 2)
    if _gmm_takes(a, wt):
        return torch._grouped_mm(a, wt, offs=offs)
    grouped = _transformers_grouped_mm()
    if grouped is not None:
        return grouped(a, wt, offs)
    return torch.bmm(a.unsqueeze(1), wt[expert]).squeeze(1)


def _lora_term(a: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """(a A[e]^T) B[e]^T per row, through the rank: both gathers are [N, r, .]."""
    ar = torch.bmm(a.unsqueeze(1), lora_a[expert].transpose(1, 2))
    return torch.bmm(ar, lora_b[expert].transpose(1, 2)).squeeze(1)


def experts_forward_aten(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str,
    *,
    lora: Optional[LoRAWeights] = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    training: bool = False,
    bias: Optional[ExpertBias] = None,
) -> torch.Tensor:
    """out [T, H] = sum_j weights[t, j] * mlp_{ids[t, j]}(x[t]) in aten ops only (module docstring):
    grouped_mlp_combine's function for ids in [0, E), x [T, H], gate_up_proj [E, 2F|F, H],
    down_proj [E, H, F] (views of any layout), LoRA factors and bias (ExpertBias: gate_up [E, 2F|F],
    down [E, H], either None) as in grouped_mlp. Differentiable; no custom op, no host sync, shapes
    from T and k only."""
    t, k = ids.shape
    n_experts = gate_up_proj.shape[0]
    flat = ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat)
    expert = flat[order]
    counts = (flat.unsqueeze(1) == torch.arange(n_experts, device=flat.device)).sum(0)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = x[torch.div(order, k, rounding_mode="floor")]

    def lora_input(a):
        return F.dropout(a, lora_dropout, training=True) if training and lora_dropout > 0 else a

    z = _grouped_linear(rows, gate_up_proj, offs, expert)
    if lora is not None:
        z = z + lora_scale * _lora_term(lora_input(rows), lora.a_gate_up, lora.b_gate_up, expert)
    if bias is not None and bias.gate_up is not None:
        z = z + bias.gate_up.to(z.dtype)[expert]  # [N, 2F|F], z's column layout
    h = apply_activation(z, activation)
    y = _grouped_linear(h, down_proj, offs, expert)
    if lora is not None:
        y = y + lora_scale * _lora_term(lora_input(h), lora.a_down, lora.b_down, expert)
    if bias is not None and bias.down is not None:  # before the combine weight, as in the experts' MLP
        y = y + bias.down.to(y.dtype)[expert]
    acc = torch.promote_types(y.dtype, torch.float32)
    y = y.to(acc) * weights.reshape(-1)[order].to(acc).unsqueeze(1)
    out = y[torch.argsort(order)].view(t, k, -1).sum(dim=1)
    return out.to(x.dtype)


__all__ = ["exporting", "experts_forward_aten"]
