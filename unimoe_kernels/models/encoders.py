"""Modality encoders and connectors of the reference Uni-MoE, small enough for a CPU.

    image [B, 3, S, S] --ImageEncoder (ViT: patches + [CLS] + pre-norm blocks)--> penultimate-layer
        patch features [B, P, De]  (CLIP-ViT as LLaVA / Uni-MoE use it: layer -2, [CLS] dropped)
    video [B, F, 3, S, S] --same ImageEncoder per frame--> [B, F, P, De] --mean over F--> [B, P, De]
    image/video features --VisionConnector (Linear-GELU-Linear)--> [B, P, D]    (D = LLM width)
    audio [B, frames, bins] --AudioEncoder (Whisper-like: 2 convs, the 2nd stride 2, sinusoidal
        positions, pre-norm blocks)--> [B, frames/2, Da]
    audio features --AudioConnector (Q-Former-style: Q learned queries, self-attn, cross-attn to the
        audio features, FFN; then Linear)--> [B, Q, D]

The interfaces are the real ones (a pretrained CLIP / Whisper can stand in if it returns the same
feature shapes), only the sizes are tiny. They are plain torch modules; the package's kernels are
in the LLM's MoE layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(width: int, heads: int) -> nn.TransformerEncoderLayer:
    # Pre-norm GELU blocks with a 4x MLP, as CLIP-ViT and Whisper use; dropout 0 as when frozen.
    return nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True)


class ImageEncoder(nn.Module):
    """ViT: forward(images [B, 3, S, S]) -> patch features [B, (S/patch)^2, width] from `select_layer`.

    select_layer=-2 takes the output of the penultimate block (LLaVA's and Uni-MoE's choice); the
    blocks after it are kept for interface fidelity but not run.
    """

    def __init__(self, image_size: int = 16, patch_size: int = 4, width: int = 64, layers: int = 3,
                 heads: int = 4, select_layer: int = -2):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if not -layers <= select_layer < layers:
            raise ValueError(f"select_layer must index one of the {layers} blocks, got {select_layer}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.num_patches = (image_size // patch_size) ** 2
        self.select_layer = select_layer % layers
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, self.num_patches + 1, width) * 0.02)
        self.pre_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_block(width, heads) for _ in range(layers))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)             # [B, P, W]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.pre_norm(x)
        for blk in self.blocks[: self.select_layer + 1]:
            x = blk(x)
        return x[:, 1:]                                                      # drop [CLS]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, F, 3, S, S] -> per-frame patch features averaged over frames [B, P, width]."""
        if frames.dim() != 5:
            raise ValueError(f"frames must be [B, F, 3, S, S], got {tuple(frames.shape)}")
        b, f = frames.shape[:2]
        feats = self(frames.reshape(b * f, *frames.shape[2:]))
        return feats.view(b, f, *feats.shape[1:]).mean(dim=1)


def _sinusoids(length: int, width: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions [length, width]."""
    half = width // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    ang = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class AudioEncoder(nn.Module):
    """Whisper-like: forward(spectrogram [B, frames, bins]) -> features [B, ceil(frames/2), width]."""

    def __init__(self, n_bins: int = 65, max_frames: int = 64, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.n_bins, self.width = n_bins, width
        self.conv1 = nn.Conv1d(n_bins, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)  # 2x time subsampling, as Whisper
        self.register_buffer("pos", _sinusoids((max_frames + 1) // 2, width), persistent=False)
        self.blocks = nn.ModuleList(_block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        if spec.dim() != 3 or spec.shape[-1] != self.n_bins:
            raise ValueError(f"spectrogram must be [B, frames, {self.n_bins}], got {tuple(spec.shape)}")
        x = F.gelu(self.conv1(spec.transpose(1, 2)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)                            # [B, T/2, W]
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"spectrogram has {spec.shape[1]} frames, more than this encoder's max")
        x = x + self.pos[: x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionConnector(nn.Module):
    """LLaVA-1.5 / Uni-MoE projector: Linear -> GELU -> Linear, [B, P, in] -> [B, P, D]."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_width, out_width)
        self.fc2 = nn.Linear(out_width, out_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(feats)))


class AudioConnector(nn.Module):
    """Q-Former-style: Q learned queries read the audio features, then a projection to the LLM width.

    forward(feats [B, T, in]) -> [B, Q, D]. One block: query self-attention, cross-attention to the
    features, GELU MLP (pre-norm, residual); Uni-MoE's speech path uses a BLIP-2 Q-Former the same way.
    """

    def __init__(self, in_width: int, out_width: int, num_queries: int = 16, width: int = 64, heads: int = 4):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.kv_proj = nn.Linear(in_width, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.proj = nn.Linear(width, out_width)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        kv = self.kv_proj(feats)
        q = self.queries.expand(feats.shape[0], -1, -1)
        h = self.norm1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm2(q), kv, kv, need_weights=False)[0]
        q = q + self.mlp(self.norm3(q))
        return self.proj(q)


__all__ = ["ImageEncoder", "AudioEncoder", "VisionConnector", "AudioConnector"]
