"""A thin but real Uni-MoE (arXiv 2405.11273) on this package's SparseMoE, small enough for a CPU.

Data flow of one forward (B sequences, D = LLM width, V = vocabulary):

    media --encoders.py--> features --connector--> media embeddings [B, M, D]
    sequence = [<bos>] + media embeddings + prompt words + answer words     [B, L, D] (right-padded)
    token_groups [B, L] = modality id of each position (image/video/audio/text; pads get PAD_GROUP)
    decoder layer x N:  h += Attn(RMSNorm(h))          (RoPE, causal SDPA, optional KV cache)
                        h += FFN(RMSNorm(h), token_groups)
        FFN is, by training stage, in the layers `moe_every` selects:
            "dense"    one SwiGLU MLP (the pretrained LLM's)                       stages 0-1
            "modality" one SwiGLU MLP per modality, each sequence through its own   stage 2
                       modality's copy (modality-specialised FFNs)
            "moe"      SparseMoE.from_dense([ffn_image, ffn_video, ffn_audio, ffn_text]):
                       top-2, fp32 router, LoRA r=8 alpha=16 dropout 0.05 on every expert
                       projection, base frozen, balancing loss 0.01               stage 3
    logits = lm_head(RMSNorm(h))                         [B, L, V]

Training stages (`setup_stage` sets what trains; models/training.py runs them):
    0  stand-in for the pretrained LLaMA: the whole LLM on text-only data (the real recipe starts
       from a pretrained LLM; a tiny random one must first learn to read and answer)
    1  connector alignment: encoders (random stand-ins here, so they train too unless
       `train_encoders=False`) and connectors learn to caption media; the LLM is frozen
    2  modality-specific dense FFNs: each modality's FFN copies train on that modality's data
    3  experts built from the stage-2 FFNs with SparseMoE.from_dense, then LoRA + router tuned on
       mixed multimodal data (everything else frozen)

`moe_impl="naive"` routes every SparseMoE through baselines.naive_loop_moe (the Python loop over
experts of the Uni-MoE v1 / Mixtral code) with the same weights: the demo's comparison.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import baselines
from ..modules import SparseMoE
from . import synthetic_data as sd
from .encoders import AudioConnector, AudioEncoder, ImageEncoder, VisionConnector

FFN_MODES = ("dense", "modality", "moe")
MOE_IMPLS = ("fused", "naive")
# Group id of padding positions: outside the four modality rows of the routing heatmap.
PAD_GROUP = len(sd.MODALITIES)
IGNORE = -100  # F.cross_entropy's default ignore_index


@dataclass
class UniMoEConfig:
    """Sizes of the tiny default (a few minutes for stages 0-3 on 2 CPU cores)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int = 128
    rope_theta: float = 10000.0        # LLaMA's RoPE base
    rms_eps: float = 1e-6              # LLaMA's RMSNorm epsilon
    moe_every: int = 1                 # layer i has an MoE FFN iff (i + 1) % moe_every == 0
    expert_modalities: tuple = sd.MODALITIES  # one expert per modality, built from its stage-2 FFN
    top_k: int = 2
    lora_rank: int = 8                 # Uni-MoE: r=8, alpha=16, dropout 0.05 on every expert
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    aux_loss_coef: float = 0.01        # Uni-MoE 8e's load-balancing coefficient
    moe_backend: str = "auto"
    encoder_width: int = 64
    vit_layers: int = 3
    patch_size: int = 4
    audio_layers: int = 2
    audio_queries: int = 16            # = the image patch count, so every media prompt has one length
    train_encoders: bool = True        # stand-in encoders are random; set False with pretrained ones
    data: sd.DataSpec = field(default_factory=sd.DataSpec)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = sd.DataSpec(**self.data)
        self.expert_modalities = tuple(self.expert_modalities)
        for name in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "moe_every", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} "
                             "even-width heads (RoPE)")
        bad = [m for m in self.expert_modalities if m not in sd.MODALITIES]
        if bad or not self.expert_modalities:
            raise ValueError(
                f"expert_modalities must be a non-empty subset of {sd.MODALITIES}, got {self.expert_modalities}")
        if self.top_k > len(self.expert_modalities):
            raise ValueError(f"top_k={self.top_k} exceeds the {len(self.expert_modalities)} experts")

    @property
    def vocab_size(self) -> int:
        return len(sd.VOCAB)

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_modalities"] = list(self.expert_modalities)
        return d


# Named configurations: "demo" is the tiny default the demo trains; "micro" is smaller still, for tests
# (4 image patches, 4 audio queries, width 32) so every stage runs in about a second on one core.
PRESETS = {
    "demo": {},
    "micro": dict(hidden_size=32, num_heads=2, ffn_hidden_size=64, encoder_width=32, vit_layers=2,
                  patch_size=8, audio_layers=1, audio_queries=4),
}


def preset_config(name: str, **overrides) -> UniMoEConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return UniMoEConfig(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 then cast back, as LLaMA does, so fp16/bf16 runs stay stable.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (LLaMA's rotate-half form). x [B, heads, L, hd], positions [L] int64."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.to(torch.float32)[:, None] * inv[None]               # [L, hd/2]
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class KVCache:
    """Per-layer keys and values [B, heads, L, hd] grown by concatenation during generation."""

    def __init__(self, num_layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * num_layers

    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], 2), torch.cat([self.v[i], v], 2)
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: UniMoEConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.hd, self.theta = cfg.num_heads, d // cfg.num_heads, cfg.rope_theta
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache], layer: int) -> torch.Tensor:
        b, seq, d = x.shape
        split = lambda t: t.view(b, seq, self.heads, self.hd).transpose(1, 2)  # noqa: E731
        q = rope(split(self.q_proj(x)), positions, self.theta)
        k = rope(split(self.k_proj(x)), positions, self.theta)
        v = split(self.v_proj(x))
        past = 0
        if cache is not None:
            past = cache.k[layer].shape[2] if cache.k[layer] is not None else 0
            k, v = cache.update(layer, k, v)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        elif seq == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole cache
        else:
            # New chunk after a cache: query i (absolute past + i) sees keys 0..past + i.
            query_pos = past + torch.arange(seq, device=x.device)
            mask = torch.arange(k.shape[2], device=x.device)[None] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, seq, d))


class SwiGLUMLP(nn.Module):
    """LLaMA's FFN, gate_proj/up_proj/down_proj without bias (the layout SparseMoE.from_dense reads)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ModalityFFNs(nn.Module):
    """Stage 2: one SwiGLU MLP per modality; sequence b goes through ffns[its modality]."""

    def __init__(self, dense: SwiGLUMLP, modalities: Sequence[str]):
        super().__init__()
        self.modalities = tuple(modalities)
        self.ffns = nn.ModuleList(copy.deepcopy(dense) for _ in self.modalities)

    def forward(self, x: torch.Tensor, example_modality: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, m in enumerate(self.modalities):
            rows = (example_modality == sd.MODALITY_ID[m]).nonzero().flatten()  # host sync: stage 2 only
            if rows.numel():
                out = out.index_copy(0, rows, self.ffns[e](x.index_select(0, rows)))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: UniMoEConfig, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp: nn.Module = SwiGLUMLP(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, h, positions, cache, layer, token_groups, example_modality, moe_impl):
        h = h + self.attn(self.attn_norm(h), positions, cache, layer)
        x = self.ffn_norm(h)
        if isinstance(self.mlp, SparseMoE):
            y = baselines.naive_loop_moe(self.mlp, x) if moe_impl == "naive" else self.mlp(x, token_groups=token_groups)
        elif isinstance(self.mlp, ModalityFFNs):
            y = self.mlp(x, example_modality)
        else:
            y = self.mlp(x)
        return h + y


class UniMoE(nn.Module):
    """Encoders + connectors + LLaMA-style decoder whose selected FFNs become SparseMoE in stage 3."""

    def __init__(self, cfg: Optional[UniMoEConfig] = None, *, image_encoder: Optional[nn.Module] = None,
                 audio_encoder: Optional[nn.Module] = None):
        """image_encoder / audio_encoder replace the stand-ins (e.g. a wrapped pretrained CLIP-ViT or
        Whisper encoder). They must keep the stand-ins' interface: image_encoder(images [B, 3, S, S])
        -> [B, P, width] and .encode_video(frames [B, F, 3, S, S]) -> [B, P, width]; audio_encoder(
        spectrogram [B, frames, bins]) -> [B, T, width]; both with a `width` attribute, which sizes
        the connectors. Checkpoints saved by this module then hold their weights too.
        """
        super().__init__()
        cfg = cfg or UniMoEConfig()
        self.cfg = cfg
        spec = cfg.data
        self.image_encoder = image_encoder or ImageEncoder(
            spec.image_size, cfg.patch_size, cfg.encoder_width, cfg.vit_layers)
        self.audio_encoder = audio_encoder or AudioEncoder(
            spec.audio_bins, spec.audio_frames, cfg.encoder_width, cfg.audio_layers)
        for name, enc in (("image_encoder", self.image_encoder), ("audio_encoder", self.audio_encoder)):
            if not isinstance(getattr(enc, "width", None), int):
                raise TypeError(
                    f"{name} must have an int `width` attribute (its feature size), got {type(enc).__name__}")
        self.vision_connector = VisionConnector(self.image_encoder.width, cfg.hidden_size)
        self.audio_connector = AudioConnector(
            self.audio_encoder.width, cfg.hidden_size, cfg.audio_queries, cfg.encoder_width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ffn_mode = "dense"
        self.moe_impl = "fused"

    # ------------------------------------------------------------------ structure per stage

    def moe_layers(self) -> List[DecoderLayer]:
        return [layer for layer in self.layers if layer.is_moe]

    def sparse_moes(self) -> List[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    def to_modality_ffns(self) -> None:
        """Stage 2 start: every MoE-selected layer's dense FFN becomes per-modality copies of it."""
        if self.ffn_mode != "dense":
            raise RuntimeError(f"to_modality_ffns needs ffn_mode 'dense', the model is in {self.ffn_mode!r}")
        for layer in self.moe_layers():
            layer.mlp = ModalityFFNs(layer.mlp, self.cfg.expert_modalities)
        self.ffn_mode = "modality"

    def to_moe(self) -> None:
        """Stage 3 start: SparseMoE.from_dense(the modality FFNs), one expert per modality."""
        if self.ffn_mode != "modality":
            raise RuntimeError(f"to_moe needs ffn_mode 'modality' (stage 2 first), the model is in {self.ffn_mode!r}")
        c = self.cfg
        for layer in self.moe_layers():
            layer.mlp = SparseMoE.from_dense(
                list(layer.mlp.ffns), top_k=c.top_k, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                lora_dropout=c.lora_dropout, aux_loss_coef=c.aux_loss_coef, backend=c.moe_backend,
                max_token_groups=PAD_GROUP + 1,
            )
        self.ffn_mode = "moe"

    def set_ffn_mode(self, mode: str) -> None:
        """Rebuild the structure of `mode` (used before loading a checkpoint of that stage)."""
        if mode not in FFN_MODES:
            raise ValueError(f"ffn_mode must be one of {FFN_MODES}, got {mode!r}")
        if FFN_MODES.index(mode) < FFN_MODES.index(self.ffn_mode):
            raise ValueError(f"cannot go back from ffn_mode {self.ffn_mode!r} to {mode!r}")
        if self.ffn_mode == "dense" and mode != "dense":
            self.to_modality_ffns()
        if self.ffn_mode == "modality" and mode == "moe":
            self.to_moe()

    def set_moe_impl(self, impl: str) -> None:
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        self.moe_impl = impl

    def llm_modules(self) -> List[nn.Module]:
        return [self.embed_tokens, self.layers, self.norm, self.lm_head]

    def setup_stage(self, stage: int) -> List[nn.Parameter]:
        """Convert the FFNs for `stage` if needed, set requires_grad, return the trainable parameters."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        if stage == 2 and self.ffn_mode == "dense":
            self.to_modality_ffns()
        if stage == 3 and self.ffn_mode == "modality":
            self.to_moe()
        want = {0: "dense", 1: "dense", 2: "modality", 3: "moe"}[stage]
        if self.ffn_mode != want:
            raise RuntimeError(f"stage {stage} needs ffn_mode {want!r}, the model is in {self.ffn_mode!r}")
        self.requires_grad_(False)
        if stage == 0:
            for m in self.llm_modules():
                m.requires_grad_(True)
        elif stage == 1:
            self.vision_connector.requires_grad_(True)
            self.audio_connector.requires_grad_(True)
            if self.cfg.train_encoders:
                self.image_encoder.requires_grad_(True)
                self.audio_encoder.requires_grad_(True)
        elif stage == 2:
            for layer in self.moe_layers():
                layer.mlp.requires_grad_(True)
        else:
            for moe in self.sparse_moes():
                moe.router.requires_grad_(True)
                ex = moe.experts
                for name in ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down"):
                    getattr(ex, name).requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ inputs

    def encode_media(self, batch: sd.Batch) -> Optional[torch.Tensor]:
        """Media embeddings [B, M, D] in the LLM's input space, or None for text."""
        if batch.modality == "text":
            return None
        w = self.embed_tokens.weight
        media = batch.media.to(w.device, w.dtype)  # synthetic media are fp32; the model may be bf16
        if batch.modality == "image":
            return self.vision_connector(self.image_encoder(media))
        if batch.modality == "video":
            return self.vision_connector(self.image_encoder.encode_video(media))
        return self.audio_connector(self.audio_encoder(media))

    def build_inputs(self, batches: Sequence[sd.Batch], with_answer: bool = True):
        """Embed and right-pad one or more single-modality batches into one sequence batch.

        Returns (embeds [B, L, D], labels [B, L] (answer token j+1 at position j, else IGNORE),
        token_groups [B, L] int64, example_modality [B] int64, lengths [B]).
        """
        if isinstance(batches, sd.Batch):
            batches = [batches]
        dev = self.embed_tokens.weight.device
        parts = []
        for b in batches:
            prompt = b.prompt.to(dev)
            n = prompt.shape[0]
            media = self.encode_media(b)
            m = 0 if media is None else media.shape[1]
            words = torch.cat([prompt, b.answer.to(dev)], 1) if with_answer else prompt
            emb = self.embed_tokens(words)
            if media is not None:
                emb = torch.cat([emb[:, :1], media.to(emb.dtype), emb[:, 1:]], 1)
            length = emb.shape[1]
            groups = torch.full((n, length), sd.MODALITY_ID["text"], dtype=torch.int64, device=dev)
            groups[:, 1: 1 + m] = sd.MODALITY_ID[b.modality]
            labels = torch.full((n, length), IGNORE, dtype=torch.int64, device=dev)
            lengths = torch.full((n,), length, dtype=torch.int64, device=dev)
            if with_answer:
                ans = b.answer.to(dev)
                start = m + prompt.shape[1]                    # first answer position in the sequence
                tgt = torch.where(ans == sd.PAD, IGNORE, ans)
                labels[:, start - 1: start - 1 + ans.shape[1]] = tgt
                lengths = start + (ans != sd.PAD).sum(1)
                groups = torch.where(torch.arange(length, device=dev)[None] < lengths[:, None], groups, PAD_GROUP)
            mod = torch.full((n,), sd.MODALITY_ID[b.modality], dtype=torch.int64, device=dev)
            parts.append((emb, labels, groups, mod, lengths))
        width = max(p[0].shape[1] for p in parts)
        pad = lambda t, v: F.pad(t, (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1]), value=v)  # noqa: E731
        embeds = torch.cat([pad(p[0], 0.0) for p in parts])
        labels = torch.cat([pad(p[1], IGNORE) for p in parts])
        groups = torch.cat([pad(p[2], PAD_GROUP) for p in parts])
        return embeds, labels, groups, torch.cat([p[3] for p in parts]), torch.cat([p[4] for p in parts])

    # ------------------------------------------------------------------ forward, loss, generate

    def forward(self, embeds: torch.Tensor, token_groups: Optional[torch.Tensor] = None,
                example_modality: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """embeds [B, L, D] (positions continue after `cache`) -> logits [B, L, V] fp32."""
        if embeds.dim() != 3 or embeds.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"embeds must be [B, L, {self.cfg.hidden_size}], got {tuple(embeds.shape)}")
        if self.ffn_mode == "modality" and example_modality is None:
            raise ValueError("example_modality is needed while the model has per-modality FFNs (stage 2)")
        past = cache.length() if cache is not None else 0
        positions = torch.arange(past, past + embeds.shape[1], device=embeds.device)
        h = embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, cache, i, token_groups, example_modality, self.moe_impl)
        return self.lm_head(self.norm(h)).float()

    def loss(self, batches) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (and <eos>) of the batch(es)."""
        embeds, labels, groups, mod, _ = self.build_inputs(batches)
        logits = self(embeds, groups, mod)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def generate(self, batch: sd.Batch, max_new_tokens: int = 3, use_cache: bool = True, return_logits: bool = False):
        """Greedy answers to one single-modality batch: tokens [B, max_new_tokens] (<pad> after <eos>).

        Prompts of one modality all have one length, so no padding is needed. The loop always runs
        max_new_tokens steps (no host check for "all finished"), so the cached and uncached paths
        do exactly the same steps.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        embeds, _, groups, mod, _ = self.build_inputs(batch, with_answer=False)
        b = embeds.shape[0]
        text_group = torch.full((b, 1), sd.MODALITY_ID["text"], dtype=torch.int64, device=embeds.device)
        cache = KVCache(len(self.layers)) if use_cache else None
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        out, step_logits = [], []
        inp, inp_groups = embeds, groups
        for _ in range(max_new_tokens):
            logits = self(inp, inp_groups, mod, cache)[:, -1]
            tok = torch.where(done, sd.PAD, logits.argmax(-1))
            done = done | (tok == sd.EOS)
            out.append(tok)
            step_logits.append(logits)
            new = self.embed_tokens(tok)[:, None]
            if use_cache:
                inp, inp_groups = new, text_group
            else:
                inp, inp_groups = torch.cat([inp, new], 1), torch.cat([inp_groups, text_group], 1)
        tokens = torch.stack(out, 1)
        return (tokens, torch.stack(step_logits, 1)) if return_logits else tokens

    def routing_stats(self) -> torch.Tensor:
        """[modalities, E] int64: expert slots per token modality, summed over the MoE layers."""
        moes = self.sparse_moes()
        if not moes:
            raise RuntimeError("routing_stats needs the stage-3 MoE layers")
        return sum(m.routing_stats() for m in moes)[: len(sd.MODALITIES)]

    def reset_routing_stats(self) -> None:
        for m in self.sparse_moes():
            m.reset_routing_stats()


def answer_accuracy(model: UniMoE, batches: Sequence[sd.Batch], use_cache: bool = True) -> dict:
    """Exact-match accuracy (answer word then <eos>) per modality and overall, with chance levels.

    Each batch must be single-modality; "describe" rows are not scored (they have no closed set).
    """
    was_training = model.training
    model.eval()
    hits, total, per_mod, tasks = 0, 0, {}, []
    for b in batches:
        width = b.answer.shape[1]
        pred = model.generate(b, max_new_tokens=width, use_cache=use_cache).cpu()
        keep = torch.tensor([t != "describe" for t in b.task])
        ok = (pred == b.answer).all(1) & keep
        h, n = int(ok.sum()), int(keep.sum())
        hits, total = hits + h, total + n
        mh, mn = per_mod.get(b.modality, (0, 0))
        per_mod[b.modality] = (mh + h, mn + n)
        tasks += [t for t in b.task if t != "describe"]
    model.train(was_training)
    return {
        "accuracy": hits / max(total, 1),
        "chance": sd.chance_accuracy(tasks) if tasks else 0.0,
        "per_modality": {m: h / max(n, 1) for m, (h, n) in per_mod.items()},
        "examples": total,
    }


__all__ = [
    "UniMoEConfig", "UniMoE", "PRESETS", "preset_config", "RMSNorm", "Attention", "SwiGLUMLP", "ModalityFFNs",
    "DecoderLayer", "KVCache", "rope", "answer_accuracy", "FFN_MODES", "MOE_IMPLS", "PAD_GROUP",
]
