"""Training GViT and its baselines, split by job (MAE / nanoGPT style):

* :mod:`~gvit.train.config`: the settings every run shares (``TrainConfig``) and the shared sections;
* :mod:`~gvit.train.kinds`: the registry of model kinds, ``make_config`` and ``load_config``
  (YAML + ``key=value``, a key of another kind refused);
* one file per kind, its settings class beside its step: ``gvit_step``, ``patch_vit_step``,
  ``offline_step``, ``tokenizer_step``, ``clip_step``, ``splat_distill_step``, ``splat_align_step``
  (all derive from :class:`~gvit.train.base.ModelStep`);
* :mod:`~gvit.train.data`: seeded step batches, image collate, datasets of a config;
* :mod:`~gvit.train.optim`: AdamW groups from the models' own declarations, lr schedule, the guarded step;
* :mod:`~gvit.train.checkpoint`: atomic checkpoints read with ``weights_only=True``;
* :mod:`~gvit.train.teacher` and :mod:`~gvit.train.embedding_eval`: GaussianVision's teacher and
  embedding measures;
* :mod:`~gvit.train.loop`: ``train``, ``evaluate``, ``load_trained``.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import step_generator
from .gvit_model import build_gvit
from .gvit_step import GViTConfig
from .kinds import (
    KINDS,
    MODELS,
    as_kind,
    config_from_dict,
    kind_of,
    load_config,
    make_config,
    model_step,
    with_overrides,
)
from .loop import TrainedRun, evaluate, evaluate_checkpoint, load_gvit, load_trained, train, train_or_reuse, val_top1
from .optim import learning_rate, param_groups

__all__ = ["TrainConfig", "GViTConfig", "KINDS", "MODELS", "kind_of", "make_config", "load_config", "config_from_dict",
           "with_overrides", "as_kind", "train", "train_or_reuse", "evaluate", "evaluate_checkpoint", "load_trained",
           "load_gvit", "TrainedRun", "load_checkpoint", "save_checkpoint", "step_generator", "learning_rate",
           "param_groups", "model_step", "build_gvit", "val_top1"]
