"""A run's settings: the core every model kind shares (:class:`TrainConfig`) and the sections that
several kinds share (classifier, Gaussian tokens, Gaussian folders, patch, prompt).

Each model kind declares its settings class next to its step (``GViTConfig`` in
:mod:`gvit.train.gvit_step`, ...): the core plus the sections and keys that kind reads, and nothing
else. A run therefore sees, prints and records only its own keys; :mod:`gvit.train.kinds` reads
files and ``key=value`` overrides into the kind's class and refuses a key of another kind with a
one-line error naming the kinds it belongs to. Values are declared and checked through
:mod:`gvit.settings`; ranges are checked by each section's ``check``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..data.captions import CAPTION_KINDS, prompt_templates
from ..models import SIZES
from ..settings import from_mapping, setting, validate_fields

__all__ = ["TrainConfig", "KEYS_BEFORE_THE_SPLIT", "AUGMENTATION_OFF", "ClassifierSettings", "GaussianAugmentation",
           "GaussianTokenSettings", "GaussianFolders", "PatchSettings", "PromptSettings", "model_setting", "require",
           "check_schedule"]


# The keys of the one flat settings class every run recorded before settings were split by kind
# (a checkpoint of that time holds all of them; :meth:`TrainConfig.from_record` keeps its kind's).
KEYS_BEFORE_THE_SPLIT = frozenset("""
align_text base_lr batch_size beta1 beta2 cache_gaussians checkpoint_every classifier_from classifier_lr_scale
classifier_size clip_size code_dim code_gradient codebook_decay codebook_size commitment crop_scale_min data
device embed_dim encoder encoder_patch encoder_size epochs eval_split finetune_from fit_lr fit_steps g0_layout
gamma geometry_bits grad_clip guidance guidance_every guidance_from guidance_lr hflip image_colors image_size
lambda_cls lambda_perc layer_decay learned_queries limit_eval limit_train log_every max_bad_steps
measure_guidance model neighbour_layers num_gaussians num_tokens num_workers offline_eval offline_input
offline_train out patch perceptual_from pixel_loss pool precision pretrain_until probe_images prompt
refine_depth refine_features refine_residual refine_rounds sample_image scale_factor seed stage1 stem_depth
stem_pooling stem_tokens stem_width steps teacher text_length text_vocab token_features token_neighbours
tokenizer tokenizer_blocks tokenizer_channels train_split warmup weight_decay""".split())


def model_setting(kind: str):
    """The ``model`` field of a kind's settings class (its default is the kind's name)."""
    return setting(kind, "model kind (gvit.train.kinds.KINDS)")


def check_schedule(cfg, schedule: type) -> None:
    """A schedule section's own checks (``PerceptualSchedule``, ``Phases``: their ``__post_init__``)
    on a run's settings, the error prefixed ``config:``."""
    try:
        schedule.__post_init__(cfg)
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None


def require(cfg, *, positive=(), non_negative=(), optional_positive=()) -> None:
    """Range checks naming the key: ``positive`` values >= 1 (ints) or > 0 (floats), ``non_negative``
    >= 0, ``optional_positive`` positive or None."""
    for key in positive:
        value = getattr(cfg, key)
        if (value < 1) if isinstance(value, int) else not value > 0:
            raise ValueError(f"config: {key} must be {'>= 1' if isinstance(value, int) else '> 0'}, got {value}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ValueError(f"config: {key} must be >= 0, got {getattr(cfg, key)}")
    for key in optional_positive:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ValueError(f"config: {key} must be > 0 (or null), got {value}")


@dataclass
class TrainConfig:
    """The settings every run shares: data, steps, batch, optimiser, schedule, augmentation, logging and
    output. A kind's settings class extends it (build one with :func:`gvit.train.make_config` or
    :func:`gvit.train.load_config`); ``kind`` is that kind's name."""

    kind = None  # set by each kind's settings class

    # data
    data: str = setting("shapes", "dataset: shapes[:N], a folder with <split>.zip or <split>/, an ImageFolder, CIFAR")
    train_split: str = setting("train", "split to train on")
    eval_split: str = setting("test", "split to evaluate on (train, val or test)")
    val_every: int = setting(0, "carve the val split from the training images: every n-th image of each class, "
                                "left out of training (0: none; a folder with its own val/ uses it)")
    image_size: int = setting(32, "model input size (images are resized to it, square)")
    limit_train: int | None = setting(None, "train on this many images spread over the split")
    limit_eval: int | None = setting(None, "evaluate on this many images spread over the split")
    num_workers: int = setting(0, "data loader worker processes")
    model: str = model_setting("gvit")
    # optimisation (``epochs``, when set, replaces ``steps`` by ceil(epochs * train images / batch_size))
    steps: int = setting(1000, "optimisation steps")
    epochs: float | None = setting(None, "train for this many epochs instead of steps")
    batch_size: int = setting(128, "global batch size (split over torchrun processes)")
    base_lr: float = setting(1e-3, "learning rate for batch 256 (scaled linearly with the batch)")
    weight_decay: float = setting(0.05, "AdamW weight decay (matrices only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    warmup: float = setting(0.05, "linear warm-up, as a fraction of training")
    lr_floor: float = setting(0.0, "the cosine decays to this fraction of the peak learning rate (0: to 0), so late "
                                   "phases (GViT's joint and guidance steps) still learn")
    grad_clip: float | None = setting(None, "clip each model's gradient norm to this")
    max_bad_steps: int = setting(20, "stop after this many steps with NaN/inf losses or gradients")
    # augmentation
    crop_scale_min: float = setting(0.5, "random resized crops keep at least this fraction of the area")
    hflip: bool = setting(True, "random horizontal flips")
    # run
    seed: int = setting(0, "seed of the weights, data order, augmentation and g0")
    out: str = setting("runs/train", "run folder (checkpoint.pt, metrics.jsonl, result.json)")
    log_every: int = setting(20, "steps between metric lines (every guidance step gets one too)")
    eval_every: int = setting(0, "every n steps, a classifier's top-1 and loss on up to 512 val images and as many "
                                 "training images, logged for the curves (0: off; needs a val split)")
    checkpoint_every: int = setting(200, "steps between checkpoints")
    device: str = setting("auto", "device", ("auto", "cpu", "cuda"))
    precision: str = setting("fp32", "arithmetic on CUDA: plain fp32 (measured the accurate choice, "
                                     "docs/results/gpu.md) or bf16 autocast (CPU is always fp32)", ("fp32", "bf16"))

    def __post_init__(self) -> None:
        if self.kind is None:
            raise TypeError("TrainConfig is the core the kinds' settings extend; build a run's settings with "
                            "gvit.train.make_config(model=..., ...)")
        validate_fields(self)
        if self.model != self.kind:
            raise ValueError(f"config: these are model={self.kind} settings, got model={self.model!r}")
        self.check()

    def check(self) -> None:
        """Range checks of the core; each section's ``check`` adds its own and calls this one."""
        require(self, positive=("image_size", "steps", "batch_size", "log_every", "checkpoint_every",
                                "max_bad_steps", "base_lr"),
                non_negative=("num_workers", "val_every", "eval_every"), optional_positive=("epochs", "grad_clip"))
        for key in ("limit_train", "limit_eval"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be >= 1 (or null), got {getattr(self, key)}")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError(f"config: lr_floor must be in [0, 1], got {self.lr_floor}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"config: crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.eval_every and not (self.val_every or self.eval_split == "val"):
            raise ValueError("config: eval_every draws its curves on the val split; set val_every > 0 (or "
                             "eval_split=val)")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of this kind's settings (the core's and its own)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_record(cls, values: dict, *, where: str = "checkpoint"):
        """The settings a checkpoint or run folder recorded. Runs recorded before settings were split
        by kind hold every kind's keys (:data:`KEYS_BEFORE_THE_SPLIT`); those this kind does not have
        are dropped (they did nothing). Any other key is refused, naming it."""
        if not isinstance(values, dict) or values.get("model", "gvit") != cls.kind:
            got = values.get("model", "gvit") if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{where}: not a model={cls.kind} run (model={got!r})")
        foreign = KEYS_BEFORE_THE_SPLIT - set(cls.keys())
        return from_mapping(cls, {k: v for k, v in values.items() if k not in foreign}, where=f"{where} config")

    def with_epochs_as_steps(self, train_images: int) -> "TrainConfig":
        """``epochs`` turned into ``steps`` for a training set of ``train_images`` images."""
        if self.epochs is None:
            return self
        return replace(self, steps=max(1, math.ceil(self.epochs * train_images / self.batch_size)), epochs=None)

    def for_training_set(self, train_images: int) -> tuple["TrainConfig", list[str]]:
        """The settings a run on ``train_images`` training images trains with (``epochs`` as steps; a
        kind may resolve more), and a line for each setting that this changed beyond the steps."""
        return self.with_epochs_as_steps(train_images), []

    def to_dict(self) -> dict:
        """The recorded settings: the core and this kind's keys."""
        return asdict(self)


@dataclass
class PatchSettings:
    """A patch-based vision tower (the patch ViT, GViT's denoising encoder, CLIP's image tower)."""

    patch: int = setting(4, "patch size of the patch ViT (and, unless encoder_patch is set, of GViT's denoising "
                            "encoder; model=clip: of the image tower)")

    def check(self) -> None:
        super().check()
        if self.patch < 1 or self.image_size % self.patch:
            raise ValueError(f"config: patch must be >= 1 and divide image_size {self.image_size}, got {self.patch}")


@dataclass
class ClassifierSettings(PatchSettings):
    """A classifier trained with cross-entropy (patch ViT, Gaussian classifier, GViT's classifier)."""

    classifier_size: str = setting("tiny", "size of the classifier", SIZES)
    pool: str = setting("cls", "classifier pooling", ("cls", "mean"))
    classifier_lr_scale: float = setting(1.0, "the classifier's learning rate, as a multiple of the schedule's")
    layer_decay: float = setting(1.0, "layer-wise lr decay of the classifier (1: none)")
    drop_path: float = setting(0.0, "stochastic depth of the classifier's transformer: the last block's rate, "
                                    "rising linearly from 0 at the first (0: off)")

    def check(self) -> None:
        super().check()
        require(self, positive=("classifier_lr_scale",))
        if not 0 < self.layer_decay <= 1 or not 0 <= self.drop_path < 1:
            raise ValueError(f"config: layer_decay must be in (0, 1] and drop_path in [0, 1), got {self.layer_decay}, "
                             f"{self.drop_path}")


# the values of the augmentation settings in Gaussian space that turn each off (their defaults)
AUGMENTATION_OFF = {"gaussian_crop_min": 1.0, "token_drop": 0.0, "color_jitter": 0.0, "gaussian_noise": 0.0}


@dataclass
class GaussianAugmentation:
    """Augmentation in Gaussian space of the training steps that read Gaussians (:func:`gvit.data.transforms
    .augment_pairs`; an image paired with the Gaussians gets the same crop and colour jitter)."""

    gaussian_crop_min: float = setting(1.0, "training steps that read Gaussians (cached, live or saved): random "
                                            "resized crops in Gaussian space keep at least this fraction of the area "
                                            "(1: none)")
    token_drop: float = setting(0.0, "training steps that read Gaussians (cached, live or saved): drop this share "
                                     "of the Gaussians at random (token dropout)")
    color_jitter: float = setting(0.0, "training steps that read Gaussians (cached, live or saved): scale colours "
                                       "by 1 + this x u, u uniform in [-1, 1] per image and channel")
    augment_min_epochs: float = setting(0.0, "the augmentation in Gaussian space (gaussian_crop_min, token_drop, "
                                             "color_jitter, gaussian_noise) acts only in a run whose classifier sees "
                                             "each training image at least this many times (its training steps x "
                                             "batch_size / training images); in a shorter run it is off (0: always)")

    def check(self) -> None:
        super().check()
        require(self, non_negative=("color_jitter", "augment_min_epochs"))
        if not 0 < self.gaussian_crop_min <= 1 or not 0 <= self.token_drop < 1:
            raise ValueError(f"config: gaussian_crop_min must be in (0, 1] and token_drop in [0, 1), got "
                             f"{self.gaussian_crop_min}, {self.token_drop}")

    def pair_augmentation(self) -> dict:
        """The keywords of :func:`gvit.data.transforms.augment_pairs` these settings ask for."""
        return dict(crop_scale_min=self.gaussian_crop_min, drop=self.token_drop, color_jitter=self.color_jitter)

    def classifier_steps(self) -> int:
        """The run's steps that train on Gaussians (every step; GViT: from ``classifier_from`` on)."""
        return self.steps

    def for_training_set(self, train_images: int):
        """As :meth:`TrainConfig.for_training_set`, with the augmentation in Gaussian space off where the
        classifier sees each training image fewer than ``augment_min_epochs`` times."""
        cfg, notes = super().for_training_set(train_images)
        epochs = cfg.classifier_steps() * cfg.batch_size / max(train_images, 1)
        off = {key: value for key, value in AUGMENTATION_OFF.items()
               if hasattr(cfg, key) and getattr(cfg, key) != value}
        if epochs >= cfg.augment_min_epochs or not off:
            return cfg, notes
        return replace(cfg, **off), [*notes, f"augmentation in Gaussian space off ({', '.join(off)}): the classifier "
                                             f"sees each training image {epochs:.1f} times, fewer than "
                                             f"augment_min_epochs={cfg.augment_min_epochs:g}"]



@dataclass
class GaussianTokenSettings(GaussianAugmentation):
    """Gaussians as the classifier's tokens (GViT, and the classifier on saved Gaussians)."""

    num_gaussians: int = setting(64, "Gaussians per image (k)")
    scale_factor: float = setting(1.0, "c in scale = c * sigmoid(s)")
    token_features: str = setting("raw", "Gaussian classifier tokens: a linear map of the raw 9 values, or an MLP on "
                                         "splat features (Fourier centre, log-covariance, colour, opacity)",
                                  ("raw", "splat"))
    token_neighbours: int = setting(0, "Gaussian classifier: each token first reads its n nearest Gaussians through "
                                       "neighbour_layers EdgeConv layers (0: off)")
    neighbour_layers: int = setting(2, "Gaussian classifier: EdgeConv layers when token_neighbours > 0")
    neighbour_pool: str = setting("point", "EdgeConv: max over neighbours before the activation (once per point) "
                                           "or over per-edge activations (DGCNN's order)", ("point", "edge"))
    gaussian_noise: float = setting(0.0, "classifier training steps (cached, live or saved Gaussians): Gaussian "
                                         "noise of this std on every raw value")

    def check(self) -> None:
        super().check()
        require(self, positive=("num_gaussians", "scale_factor"), non_negative=("token_neighbours", "neighbour_layers",
                                                                                "gaussian_noise"))

    def augments_gaussians(self) -> bool:
        """Whether any augmentation in Gaussian space is on."""
        return any(getattr(self, key) != off for key, off in AUGMENTATION_OFF.items())

    def gaussian_augmentation(self) -> dict:
        """The keywords of :func:`gvit.data.transforms.augment_gaussians` these settings ask for."""
        return dict(scale_factor=self.scale_factor, noise=self.gaussian_noise, **self.pair_augmentation())


@dataclass
class GaussianFolders:
    """Gaussians saved by ``gvit fit-dataset`` (the offline classifier, GaussianVision's stages)."""

    offline_train: str | None = setting(None, "a gvit fit-dataset folder to train on")
    offline_eval: str | None = setting(None, "a gvit fit-dataset folder to evaluate on")

    def check(self) -> None:
        super().check()
        if not self.offline_train:
            raise ValueError(f"config: model={self.kind} needs offline_train (a folder written by gvit fit-dataset)")


@dataclass
class PromptSettings:
    """Captions of labelled images and zero-shot prompts (CLIP and GaussianVision's stages)."""

    prompt: str = setting("a photo of a {}.", "caption of a labelled image ({} = class name), and the zero-shot "
                                              "prompt; several templates separated by | are a prompt ensemble for "
                                              "zero-shot (captions use the first)")
    captions: str = setting("prompt", "captions of labelled images without captions of their own: prompt (the class "
                                      "prompt) or attributes (a random part of the class's attributes, "
                                      "gvit.data.captions.CLASS_ATTRIBUTES; zero-shot prompts then name each class "
                                      "by its full description)", CAPTION_KINDS)
    unseen_classes: str = setting("", "classes held out of training, comma-separated names: their images and "
                                      "captions never train (teacher, stages); evaluation reports zero-shot on them "
                                      "(top1_unseen among them, top1_held_out among all classes) and top1_seen")

    def check(self) -> None:
        super().check()
        try:
            prompt_templates(self.prompt)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None

    def unseen(self) -> list[str]:
        """The names in ``unseen_classes``."""
        return [name.strip() for name in self.unseen_classes.split(",") if name.strip()]
