"""The expert MLP's activations in torch, forward and backward, for the torch path and the oracle.

    GEMM 1 output z [rows, 2F] (GLU: gate columns first, then up; with ":interleaved" gate n and
    up n are columns 2n and 2n+1) or [rows, F]
      --apply_activation--> h [rows, F]
    dh [rows, F] --activation_backward(z, dh)--> dz [rows, 2F|F]

An activation is a string of types.ACTIVATION_KINDS, with its constants ("swiglu_clamp(alpha=1.702,
beta=1.0,limit=7.0)"). A GLU is h = act(gate) * up_fn(up): this file computes act, up_fn and their
derivatives once per kind, so forward and backward cannot disagree. The Triton kernels compute the
same functions in their epilogues (kernels/gemm_common.py); these are what the torch backend runs
(torch_grouped_mlp.py) and what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import ACTIVATION_KINDS, is_interleaved, parse_activation

aten = torch.ops.aten


def _gate(g: torch.Tensor, kind: str, c: tuple) -> torch.Tensor:
    """act(g) of a kind (the whole activation without GLU, the gate factor with it)."""
    if kind in ("swiglu", "silu"):
        return F.silu(g)
    if kind in ("geglu", "gelu"):
        return F.gelu(g)
    if kind in ("geglu_tanh", "gelu_tanh"):
        return F.gelu(g, approximate="tanh")
    if kind == "relu":
        return F.relu(g)
    if kind == "relu2":
        return F.relu(g).square()
    if kind == "swiglu_clamp":
        alpha, _beta, limit = c
        gc = g.clamp(max=limit)
        return gc * torch.sigmoid(alpha * gc)
    if kind == "geglu_clamp":
        return F.gelu(g.clamp(max=c[1]))
    gate_cap = c[0]  # swiglu_softcap
    return torch.tanh(g / gate_cap) * gate_cap * torch.sigmoid(g)


def _gate_backward(dout: torch.Tensor, g: torch.Tensor, kind: str, c: tuple) -> torch.Tensor:
    """dout * act'(g), through autograd's own derivative kernels where torch has one."""
    if kind in ("swiglu", "silu"):
        return aten.silu_backward(dout, g)
    if kind in ("geglu", "gelu"):
        return aten.gelu_backward(dout, g)
    if kind in ("geglu_tanh", "gelu_tanh"):
        return aten.gelu_backward(dout, g, approximate="tanh")
    if kind == "relu":
        return aten.threshold_backward(dout, g, 0)
    if kind == "relu2":
        return dout * 2 * F.relu(g)
    if kind == "swiglu_clamp":
        alpha, _beta, limit = c
        gc = g.clamp(max=limit)
        s = torch.sigmoid(alpha * gc)
        # clamp passes the gradient where g <= limit, as torch.clamp's backward does.
        return torch.where(g <= limit, dout * (s + alpha * gc * s * (1 - s)), 0.0)
    if kind == "geglu_clamp":
        limit = c[1]
        return torch.where(g <= limit, aten.gelu_backward(dout, g.clamp(max=limit)), 0.0)
    gate_cap = c[0]
    t, s = torch.tanh(g / gate_cap), torch.sigmoid(g)
    return dout * ((1 - t * t) * s + gate_cap * t * s * (1 - s))


def _up(u: torch.Tensor, kind: str, c: tuple) -> torch.Tensor:
    """up_fn(u) of a GLU kind."""
    if kind in ("swiglu_clamp", "geglu_clamp"):
        beta, limit = c[-2:]
        return u.clamp(-limit, limit) + beta
    if kind == "swiglu_softcap":
        up_cap = c[1]
        return torch.tanh(u / up_cap) * up_cap
    return u


def _up_backward(dout: torch.Tensor, u: torch.Tensor, kind: str, c: tuple) -> torch.Tensor:
    if kind in ("swiglu_clamp", "geglu_clamp"):
        limit = c[-1]
        return torch.where((u >= -limit) & (u <= limit), dout, 0.0)
    if kind == "swiglu_softcap":
        t = torch.tanh(u / c[1])
        return dout * (1 - t * t)
    return dout


def _split(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) columns of a GLU's z [rows, 2F] in the activation's layout."""
    if is_interleaved(activation):
        return z[..., 0::2], z[..., 1::2]
    return z.chunk(2, dim=-1)


def _join(d_gate: torch.Tensor, d_up: torch.Tensor, activation: str) -> torch.Tensor:
    """[rows, 2F] of the gate and up columns in the activation's layout (the inverse of _split)."""
    if is_interleaved(activation):
        return torch.stack([d_gate, d_up], dim=-1).flatten(-2)
    return torch.cat([d_gate, d_up], dim=-1)


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """[rows, 2F] -> [rows, F] for GLU activations (gate and up columns in the activation's layout);
    elementwise otherwise."""
    kind, c = parse_activation(activation)
    if ACTIVATION_KINDS[kind][0]:
        gate, up = _split(h, activation)
        return _gate(gate, kind, c) * _up(up, kind, c)
    return _gate(h, kind, c)


def activation_backward(z: torch.Tensor, dh: torch.Tensor, activation: str) -> torch.Tensor:
    """d(apply_activation)/dz applied to dh: z [rows, 2F|F], dh [rows, F] -> dz [rows, 2F|F]."""
    kind, c = parse_activation(activation)
    if ACTIVATION_KINDS[kind][0]:
        gate, up = _split(z, activation)
        d_gate = _gate_backward(dh * _up(up, kind, c), gate, kind, c)
        return _join(d_gate, _up_backward(dh * _gate(gate, kind, c), up, kind, c), activation)
    return _gate_backward(dh, z, kind, c)


__all__ = ["apply_activation", "activation_backward"]
