"""Reference models built on the package's layers.

    unimoe.py          UniMoE: encoders + connectors + LLaMA-style decoder with SparseMoE FFNs
    encoders.py        ViT image/video encoder, Whisper-like audio encoder, MLP and Q-Former connectors
    synthetic_data.py  on-the-fly multimodal instruction data (shapes, colours, tones, rhythms, words)
    training.py        the training stages 0-3, evaluation set, safetensors checkpoints and resume
    altmoe.py             Alt-MoE, the module to import: re-exports the Alt-MoE modules below
    altmoe_model.py       the multi-directional MoE connector and its config
    altmoe_losses.py      InfoNCE + smooth-L1 per direction
    altmoe_data.py        frozen encoders -> paired embeddings; the synthetic two-encoder task
    altmoe_retrieval.py   vector store, batched cosine search, Recall@k
    altmoe_training.py    alternating training, one direction and its own AdamW per step
    altmoe_checkpoint.py  predictor checkpoints (config + weights in one file)
"""

from .altmoe import AltMoEConfig, AltMoEPredictor, train_alternating
from .altmoe_retrieval import VectorStore
from .training import eval_batches, load_model, save_checkpoint, stage_batches, train_stage
from .unimoe import UniMoE, UniMoEConfig, answer_accuracy

__all__ = [
    "UniMoE", "UniMoEConfig", "answer_accuracy", "train_stage", "stage_batches", "eval_batches",
    "save_checkpoint", "load_model", "AltMoEConfig", "AltMoEPredictor", "train_alternating", "VectorStore",
]
