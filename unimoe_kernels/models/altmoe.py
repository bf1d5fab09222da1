"""Alt-MoE (arXiv 2409.05929, later M3-JEPA): one MoE connector between the embedding spaces of
frozen unimodal encoders, trained one direction per step, so vectors can be searched across
modalities. This module is the one to import: it re-exports every public name of the Alt-MoE
modules below except retrieval's, which stay in altmoe_retrieval.py.

    altmoe_model.py       AltMoEConfig, AltMoEPredictor (the connector), AltMoEOutput, TASKS,
                          direction_name
    altmoe_losses.py      info_nce, altmoe_loss, AltMoELoss
    altmoe_data.py        encode_modalities (frozen encoders -> embeddings), RandomEncoder,
                          SyntheticPairs (the demo task)
    altmoe_retrieval.py   VectorStore, cosine top-k search, Recall@k
    altmoe_training.py    train_alternating, DirectionSampler, DirectionOptim, lr_lambda, TrainHistory
    altmoe_checkpoint.py  save_predictor, load_predictor, CHECKPOINT_FORMAT

Layers, each importing only the ones before it: altmoe_model; then altmoe_losses, altmoe_data,
altmoe_retrieval and altmoe_checkpoint; then altmoe_training; then this module.

Data flow end to end:

    raw pairs -> frozen encoders (encode_modalities) -> {modality: [N, D_m]}
    train_alternating: every step picks ONE direction (round-robin, or at random with probabilities
        that favour the direction with the lower validation Recall@1), samples a batch of paired
        embeddings, runs AltMoEPredictor(x [N, D_src], direction) -> prediction and contrastive
        [N, D_tgt], and steps that direction's own AdamW (own moments, own LR schedule) on
        altmoe_loss = InfoNCE(tau=0.03, symmetric, L2-normalised) + smooth-L1, 1:1
    search: AltMoEPredictor.embed_queries -> VectorStore of the target encoder's vectors -> top-k
    save_predictor / load_predictor: config + weights in one file
"""

from __future__ import annotations

from .altmoe_checkpoint import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT
from .altmoe_checkpoint import load_predictor, save_predictor
from .altmoe_data import RandomEncoder, SyntheticPairs, encode_modalities
from .altmoe_losses import AltMoELoss, altmoe_loss, info_nce
from .altmoe_model import TASKS, AltMoEConfig, AltMoEOutput, AltMoEPredictor, direction_name
from .altmoe_training import DirectionOptim, DirectionSampler, TrainHistory, lr_lambda, train_alternating

__all__ = [
    "AltMoEConfig", "AltMoEPredictor", "AltMoEOutput", "AltMoELoss", "info_nce", "altmoe_loss",
    "encode_modalities", "RandomEncoder", "SyntheticPairs", "DirectionSampler", "DirectionOptim",
    "TrainHistory", "train_alternating", "direction_name", "lr_lambda", "TASKS", "save_predictor",
    "load_predictor",
]
