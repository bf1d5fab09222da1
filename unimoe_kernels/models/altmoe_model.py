"""Alt-MoE's connector: AltMoEConfig and AltMoEPredictor, the one MoE between the embedding spaces
of frozen unimodal encoders. The lowest Alt-MoE layer: it imports no other altmoe_* module, and
losses, data, retrieval, training and checkpoints all build on it.

Data flow of AltMoEPredictor.forward(x [N, D_src], direction "src_to_tgt"):

    h = gelu(in_proj[dir](x)) + dir_embed[dir]             [N, W]   per-direction projection
    t = h[None] + task_embed[:, None]                      [2, N, W] task 0 prediction, 1 contrastive
    m = SparseMoE(t)                                       [2, N, W] one call: the same gate and
                                                                     experts route every task's
                                                                     token on its own (multi-gate)
    o[j] = LayerNorm_j(t[j] + m[j])                        [2, N, W] residual + per-task norm
    prediction  = pred_head[dir](o[0])                     [N, D_tgt] -> smooth-L1 vs target
    contrastive = contr_head[dir](o[1])                    [N, D_tgt] -> InfoNCE vs target, and
                                                                        the retrieval query

embed_queries is the search side of the same pass: the contrastive output, L2-normalised, in eval
mode. direction_parameters names what one direction's optimiser steps (altmoe_training.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import SparseMoE
from ..types import MoEAux

TASKS = ("prediction", "contrastive")


# ----------------------------------------------------------------------------------------------
# Configuration and directions
# ----------------------------------------------------------------------------------------------


def direction_name(src: str, tgt: str) -> str:
    return f"{src}_to_{tgt}"


@dataclass
class AltMoEConfig:
    """Everything that defines an AltMoEPredictor; plain data so it goes into checkpoints as a dict.

    dims: embedding width of each modality's frozen encoder, e.g. {"image": 1024, "text": 4096}.
    directions: ordered (src, tgt) pairs to learn; None = every ordered pair of distinct modalities.
    width: the shared width every direction is projected to (M3-JEPA: 2048).
    ffn_hidden_size: hidden width of each 2-layer GELU expert; None = width (as M3-JEPA's experts).
    num_experts, top_k, normalize_topk: 12, 4, False are the released M3-JEPA choice.
    aux_loss_coef: SparseMoE's load-balancing coefficient (0.01, the Switch/Uni-MoE default).
    temperature: InfoNCE temperature (0.03, the released value).
    contrastive_weight, prediction_weight: 1:1 in the paper.
    """

    dims: Dict[str, int]
    directions: Optional[List[Tuple[str, str]]] = None
    width: int = 256
    ffn_hidden_size: Optional[int] = None
    num_experts: int = 12
    top_k: int = 4
    normalize_topk: bool = False
    aux_loss_coef: float = 0.01
    temperature: float = 0.03
    contrastive_weight: float = 1.0
    prediction_weight: float = 1.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.dims, Mapping) or len(self.dims) < 2:
            raise ValueError(f"dims must map at least two modality names to embedding widths, got {self.dims!r}")
        for name, dim in self.dims.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"dims: modality names must be non-empty strings without '.', got {name!r}")
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(f"dims[{name!r}] must be a positive int, got {dim!r}")
        self.dims = dict(self.dims)
        if self.directions is None:
            self.directions = [(s, t) for s in self.dims for t in self.dims if s != t]
        pairs = []
        for pair in self.directions:
            if len(pair) != 2 or pair[0] not in self.dims or pair[1] not in self.dims or pair[0] == pair[1]:
                raise ValueError(f"directions: each must be (src, tgt), two different modalities of dims "
                                 f"{sorted(self.dims)}, got {tuple(pair)!r}")
            pairs.append((pair[0], pair[1]))
        if len(set(pairs)) != len(pairs) or not pairs:
            raise ValueError(f"directions must be a non-empty list without repeats, got {pairs}")
        self.directions = pairs
        for name in ("width", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.contrastive_weight < 0 or self.prediction_weight < 0:
            raise ValueError("contrastive_weight and prediction_weight must be >= 0")

    @property
    def direction_names(self) -> List[str]:
        return [direction_name(s, t) for s, t in self.directions]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["directions"] = [list(p) for p in self.directions]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AltMoEConfig":
        d = dict(d)
        if d.get("directions") is not None:
            d["directions"] = [tuple(p) for p in d["directions"]]
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


class AltMoEOutput(NamedTuple):
    """prediction, contrastive: [N, D_tgt] in the target encoder's space; aux: the MoE's statistics
    over the 2N task tokens (prediction tokens first)."""

    prediction: torch.Tensor
    contrastive: torch.Tensor
    aux: MoEAux


class AltMoEPredictor(nn.Module):
    """The multi-directional MoE connector of the module docstring.

    Parameters: in_proj.<dir> Linear(D_src, W); dir_embed.<dir> [W]; task_embed [2, W] (row 0
    prediction, row 1 contrastive); moe (SparseMoE, W -> W, GELU experts); norms.0/1 LayerNorm(W);
    pred_head.<dir>, contr_head.<dir> Linear(W, D_tgt).
    """

    def __init__(self, config: AltMoEConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, AltMoEConfig):
            raise TypeError(f"config must be an AltMoEConfig, got {type(config).__name__}")
        self.config = config
        w = config.width
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.ModuleDict()
        self.pred_head = nn.ModuleDict()
        self.contr_head = nn.ModuleDict()
        self.dir_embed = nn.ParameterDict()
        for src, tgt in config.directions:
            name = direction_name(src, tgt)
            self.in_proj[name] = nn.Linear(config.dims[src], w, **factory)
            self.pred_head[name] = nn.Linear(w, config.dims[tgt], **factory)
            self.contr_head[name] = nn.Linear(w, config.dims[tgt], **factory)
            # One vector per direction (not an nn.Embedding) so a direction's AdamW never decays
            # the rows of the other directions.
            self.dir_embed[name] = nn.Parameter(torch.zeros(w, **factory))
        self.task_embed = nn.Parameter(torch.empty(len(TASKS), w, **factory))
        n_groups = len(TASKS) * len(config.directions)
        self.moe = SparseMoE(
            w, config.ffn_hidden_size or w, config.num_experts, config.top_k, activation="gelu",
            normalize_topk=config.normalize_topk, aux_loss_coef=config.aux_loss_coef, backend=config.backend,
            max_token_groups=max(16, n_groups), **factory,
        )
        self.norms = nn.ModuleList([nn.LayerNorm(w, **factory) for _ in TASKS])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Task embeddings must differ from the start or the two tasks route identically and the
        # multi-gate has nothing to tell apart; 0.02 is the usual embedding init scale (GPT-2),
        # small next to the GELU projection the embeddings are added to.
        nn.init.normal_(self.task_embed, std=0.02)
        for p in self.dir_embed.values():
            nn.init.normal_(p, std=0.02)

    @property
    def directions(self) -> List[str]:
        return self.config.direction_names

    def direction_parameters(self, direction: str) -> List[nn.Parameter]:
        """The trainable parameters that a step of `direction` updates (shared ones included)."""
        self._check_direction(direction)
        own = [*self.in_proj[direction].parameters(), *self.pred_head[direction].parameters(),
               *self.contr_head[direction].parameters(), self.dir_embed[direction]]
        shared = [self.task_embed, *self.moe.parameters(), *self.norms.parameters()]
        return [p for p in own + shared if p.requires_grad]

    def _check_direction(self, direction: str) -> Tuple[str, str]:
        if direction not in self.in_proj:
            raise ValueError(f"direction must be one of {self.directions}, got {direction!r}")
        return self.config.directions[self.directions.index(direction)]

    def _check_x(self, x: torch.Tensor, direction: str, src: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of {src} embeddings, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        d = self.config.dims[src]
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"x for direction {direction!r} must be [N, {d}] ({src} embeddings), got {tuple(x.shape)}")
        param = self.task_embed
        if x.device != param.device:
            raise ValueError(f"x is on {x.device} but the predictor is on {param.device}")

    def forward(self, x: torch.Tensor, direction: str, *, track_routing: bool = False) -> AltMoEOutput:
        """x [N, D_src] -> AltMoEOutput. track_routing adds the routing of this call to
        moe.routing_stats() under group 2 * direction_index + task."""
        src, _ = self._check_direction(direction)
        self._check_x(x, direction, src)
        x = x.to(self.task_embed.dtype)
        h = F.gelu(self.in_proj[direction](x)) + self.dir_embed[direction]
        tokens = h.unsqueeze(0) + self.task_embed.unsqueeze(1)          # [2, N, W]
        groups = None
        if track_routing:
            d = self.directions.index(direction)
            groups = (len(TASKS) * d + torch.arange(len(TASKS), device=x.device)).view(-1, 1).expand(-1, x.shape[0])
        mixed, aux = self.moe(tokens, return_aux=True, token_groups=groups)
        pred_tok = self.norms[0](tokens[0] + mixed[0])
        contr_tok = self.norms[1](tokens[1] + mixed[1])
        return AltMoEOutput(self.pred_head[direction](pred_tok), self.contr_head[direction](contr_tok), aux)

    @torch.no_grad()
    def embed_queries(self, x: torch.Tensor, direction: str, *, batch_size: int = 4096) -> torch.Tensor:
        """Retrieval queries: the contrastive output [N, D_tgt], L2-normalised, fp32, in batches.

        Runs in eval mode whatever the module's mode was (and restores it), so it never adds an aux
        loss or jitter to a search."""
        src, tgt = self._check_direction(direction)
        self._check_x(x, direction, src)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            outs = [self(x[i:i + batch_size], direction).contrastive.float() for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        out = torch.cat(outs) if outs else x.new_zeros(0, self.config.dims[tgt], dtype=torch.float32)
        return F.normalize(out, dim=-1)


__all__ = ["TASKS", "direction_name", "AltMoEConfig", "AltMoEOutput", "AltMoEPredictor"]
