"""Activation strings (types.parse_activation / activation_name) and the torch path's activations
(activations.py) of every kind, against the formulas written out as the model families define them
and against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unimoe_kernels.activations import activation_backward, apply_activation
from unimoe_kernels.types import ACTIVATION_KINDS, activation_name, is_glu, parse_activation

CONSTANTS = {"swiglu_clamp": dict(alpha=1.702, beta=1.0, limit=1.5), "geglu_clamp": dict(beta=0.5, limit=1.5),
             "swiglu_softcap": dict(gate_cap=2.0, up_cap=1.5)}


def naive(z: torch.Tensor, kind: str, c: dict) -> torch.Tensor:
    """Each kind as its model family writes it (gate first, then up)."""
    if ACTIVATION_KINDS[kind][0]:
        g, u = z.chunk(2, dim=-1)
    else:
        g = z
    if kind == "swiglu_clamp":  # gpt-oss / MiniMax-M3 (beta 1), DeepSeek-V4 (alpha 1, beta 0)
        g = g.clamp(min=None, max=c["limit"])
        u = u.clamp(min=-c["limit"], max=c["limit"])
        return (u + c["beta"]) * (g * torch.sigmoid(g * c["alpha"]))
    if kind == "geglu_clamp":  # DeepSeek-V4's gate with a gelu act_fn (beta 0)
        return (u.clamp(-c["limit"], c["limit"]) + c["beta"]) * F.gelu(g.clamp(max=c["limit"]))
    if kind == "swiglu_softcap":  # Inkling2: the sigmoid sees the raw gate
        return (torch.tanh(g / c["gate_cap"]) * c["gate_cap"]) * torch.sigmoid(g) * (
            torch.tanh(u / c["up_cap"]) * c["up_cap"])
    act = {"swiglu": F.silu, "silu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
           "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
           "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu2": lambda x: F.relu(x) ** 2}[kind]
    return act(g) * u if ACTIVATION_KINDS[kind][0] else act(g)


@pytest.mark.parametrize("kind", list(ACTIVATION_KINDS))
def test_forward_and_backward_match_the_family_formula(kind):
    c = CONSTANTS.get(kind, {})
    act = activation_name(kind, **c)
    glu = ACTIVATION_KINDS[kind][0]
    assert is_glu(act) == glu
    # Wide enough to cross every clamp and cap; fp64 so the comparison is exact to rounding.
    z = (torch.randn(64, 16 if glu else 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3)
    z = z.requires_grad_()
    want = naive(z, kind, c)
    dh = torch.randn_like(want)
    (want_dz,) = torch.autograd.grad(want, z, dh)
    got = apply_activation(z.detach(), act)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(activation_backward(z.detach(), dh, act), want_dz, rtol=1e-12, atol=1e-12)


def test_names_round_trip_and_bad_names_are_refused():
    name = activation_name("swiglu_clamp", alpha=1.702, beta=1, limit=7)
    assert name == "swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0)"
    assert parse_activation(name) == ("swiglu_clamp", (1.702, 1.0, 7.0))
    assert parse_activation(" swiglu_softcap( up_cap=2, gate_cap=3 ) ") == ("swiglu_softcap", (3.0, 2.0))
    assert parse_activation("relu2") == ("relu2", ())
    for bad, says in [("tanh", "must be one of"), ("swiglu_clamp", "takes the constants"),
                      ("swiglu(alpha=1)", "takes the constants"), ("swiglu_clamp(alpha=1,beta=0,limit=0)", "positive"),
                      ("swiglu_softcap(gate_cap=inf,up_cap=1)", "finite"), ("swiglu_clamp(alpha=x,beta=0,limit=1)",
                                                                            "name=number")]:
        with pytest.raises(ValueError, match=says):
            parse_activation(bad)
    with pytest.raises(ValueError, match="must be one of"):
        activation_name("swish")


def test_compiled_code_takes_the_activation_as_a_constant():
    """A compiled graph parses an activation string at trace time, as a constant (no graph break,
    no dynamo warning about tracing through a cache)."""
    import warnings

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x * 2 if is_glu("swiglu_clamp(alpha=1.0,beta=0.0,limit=1.0)") else x

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    assert not [w for w in seen if "lru_cache" in str(w.message)], [str(w.message) for w in seen]
