"""The expert MLP's activations in torch, forward and backward, for the torch path and the oracle.

    GEMM 1 output z [rows, 2F] (GLU: gate columns first, then up) or [rows, F]
      --apply_activation--> h [rows, F]
    dh [rows, F] --activation_backward(z, dh)--> dz [rows, 2F|F]

The Triton kernels compute the same functions in their epilogues (kernels/gemm_common.py); these are
what the torch backend runs (torch_grouped_mlp.py) and what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import ACTIVATIONS, GLU_ACTIVATIONS


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """[rows, 2F] -> [rows, F] for GLU activations (gate first, then up); elementwise otherwise.

    gelu is the exact (erf) form in both gelu and geglu.
    """
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(z: torch.Tensor, dh: torch.Tensor, activation: str) -> torch.Tensor:
    """d(apply_activation)/dz applied to dh: z [rows, 2F|F], dh [rows, F] -> dz [rows, 2F|F].

    Through the derivative kernels autograd itself uses (silu_backward, gelu_backward,
    threshold_backward), so the numbers are autograd's.
    """
    aten = torch.ops.aten
    if activation in GLU_ACTIVATIONS:
        gate, up = z.chunk(2, dim=-1)
        act = F.silu(gate) if activation == "swiglu" else F.gelu(gate)
        d_act = dh * up
        d_gate = aten.silu_backward(d_act, gate) if activation == "swiglu" else aten.gelu_backward(d_act, gate)
        return torch.cat([d_gate, dh * act], dim=-1)
    if activation == "gelu":
        return aten.gelu_backward(dh, z)
    if activation == "relu":
        return aten.threshold_backward(dh, z, 0)
    if activation == "silu":
        return aten.silu_backward(dh, z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


__all__ = ["apply_activation", "activation_backward"]
