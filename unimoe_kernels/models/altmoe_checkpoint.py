"""Alt-MoE checkpoints: one file holding a predictor's config, its weights and any plain-data extra.

Data flow:

    save_predictor(predictor, path, extra)
        {"format": CHECKPOINT_FORMAT, "config": AltMoEConfig.to_dict(), "state_dict": CPU tensors,
         "extra": extra} -> torch.save(a temporary file beside path) -> renamed over path
    load_predictor(path, map_location)
        torch.load(weights_only=True) -> format check -> AltMoEConfig.from_dict -> AltMoEPredictor
        on map_location, weights loaded, eval mode -> (predictor, extra)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .altmoe_model import AltMoEConfig, AltMoEPredictor
from .checkpoint import replacing

# The tag names the file format, not the module that writes it, so saved checkpoints stay loadable
# wherever the loader lives.
CHECKPOINT_FORMAT = "unimoe_kernels.altmoe.AltMoEPredictor/1"


def save_predictor(predictor: AltMoEPredictor, path, extra: Optional[dict] = None) -> None:
    """Config + state dict (+ any plain-data `extra`, e.g. how the demo data was made) in one file
    that load_predictor reads back with torch.load(weights_only=True); written beside `path` and
    renamed over it, so a kill leaves the old file or the new one, never half of one."""
    with replacing(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "config": predictor.config.to_dict(),
                    "state_dict": {k: v.detach().cpu() for k, v in predictor.state_dict().items()},
                    "extra": extra or {}}, tmp)


def load_predictor(path, map_location="cpu") -> Tuple[AltMoEPredictor, dict]:
    """(predictor in eval mode on map_location, extra) from a save_predictor file."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an AltMoEPredictor checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    predictor = AltMoEPredictor(AltMoEConfig.from_dict(blob["config"]), device=map_location)
    predictor.load_state_dict(blob["state_dict"])
    return predictor.eval(), blob.get("extra", {})



__all__ = ["CHECKPOINT_FORMAT", "save_predictor", "load_predictor"]
