"""Reference models built on the package's layers.

    unimoe.py          UniMoE: encoders + connectors + LLaMA-style decoder with SparseMoE FFNs
    encoders.py        ViT image/video encoder, Whisper-like audio encoder, MLP and Q-Former connectors
    synthetic_data.py  on-the-fly multimodal instruction data (shapes, colours, tones, rhythms, words)
    training.py        the training stages 0-3, evaluation set, safetensors checkpoints and resume
    altmoe.py          Alt-MoE: multi-directional MoE connector, losses, alternating training
    altmoe_retrieval.py  vector store, batched cosine search, Recall@k
"""

from .altmoe import AltMoEConfig, AltMoEPredictor, train_alternating
from .altmoe_retrieval import VectorStore
from .unimoe import UniMoE, UniMoEConfig, answer_accuracy
from .training import eval_batches, load_model, save_checkpoint, stage_batches, train_stage

__all__ = [
    "UniMoE", "UniMoEConfig", "answer_accuracy", "train_stage", "stage_batches", "eval_batches",
    "save_checkpoint", "load_model", "AltMoEConfig", "AltMoEPredictor", "train_alternating", "VectorStore",
]
