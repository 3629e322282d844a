"""Training GViT and its baselines, split by job (MAE / nanoGPT style):

* :mod:`~gvit.train.config`: ``TrainConfig`` and ``load_config`` (YAML + ``key=value``);
* :mod:`~gvit.train.data`: seeded step batches, image collate, datasets of a config;
* :mod:`~gvit.train.optim`: AdamW groups from the models' own declarations, lr schedule, the guarded step;
* :mod:`~gvit.train.checkpoint`: atomic checkpoints read with ``weights_only=True``;
* :mod:`~gvit.train.steps`: one step object per model kind and the one map from ``cfg.model`` to it;
* :mod:`~gvit.train.loop`: ``train``, ``evaluate``, ``load_trained``.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import MODELS, TrainConfig, apply_overrides, load_config
from .data import step_generator
from .loop import TrainedRun, evaluate, evaluate_checkpoint, load_gvit, load_trained, train, train_or_reuse
from .optim import learning_rate, param_groups
from .steps import MODEL_KINDS, build_gvit, model_kind, model_step

__all__ = ["TrainConfig", "MODELS", "load_config", "apply_overrides", "train", "train_or_reuse", "evaluate",
           "evaluate_checkpoint", "load_trained", "load_gvit", "TrainedRun", "load_checkpoint", "save_checkpoint", "step_generator",
           "learning_rate", "param_groups", "MODEL_KINDS", "model_kind", "model_step", "build_gvit"]
