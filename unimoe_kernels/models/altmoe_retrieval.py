"""Latent retrieval for Alt-MoE: a vector store of gallery embeddings, cosine top-k search, Recall@k.

Data flow of one cross-modal search, direction src_to_tgt:

    gallery: frozen tgt encoder -> [G, D_tgt] -> VectorStore (L2-normalised fp32, ids [G])
             (built once, saved to / loaded from disk: .pt torch.save, .npz numpy, .safetensors)
    queries: frozen src encoder -> [Q, D_src] -> AltMoEPredictor.embed_queries -> [Q, D_tgt] unit
    search:  per batch of queries, scores = q @ gallery.T  [B, G] -> top-k -> (scores, ids) [Q, k]
    Recall@k: fraction of queries whose true id is among their k results

The gallery holds the target encoder's own vectors, not the predictor's: a store built once serves
every predictor checkpoint, and new items are indexed without running the connector.

Only altmoe_model is imported here, so the training loop can measure recall through this module
without either importing the other back.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .altmoe_model import AltMoEPredictor
from .checkpoint import replacing

STORE_FORMAT = "unimoe_kernels.altmoe.VectorStore/1"
DEFAULT_KS = (1, 5, 10)


class SearchResult(NamedTuple):
    """scores: [Q, k] fp32 cosine similarities, best first; ids: [Q, k] int64 gallery ids;
    k = min(requested k, gallery size)."""

    scores: torch.Tensor
    ids: torch.Tensor


class VectorStore:
    """Gallery embeddings [N, D] (stored L2-normalised, fp32) with int64 ids [N] and a modality tag.

    assume_normalized skips the normalisation (load() uses it so a round trip is bit-exact:
    normalising unit vectors again moves their last bits)."""

    def __init__(self, embeddings: torch.Tensor, ids: Optional[torch.Tensor] = None, *, modality: str = "",
                 assume_normalized: bool = False):
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor [N, D], got {type(embeddings).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] < 1:
            raise ValueError(f"embeddings must be [N, D] with D >= 1, got {tuple(embeddings.shape)}")
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings: the gallery is empty; a vector store needs at least one vector")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating, got {embeddings.dtype}")
        n = embeddings.shape[0]
        if ids is None:
            ids = torch.arange(n, device=embeddings.device)
        ids = torch.as_tensor(ids)
        if ids.shape != (n,) or ids.is_floating_point():
            raise ValueError(f"ids must be an integer tensor [N={n}], got {ids.dtype} {tuple(ids.shape)}")
        emb = embeddings.detach().float()
        self.embeddings = emb if assume_normalized else F.normalize(emb, dim=-1)
        self.ids = ids.to(device=embeddings.device, dtype=torch.int64)
        self.modality = str(modality)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device) -> "VectorStore":
        return VectorStore(self.embeddings.to(device), self.ids.to(device), modality=self.modality,
                           assume_normalized=True)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """By suffix: .npz (numpy), .safetensors (when installed), anything else torch.save; written
        beside `path` and renamed over it, so a kill leaves the old file or the new one."""
        with replacing(path) as tmp:
            self._save(tmp)

    def _save(self, path: str) -> None:
        emb, ids = self.embeddings.cpu().contiguous(), self.ids.cpu().contiguous()
        if path.endswith(".npz"):
            import numpy as np
            np.savez(path, embeddings=emb.numpy(), ids=ids.numpy(), modality=np.array(self.modality),
                     format=np.array(STORE_FORMAT))
        elif path.endswith(".safetensors"):
            from safetensors.torch import save_file
            meta = {"format": STORE_FORMAT, "modality": self.modality}
            save_file({"embeddings": emb, "ids": ids}, path, metadata=meta)
        else:
            torch.save({"format": STORE_FORMAT, "embeddings": emb, "ids": ids, "modality": self.modality}, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location="cpu") -> "VectorStore":
        path = os.fspath(path)
        if path.endswith(".npz"):
            import numpy as np
            with np.load(path, allow_pickle=False) as z:
                fmt, modality = str(z["format"]), str(z["modality"])
                emb, ids = torch.from_numpy(z["embeddings"]), torch.from_numpy(z["ids"])
        elif path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                emb, ids = f.get_tensor("embeddings"), f.get_tensor("ids")
            fmt, modality = meta.get("format", ""), meta.get("modality", "")
        else:
            # weights_only: a gallery file is data, so loading it must not run pickled code.
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict):
                raise ValueError(f"{path} is not a saved VectorStore")
            fmt, modality = blob.get("format", ""), blob.get("modality", "")
            emb, ids = blob.get("embeddings"), blob.get("ids")
        if fmt != STORE_FORMAT:
            raise ValueError(f"{path} is not a saved VectorStore (format {fmt!r}, expected {STORE_FORMAT!r})")
        return cls(emb.to(map_location), ids.to(map_location), modality=modality, assume_normalized=True)

    # -- search --------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int = 10, *, batch_size: int = 1024) -> SearchResult:
        """Cosine top-k of queries [Q, D] -> SearchResult [Q, min(k, N)], in batches of queries so
        the score matrix is at most [batch_size, N] at a time."""
        if not isinstance(queries, torch.Tensor) or not queries.is_floating_point():
            raise TypeError(f"queries must be a floating torch.Tensor [Q, {self.dim}], got "
                            f"{queries.dtype if isinstance(queries, torch.Tensor) else type(queries).__name__}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be [Q, {self.dim}] to match the gallery's dimension, got {tuple(queries.shape)}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        k = min(k, len(self))
        q = F.normalize(queries.detach().to(device=self.device, dtype=torch.float32), dim=-1)
        scores, idx = [], []
        for i in range(0, q.shape[0], batch_size):
            s, j = torch.topk(q[i:i + batch_size] @ self.embeddings.t(), k, dim=1)
            scores.append(s)
            idx.append(j)
        if not scores:
            empty = torch.zeros(0, k, device=self.device)
            return SearchResult(empty, empty.to(torch.int64))
        return SearchResult(torch.cat(scores), self.ids[torch.cat(idx)])


def recall_at_k(retrieved: torch.Tensor, truth: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """retrieved [Q, K] ids best first, truth [Q] -> {"R@k": fraction of rows with truth in the
    first k}. k > K counts all K columns (the whole gallery when K was clamped to its size)."""
    if retrieved.dim() != 2 or truth.shape != (retrieved.shape[0],):
        raise ValueError(
            f"retrieved must be [Q, K] and truth [Q], got {tuple(retrieved.shape)} and {tuple(truth.shape)}")
    if retrieved.shape[0] == 0:
        raise ValueError("recall_at_k needs at least one query")
    hit = retrieved == truth.to(retrieved.device).view(-1, 1)
    return {f"R@{k}": hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def evaluate_direction(
    predictor: AltMoEPredictor,
    queries: torch.Tensor,
    gallery: VectorStore,
    direction: str,
    truth: Optional[torch.Tensor] = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
) -> Dict[str, float]:
    """Recall@k of src embeddings `queries` [Q, D_src] mapped through `predictor` and searched in
    `gallery` (tgt embeddings). truth [Q]: each query's gallery id; None = query i pairs with id i."""
    q = predictor.embed_queries(queries, direction, batch_size=batch_size)
    if q.shape[1] != gallery.dim:
        raise ValueError(
            f"direction {direction!r} predicts {q.shape[1]}-d vectors but the gallery holds {gallery.dim}-d ones")
    res = gallery.search(q, max(ks), batch_size=batch_size)
    if truth is None:
        truth = torch.arange(q.shape[0], device=res.ids.device)
    return recall_at_k(res.ids, truth, ks)


def evaluate_directions(
    predictor: AltMoEPredictor,
    embeddings: Mapping[str, torch.Tensor],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
) -> Dict[str, Dict[str, float]]:
    """Recall@k of every direction of the predictor on paired embeddings {modality: [N, D_m]}:
    queries are the src rows, the gallery the tgt rows, row i pairs with row i."""
    out = {}
    for (src, tgt), d in zip(predictor.config.directions, predictor.directions):
        store = VectorStore(embeddings[tgt], modality=tgt)
        out[d] = evaluate_direction(predictor, embeddings[src], store, d, ks=ks, batch_size=batch_size)
    return out


__all__ = ["VectorStore", "SearchResult", "recall_at_k", "evaluate_direction", "evaluate_directions",
           "STORE_FORMAT", "DEFAULT_KS"]
