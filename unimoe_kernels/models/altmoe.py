"""Alt-MoE (arXiv 2409.05929, later M3-JEPA): one MoE connector between the embedding spaces of
frozen unimodal encoders, trained one direction per step, so vectors can be searched across
modalities. Retrieval (vector store, top-k search, Recall@k) lives in altmoe_retrieval.py.

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

Training (train_alternating): every step picks ONE direction (round-robin, or at random with
probabilities that favour the direction with the lower validation Recall@1), samples a batch of
paired embeddings, and steps that direction's own AdamW (own moments, own LR schedule) over the
parameters that direction uses (its projections and heads plus the shared MoE, embeddings and
norms). Loss = InfoNCE(tau=0.03, symmetric, L2-normalised) + smooth-L1, 1:1.

Frozen encoders are any callables from raw inputs to [N, D] embeddings (encode_modalities);
SyntheticPairs builds the default demo: one hidden factor seen by two fixed random encoders.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

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


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs: pred [N, D], target [N, D], row i of each a pair.

    Both sides are L2-normalised; logits = cos / temperature; the loss averages cross-entropy of
    pred -> target (which target is mine) and target -> pred (which prediction is mine). fp32.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be [N, D] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    logits = p @ t.t() / temperature
    labels = torch.arange(p.shape[0], device=p.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class AltMoELoss(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    prediction: torch.Tensor


def altmoe_loss(out: AltMoEOutput, target: torch.Tensor, config: AltMoEConfig) -> AltMoELoss:
    """InfoNCE on the contrastive output + smooth-L1 of the prediction output against the target
    embedding [N, D_tgt], weighted by the config (1:1 by default). The MoE's balancing loss is not
    in `total`: SparseMoE already feeds it to the router through backward."""
    if target.shape != out.prediction.shape:
        raise ValueError(f"target must be [N, D_tgt] = {tuple(out.prediction.shape)}, got {tuple(target.shape)}")
    contr = info_nce(out.contrastive, target, config.temperature)
    pred = F.smooth_l1_loss(out.prediction.float(), target.float())
    total = config.contrastive_weight * contr + config.prediction_weight * pred
    return AltMoELoss(total, contr, pred)


# ----------------------------------------------------------------------------------------------
# Frozen encoders and the synthetic demo
# ----------------------------------------------------------------------------------------------


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
        raise ValueError(f"encoders and inputs must name the same modalities, got {sorted(encoders)} and {sorted(inputs)}")
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
        return {"dims": self.dims, "latent_dim": self.latent_dim, "noise": self.noise, "seed": self.seed, "hidden": self.hidden}

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


# ----------------------------------------------------------------------------------------------
# Alternating optimisation
# ----------------------------------------------------------------------------------------------


class DirectionSampler:
    """Which direction trains next.

    round_robin: d0, d1, ..., d0, ... . adaptive: random, p_d proportional to
    (1 - R@1_d + smoothing), mixed with a uniform floor, re-weighted at every update() from
    validation recall: the direction that lags gets more steps, none is ever starved.
    """

    def __init__(self, directions: Sequence[str], mode: str = "round_robin", *, seed: int = 0,
                 smoothing: float = 0.05, floor: float = 0.1):
        if mode not in ("round_robin", "adaptive"):
            raise ValueError(f"schedule must be 'round_robin' or 'adaptive', got {mode!r}")
        if not directions:
            raise ValueError("directions must not be empty")
        if not 0.0 <= floor <= 1.0 or smoothing <= 0:
            raise ValueError(f"need 0 <= floor <= 1 and smoothing > 0, got {floor}, {smoothing}")
        self.directions, self.mode, self.smoothing, self.floor = list(directions), mode, smoothing, floor
        self.probs = [1.0 / len(self.directions)] * len(self.directions)
        self._rng = random.Random(seed)
        self._i = 0

    def next(self) -> str:
        if self.mode == "round_robin":
            d = self.directions[self._i % len(self.directions)]
            self._i += 1
            return d
        return self._rng.choices(self.directions, weights=self.probs)[0]

    def update(self, recall_at_1: Mapping[str, float]) -> None:
        if self.mode != "adaptive":
            return
        need = [max(0.0, 1.0 - float(recall_at_1[d])) + self.smoothing for d in self.directions]
        total, n = sum(need), len(self.directions)
        self.probs = [(1 - self.floor) * x / total + self.floor / n for x in need]


def lr_lambda(step: int, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to final_ratio at total_steps (held after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DirectionOptim:
    """One direction's optimiser settings (M3-JEPA gives each direction its own)."""

    lr: float = 1.5e-3          # M3-JEPA's peak LR for both directions
    warmup_frac: float = 0.1    # of the run's steps; M3-JEPA warms up t2i for 10% of its run
    final_lr_ratio: float = 0.01  # cosine floor, 1% of peak (M3-JEPA goes 1.5e-3 -> 5.5e-6; on a
                                  # short run a slightly higher floor keeps the last steps useful)
    weight_decay: float = 0.01


@dataclass
class TrainHistory:
    """Everything train_alternating measured. evals: one dict per evaluation with step, recall
    ({direction: {"R@1": .., "R@5": .., "R@10": ..}}), mean losses since the last eval, the
    sampler's probabilities and each direction's LR; steps_per_direction: how often each trained."""

    evals: List[dict] = field(default_factory=list)
    steps_per_direction: Dict[str, int] = field(default_factory=dict)
    schedule: str = "round_robin"

    def final_recall(self) -> Dict[str, Dict[str, float]]:
        return self.evals[-1]["recall"] if self.evals else {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_paired(emb: Mapping[str, torch.Tensor], config: AltMoEConfig, name: str) -> int:
    n = None
    for m, d in config.dims.items():
        if m not in emb:
            raise ValueError(f"{name} lacks modality {m!r}; it has {sorted(emb)}")
        e = emb[m]
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[1] != d or not e.is_floating_point():
            got = f"{e.dtype} {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name}[{m!r}] must be a floating [N, {d}] tensor, got {got}")
        if n is not None and e.shape[0] != n:
            raise ValueError(f"{name} must be paired (the same N for every modality), got {e.shape[0]} and {n}")
        n = e.shape[0]
    if not n:
        raise ValueError(f"{name} is empty")
    return n


def train_alternating(
    predictor: AltMoEPredictor,
    train: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int = 128,
    schedule: str = "round_robin",
    optim: Optional[Mapping[str, DirectionOptim]] = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = False,
    on_eval: Optional[Callable[[dict], None]] = None,
) -> TrainHistory:
    """Alternating training of `predictor` on paired embeddings {modality: [N, D_m]}.

    Each of `steps` steps trains one direction (schedule "round_robin" or "adaptive"), on a batch of
    `batch_size` pairs drawn without replacement within an epoch. Every `eval_every` steps (and at
    the end) Recall@1/5/10 of every direction is measured on `val` (queries through the predictor,
    gallery = the target modality's val embeddings); the adaptive sampler re-weights from it.
    Host syncs happen only at evaluations, so on a GPU the steps between them queue freely.
    """
    from .altmoe_retrieval import evaluate_directions  # the retrieval side imports this module

    cfg = predictor.config
    n_train = _check_paired(train, cfg, "train")
    _check_paired(val, cfg, "val")
    if steps < 1 or batch_size < 2 or eval_every < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 2 (InfoNCE needs negatives), eval_every >= 1; "
                         f"got {steps}, {batch_size}, {eval_every}")
    batch_size = min(batch_size, n_train)
    directions = predictor.directions
    optim = dict(optim or {})
    unknown = set(optim) - set(directions)
    if unknown:
        raise ValueError(f"optim names unknown directions {sorted(unknown)}; directions are {directions}")
    settings = {d: optim.get(d, DirectionOptim()) for d in directions}
    device = predictor.task_embed.device
    train = {m: t.to(device) for m, t in train.items()}
    val = {m: t.to(device) for m, t in val.items()}

    optimizers = {}
    for d in directions:
        # Each direction has its own AdamW state even for the shared MoE: the directions' gradients
        # differ in scale, and one set of moments would let the louder direction shrink the
        # other's effective step.
        optimizers[d] = torch.optim.AdamW(predictor.direction_parameters(d), lr=settings[d].lr,
                                          weight_decay=settings[d].weight_decay)

    def set_lrs(step: int) -> None:
        # The schedules run on the global step (not on each direction's own count) so an adaptive
        # sampler that rarely picks a direction does not leave it stuck in warm-up; each
        # direction keeps its own peak, warm-up and floor. Set by hand rather than with LambdaLR,
        # which warns when a direction's scheduler advances on a step its optimiser skipped.
        for d in directions:
            s = settings[d]
            lr = s.lr * lr_lambda(step, steps, int(s.warmup_frac * steps), s.final_lr_ratio)
            for group in optimizers[d].param_groups:
                group["lr"] = lr

    set_lrs(0)
    sampler = DirectionSampler(directions, schedule, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Index permutations live on the data's device: one copy per epoch, none per step.
    perms = {d: torch.randperm(n_train, generator=gen).to(device) for d in directions}
    cursor = {d: 0 for d in directions}
    loss_sums = {d: torch.zeros(3, device=device) for d in directions}
    loss_counts = {d: 0 for d in directions}
    history = TrainHistory(steps_per_direction={d: 0 for d in directions}, schedule=schedule)

    def evaluate(step: int) -> None:
        recall = evaluate_directions(predictor, val)
        sampler.update({d: recall[d]["R@1"] for d in directions})
        losses = {}
        for d in directions:
            if loss_counts[d]:
                tot, con, pre = (loss_sums[d] / loss_counts[d]).tolist()
                losses[d] = {"total": tot, "contrastive": con, "prediction": pre}
            loss_sums[d].zero_()
            loss_counts[d] = 0
        record = {
            "step": step, "recall": recall, "loss": losses,
            "probs": dict(zip(directions, sampler.probs)),
            "lr": {d: optimizers[d].param_groups[0]["lr"] for d in directions},
        }
        history.evals.append(record)
        if on_eval is not None:
            on_eval(record)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"altmoe train ({schedule})", unit="step")
    predictor.train()
    evaluate(0)
    for step in range(1, steps + 1):
        d = sampler.next()
        src, tgt = predictor.config.directions[directions.index(d)]
        if cursor[d] + batch_size > n_train:
            perms[d] = torch.randperm(n_train, generator=gen).to(device)
            cursor[d] = 0
        idx = perms[d][cursor[d]:cursor[d] + batch_size]
        cursor[d] += batch_size

        set_lrs(step - 1)
        predictor.zero_grad(set_to_none=True)
        out = predictor(train[src].index_select(0, idx), d)
        loss = altmoe_loss(out, train[tgt].index_select(0, idx), cfg)
        loss.total.backward()
        optimizers[d].step()
        loss_sums[d] += torch.stack([loss.total, loss.contrastive, loss.prediction]).detach()
        loss_counts[d] += 1
        history.steps_per_direction[d] += 1
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            predictor.train()
            if bar is not None:
                bar.set_postfix({f"R@1 {k}": f"{v['R@1']:.2f}" for k, v in history.evals[-1]["recall"].items()})
    if bar is not None:
        bar.close()
    predictor.eval()
    return history




# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "unimoe_kernels.altmoe.AltMoEPredictor/1"


def save_predictor(predictor: AltMoEPredictor, path, extra: Optional[dict] = None) -> None:
    """Config + state dict (+ any plain-data `extra`, e.g. how the demo data was made) in one file
    that load_predictor reads back with torch.load(weights_only=True)."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": predictor.config.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in predictor.state_dict().items()},
                "extra": extra or {}}, path)


def load_predictor(path, map_location="cpu") -> Tuple[AltMoEPredictor, dict]:
    """(predictor in eval mode on map_location, extra) from a save_predictor file."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an AltMoEPredictor checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    predictor = AltMoEPredictor(AltMoEConfig.from_dict(blob["config"]), device=map_location)
    predictor.load_state_dict(blob["state_dict"])
    return predictor.eval(), blob.get("extra", {})


__all__ = [
    "AltMoEConfig", "AltMoEPredictor", "AltMoEOutput", "AltMoELoss", "info_nce", "altmoe_loss",
    "encode_modalities", "RandomEncoder", "SyntheticPairs", "DirectionSampler", "DirectionOptim",
    "TrainHistory", "train_alternating", "direction_name", "lr_lambda", "TASKS", "save_predictor",
    "load_predictor",
]
