"""Synthetic multimodal instruction data for the reference Uni-MoE, generated on the fly (no download).

    make_batch(spec, modality, task, batch_size, generator)
        image: a coloured shape on a noisy dark canvas           [B, 3, S, S]
        video: the same object drifting across F frames          [B, F, 3, S, S]
        audio: a tone of one of P pitches pulsed n times, as a   [B, n_frames, n_bins] log spectrogram
        text : the attributes written out as words ("red circle .")
        prompt tokens  = <bos> [modality slots] context? question (3 words)
        answer tokens  = one attribute word (or two for "describe it .") then <eos>

Every question has a small closed answer set, so "chance" is well defined per question type
(`chance_accuracy`): a model that reads the question but not the modality scores exactly that.
All randomness comes from a torch.Generator, so a (seed, step) pair always gives the same batch;
that is what makes checkpoint resume bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

MODALITIES = ("image", "video", "audio", "text")
MODALITY_ID = {m: i for i, m in enumerate(MODALITIES)}

SPECIALS = ("<pad>", "<bos>", "<eos>")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
RGB = {
    "red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.95, 0.1),
    "cyan": (0.1, 0.9, 0.9), "magenta": (0.9, 0.1, 0.9), "white": (0.95, 0.95, 0.95), "orange": (1.0, 0.55, 0.05),
}
SHAPES = ("square", "circle", "triangle", "cross", "hbar", "vbar")
PITCHES = ("do", "re", "mi", "fa", "sol", "la")
# Tone frequencies in Hz, about 1.4x apart so neighbouring pitches land in different STFT bins.
PITCH_HZ = (250.0, 350.0, 500.0, 700.0, 1000.0, 1400.0)
BEATS = ("one", "two", "three", "four")
QUESTION_WORDS = ("what", "colour", "shape", "pitch", "how", "many", "describe", "it", "?", ".")
VOCAB = SPECIALS + COLOURS + SHAPES + PITCHES + BEATS + QUESTION_WORDS
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"], TOKEN_ID["<eos>"]

# Every question is three words so that all prompts of one modality have one length (generation
# batches are built per modality and need no padding).
QUESTIONS = {
    "colour": ("what", "colour", "?"),
    "shape": ("what", "shape", "?"),
    "pitch": ("what", "pitch", "?"),
    "beats": ("how", "many", "?"),
    "describe": ("describe", "it", "."),
}
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "pitch": PITCHES, "beats": BEATS}
# Which questions each modality's data asks; "describe" (a two-word caption) is the stage-1
# alignment task, the single-word questions are the instruction-tuning tasks that accuracy scores.
TASKS = {
    "image": ("colour", "shape"),
    "video": ("colour", "shape"),
    "audio": ("pitch", "beats"),
    "text": ("colour", "shape", "pitch", "beats"),
}


@dataclass(frozen=True)
class DataSpec:
    """Sizes of the synthetic signals (the encoders are built to match)."""

    image_size: int = 16
    video_frames: int = 4
    sample_rate: int = 4000          # Hz; enough for the highest tone (1400 Hz < 2000 Hz Nyquist)
    audio_seconds: float = 0.5
    n_fft: int = 128                 # 31 Hz bins at 4 kHz: the six pitches are 3+ bins apart
    hop: int = 64                    # 32 frames for 0.5 s, so a 4-beat rhythm spans 4+ frames per beat
    noise: float = 0.1               # additive noise std on images and audio: 10% of the signal peak, so
                                     # nothing is read off a single clean pixel, yet every answer is visible

    @property
    def audio_samples(self) -> int:
        return int(self.sample_rate * self.audio_seconds)

    @property
    def audio_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def audio_frames(self) -> int:
        return self.audio_samples // self.hop + 1  # torch.stft with center=True


class Batch(NamedTuple):
    """One batch of a single modality (mixed batches are built by the collator in unimoe.py).

    modality: "image" | "video" | "audio" | "text".
    media: image [B, 3, S, S], video [B, F, 3, S, S], audio [B, frames, bins], or None for text.
    prompt: [B, Lp] int64 text tokens after the modality slots (<bos> is prompt[:, 0]; the model
        inserts the media embeddings right after it).
    answer: [B, La] int64 answer words then <eos> (right-padded with <pad> for captions).
    task: the question type of every row (one list entry per row).
    """

    modality: str
    media: Optional[torch.Tensor]
    prompt: torch.Tensor
    answer: torch.Tensor
    task: list


def _rand(n: int, high: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(high, (n,), generator=g)


def _shape_masks(shape: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[N, size, size] float masks: shape[n] (an index into SHAPES) centred at (cy[n], cx[n]) with
    half-extent r[n] pixels. All six masks are computed and one is picked per row (vectorised)."""
    ax = torch.arange(size, dtype=torch.float32)
    dy = ax[None, :, None] - cy[:, None, None]
    dx = ax[None, None, :] - cx[:, None, None]
    r = r[:, None, None]
    masks = torch.stack([
        (dy.abs() <= r) & (dx.abs() <= r),                                              # square
        dy * dy + dx * dx <= r * r,                                                     # circle
        (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2),                            # triangle, apex up
        ((dy.abs() <= r) & (dx.abs() <= 0.75)) | ((dx.abs() <= r) & (dy.abs() <= 0.75)),  # cross
        (dy.abs() <= 1.0) & (dx.abs() <= r),                                            # hbar
        (dx.abs() <= 1.0) & (dy.abs() <= r),                                            # vbar
    ], 1)                                                                               # [N, 6, S, S]
    return masks[torch.arange(shape.shape[0]), shape].float()


def render_images(
    colour: torch.Tensor, shape: torch.Tensor, spec: DataSpec, g: torch.Generator, frames: int = 0
) -> torch.Tensor:
    """Images [B, 3, S, S] (frames=0) or videos [B, F, 3, S, S] of the object drifting 1 px per frame.

    colour, shape: [B] int64 indices into COLOURS and SHAPES.
    """
    b, s, n = colour.shape[0], spec.image_size, max(frames, 1)
    r = 3.0 + 1.5 * torch.rand(b, generator=g)               # 3..4.5 px: visible at 16x16, fits with drift
    margin = r + 1 + (n - 1)
    cy = margin + torch.rand(b, generator=g) * (s - 1 - 2 * margin)
    cx = margin + torch.rand(b, generator=g) * (s - 1 - 2 * margin)
    v = torch.randint(-1, 2, (b, 2), generator=g).float()
    rgb = torch.tensor([RGB[c] for c in COLOURS])[colour] * (0.85 + 0.15 * torch.rand(b, 1, generator=g))  # [B, 3]
    f = torch.arange(n, dtype=torch.float32)
    cyf = (cy[:, None] + v[:, :1] * f).reshape(-1)
    cxf = (cx[:, None] + v[:, 1:] * f).reshape(-1)
    masks = _shape_masks(shape.repeat_interleave(n), s, cyf, cxf, r.repeat_interleave(n)).view(b, n, 1, s, s)
    img = rgb[:, None, :, None, None] * masks + spec.noise * torch.randn(b, n, 3, s, s, generator=g)
    return img if frames else img[:, 0]


def render_audio(pitch: torch.Tensor, beats: torch.Tensor, spec: DataSpec, g: torch.Generator) -> torch.Tensor:
    """Log-magnitude spectrograms [B, frames, bins] of a tone pulsed `beats + 1` times, plus noise.

    pitch, beats: [B] int64 indices into PITCHES and BEATS.
    """
    b, n = pitch.shape[0], spec.audio_samples
    t = torch.arange(n, dtype=torch.float32) / spec.sample_rate
    freq = torch.tensor(PITCH_HZ)[pitch] * (1.0 + 0.02 * (2 * torch.rand(b, generator=g) - 1))  # +-2% detune
    phase = 2 * math.pi * torch.rand(b, 1, generator=g)
    wave = torch.sin(2 * math.pi * freq[:, None] * t[None] + phase)
    pulses = (beats + 1).float()[:, None]
    # Each pulse fills 60% of its slot, so pulses are separated by silences a few STFT frames long.
    slot = t[None] / spec.audio_seconds * pulses
    envelope = ((slot - slot.floor()) < 0.6).float()
    wave = wave * envelope + spec.noise * torch.randn(b, n, generator=g)
    window = torch.hann_window(spec.n_fft)
    mag = torch.stft(wave, spec.n_fft, spec.hop, window=window, return_complex=True).abs()  # [B, bins, frames]
    return torch.log1p(mag).transpose(1, 2).contiguous()


def _words(words) -> list:
    return [TOKEN_ID[w] for w in words]


def make_batch(spec: DataSpec, modality: str, batch_size: int, g: torch.Generator, tasks=None) -> Batch:
    """A batch of one modality; tasks (question types) are drawn from TASKS[modality] unless given.

    tasks may also contain "describe" (caption the media, or repeat a text's two attribute words),
    the stage-1 alignment task.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tasks = tuple(tasks) if tasks is not None else TASKS[modality]
    allowed = TASKS[modality] + ("describe",)
    bad = [t for t in tasks if t not in allowed]
    if bad:
        raise ValueError(f"tasks {bad} are not asked of {modality} data (allowed: {allowed})")
    rows_task = [tasks[i] for i in _rand(batch_size, len(tasks), g).tolist()]
    # Both attribute pairs are drawn for every row; each row uses the pair its modality/task needs.
    colour, shape = _rand(batch_size, len(COLOURS), g), _rand(batch_size, len(SHAPES), g)
    pitch, beats = _rand(batch_size, len(PITCHES), g), _rand(batch_size, len(BEATS), g)
    visual_text = _rand(batch_size, 2, g) == 0  # which pair a text "describe" row repeats
    media = None
    if modality in ("image", "video"):
        media = render_images(colour, shape, spec, g, frames=spec.video_frames if modality == "video" else 0)
    elif modality == "audio":
        media = render_audio(pitch, beats, spec, g)
    prompts, answers = [], []
    for i, task in enumerate(rows_task):
        vis = [COLOURS[colour[i]], SHAPES[shape[i]]]
        aud = [PITCHES[pitch[i]], BEATS[beats[i]]]
        if modality in ("image", "video"):
            pair, context = vis, []
        elif modality == "audio":
            pair, context = aud, []
        else:
            # Text: the same facts written out; the LLM answers by reading them (what a pretrained
            # LLM brings, and what the connectors must make the media tokens look like).
            visual = task in ("colour", "shape") or (task == "describe" and bool(visual_text[i]))
            pair = vis if visual else aud
            context = pair + ["."]
        attrs = {"colour": pair[0], "shape": pair[1], "pitch": pair[0], "beats": pair[1]}
        ans = pair if task == "describe" else [attrs[task]]
        prompts.append([BOS] + _words(context) + _words(QUESTIONS[task]))
        answers.append(_words(ans) + [EOS])
    width = max(len(a) for a in answers)
    answer = torch.full((batch_size, width), PAD, dtype=torch.int64)
    for i, a in enumerate(answers):
        answer[i, : len(a)] = torch.tensor(a)
    return Batch(modality, media, torch.tensor(prompts, dtype=torch.int64), answer, rows_task)


def chance_accuracy(tasks) -> float:
    """Expected accuracy of guessing uniformly within each question's answer set."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("chance_accuracy needs at least one task")
    return sum(1.0 / len(ANSWERS[t]) for t in tasks) / len(tasks)


__all__ = [
    "MODALITIES", "MODALITY_ID", "VOCAB", "TOKEN_ID", "PAD", "BOS", "EOS", "TASKS", "ANSWERS", "QUESTIONS",
    "DataSpec", "Batch", "make_batch", "render_images", "render_audio", "chance_accuracy",
]
