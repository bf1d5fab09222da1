"""Alt-MoE's inputs: frozen unimodal encoders run over paired raw data, and the synthetic demo task.

Data flow:

    encode_modalities({modality: encoder}, {modality: raw inputs})
        each encoder (any callable) over its inputs in batches, no grad -> {modality: [N, D_m] fp32}
    SyntheticPairs(dims, latent_dim, noise, seed)
        z ~ N(0, I_latent) per item -> modality m sees z + noise * eps_m  (raw(n, seed))
        -> RandomEncoder_m (fixed random tanh MLP)  -> {modality: [n, D_m]}  (embeddings(n, seed))
        oracle_recall: retrieval on the raw observations, the ceiling any connector can reach

The embeddings feed altmoe_training.train_alternating and the galleries of altmoe_retrieval. Nothing
here knows the predictor.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Sequence

import torch
import torch.nn as nn


def encode_modalities(
    encoders: Mapping[str, Callable[[Any], torch.Tensor]],
    inputs: Mapping[str, Any],
    *,
    batch_size: int = 1024,
    device=None,
) -> Dict[str, torch.Tensor]:
    """Run each modality's frozen encoder (any callable: a torch module, a sentence-embedding
    model's encode, a lambda) over its inputs (anything sliceable: a tensor, a list of strings) in
    batches, without gradients -> {modality: [N, D_m] fp32}. Row i of every modality is pair i."""
    if set(encoders) != set(inputs):
        raise ValueError(f"encoders and inputs must name the same modalities, got {sorted(encoders)} and "
                         f"{sorted(inputs)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: Dict[str, torch.Tensor] = {}
    n_ref = None
    for name, enc in encoders.items():
        if not callable(enc):
            raise TypeError(f"encoders[{name!r}] must be callable, got {type(enc).__name__}")
        data = inputs[name]
        n = len(data)
        if n_ref is not None and n != n_ref:
            raise ValueError(f"inputs must be paired: {name!r} has {n} items but another modality has {n_ref}")
        n_ref = n
        chunks = []
        with torch.no_grad():
            for i in range(0, n, batch_size):
                e = enc(data[i:i + batch_size])
                e = torch.as_tensor(e)
                if e.dim() != 2 or e.shape[0] != len(data[i:i + batch_size]) or not e.is_floating_point():
                    raise ValueError(f"encoders[{name!r}] must return a floating [batch, D] tensor, got "
                                     f"{e.dtype} {tuple(e.shape)} for a batch of {len(data[i:i + batch_size])}")
                chunks.append(e.detach().float().to(device) if device is not None else e.detach().float())
        if not chunks:
            raise ValueError(f"inputs[{name!r}] is empty")
        out[name] = torch.cat(chunks)
        if out[name].shape[1] != chunks[0].shape[1]:
            raise ValueError(f"encoders[{name!r}] returned different widths across batches")
    return out


class RandomEncoder(nn.Module):
    """A fixed random 2-layer tanh MLP [N, in] -> [N, out]: a stand-in frozen unimodal encoder.

    tanh keeps it smooth and (for out >= in, almost surely) injective, so the map between two such
    encoders of one factor exists and a small connector can learn it."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, generator: torch.Generator):
        super().__init__()
        # Gaussian weights scaled by 1/sqrt(fan_in) keep pre-activations O(1): tanh neither
        # saturates (a near-binary code) nor stays linear (a trivially aligned task).
        self.register_buffer("w1", torch.randn(in_dim, hidden, generator=generator) / math.sqrt(in_dim))
        self.register_buffer("b1", 0.1 * torch.randn(hidden, generator=generator))
        self.register_buffer("w2", torch.randn(hidden, out_dim, generator=generator) / math.sqrt(hidden))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.float() @ self.w1 + self.b1) @ self.w2


class SyntheticPairs:
    """Paired data for the demo: a hidden factor z ~ N(0, I_latent) per item; modality m observes
    it with its own noise (z + noise * eps_m) through its own fixed random encoder.

    Everything follows from `seed`, so a run can be rebuilt from its config (`spec()`). Recall
    ceiling: with noise 0 every pair is exactly matchable; the default noise leaves retrieval hard
    enough (near-duplicate factors in a large gallery) to show progress over training.
    """

    def __init__(self, dims: Mapping[str, int], latent_dim: int = 16, noise: float = 0.1, seed: int = 0,
                 hidden: int = 128):
        if latent_dim < 1 or hidden < 1:
            raise ValueError(f"latent_dim and hidden must be >= 1, got {latent_dim}, {hidden}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.dims, self.latent_dim, self.noise, self.seed, self.hidden = dict(dims), latent_dim, noise, seed, hidden
        g = torch.Generator().manual_seed(seed)
        self.encoders = {m: RandomEncoder(latent_dim, d, hidden, g) for m, d in self.dims.items()}

    def spec(self) -> dict:
        return {"dims": self.dims, "latent_dim": self.latent_dim, "noise": self.noise, "seed": self.seed,
                "hidden": self.hidden}

    def raw(self, n: int, seed: int) -> Dict[str, torch.Tensor]:
        """The unimodal raw inputs of n pairs: {modality: [n, latent_dim]}."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=g)
        return {m: z + self.noise * torch.randn(n, self.latent_dim, generator=g) for m in self.dims}

    def embeddings(self, n: int, seed: int, device=None) -> Dict[str, torch.Tensor]:
        """n pairs encoded by the frozen encoders: {modality: [n, D_m] fp32}."""
        return encode_modalities(self.encoders, self.raw(n, seed), device=device)

    def oracle_recall(self, n: int, seed: int, src: str, tgt: str, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
        """The ceiling a connector can reach on these n pairs: retrieval on the raw observations
        themselves, ranking gallery items by Euclidean distance (the maximum-likelihood match for
        two equal-variance Gaussian noises around one factor). The encoders are injective, so the
        embeddings carry no more information than this."""
        raw = self.raw(n, seed)
        order = torch.cdist(raw[src], raw[tgt]).argsort(dim=1)[:, :max(ks)]
        hit = order == torch.arange(n).view(-1, 1)
        return {f"R@{k}": hit[:, :k].any(dim=1).float().mean().item() for k in ks}


__all__ = ["encode_modalities", "RandomEncoder", "SyntheticPairs"]
