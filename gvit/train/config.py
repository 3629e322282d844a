"""``TrainConfig``: every setting of a training run, declared once (:mod:`gvit.settings`).

``gvit train --config FILE key=value ...`` fills it (:func:`load_config`); a checkpoint stores it
and :func:`gvit.train.load_trained` rebuilds it. The phase-schedule keys (``classifier_from``,
``gamma``, ...) are those of :class:`gvit.guidance.Phases`, which this class extends.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

from ..gaussians import G0_LAYOUTS
from ..data.captions import prompt_templates
from ..guidance import Phases
from ..losses import RECONSTRUCTION_LOSSES
from ..models import SIZES, TOKENIZER_KINDS
from ..models.splat_stem import STEM_POOLINGS
from ..settings import apply_overrides, from_mapping, load_settings, setting, validate_fields

__all__ = ["TrainConfig", "MODELS", "OFFLINE_INPUTS", "load_config", "apply_overrides", "config_from_dict"]

MODELS = ("gvit", "patch_vit", "offline", "tokenizer", "clip", "splat_distill", "splat_align")  # what each is: gvit.train.steps.MODEL_KINDS
OFFLINE_INPUTS = ("gaussians", "renders")
ENCODERS = ("denoise", "refine")


@dataclass
class TrainConfig(Phases):
    """Every setting of a run (the phase keys come from :class:`gvit.guidance.Phases`)."""

    # data
    data: str = setting("shapes", "dataset: shapes[:N], a folder with <split>.zip or <split>/, an ImageFolder, CIFAR")
    train_split: str = setting("train", "split to train on")
    eval_split: str = setting("test", "split to evaluate on")
    image_size: int = setting(32, "model input size (images are resized to it, square)")
    limit_train: int | None = setting(None, "train on this many images spread over the split")
    limit_eval: int | None = setting(None, "evaluate on this many images spread over the split")
    num_workers: int = setting(0, "data loader worker processes")
    # model
    model: str = setting("gvit", "model kind", MODELS)
    encoder: str = setting("denoise", "Gaussian encoder: the paper's denoising ViT over patches and g0 tokens, or "
                                      "the refinement encoder (CNN features and residuals read at each Gaussian, "
                                      "refine_rounds rounds)", ENCODERS)
    encoder_size: str = setting("tiny", "size of the Gaussian encoder (refine: width and heads of each round)", SIZES)
    refine_rounds: int = setting(3, "encoder=refine: refinement rounds")
    refine_depth: int = setting(2, "encoder=refine: transformer blocks per round")
    refine_residual: bool = setting(True, "encoder=refine: each round also reads the current render's residual")
    refine_features: int = setting(64, "encoder=refine: channels of the CNN feature map the Gaussians read")
    token_features: str = setting("raw", "Gaussian classifier tokens: a linear map of the raw 9 values, or an MLP on "
                                         "splat features (Fourier centre, log-covariance, colour, opacity)",
                                  ("raw", "splat"))
    token_neighbours: int = setting(0, "Gaussian classifier: each token first reads its n nearest Gaussians through "
                                       "neighbour_layers EdgeConv layers (0: off)")
    neighbour_layers: int = setting(2, "Gaussian classifier: EdgeConv layers when token_neighbours > 0")
    cache_gaussians: bool = setting(False, "GViT: the classifier-only phase (pretrain_until) reads the frozen "
                                           "encoder's Gaussians of the whole training set, encoded once, in random "
                                           "batches (flips applied to the Gaussians; needs crop_scale_min=1)")
    fit_steps: int = setting(0, "GViT: test-time fitting steps (Adam on the MSE, fast rasterizer) that refine the "
                                "encoder's Gaussians before the classifier reads them; 0: none")
    fit_lr: float = setting(2.0, "GViT: step sizes of the test-time fitting steps, as multiples of gvit fit's")
    classifier_size: str = setting("tiny", "size of the classifier", SIZES)
    patch: int = setting(4, "patch size of the patch ViT and (unless encoder_patch is set) of the Gaussian encoder")
    encoder_patch: int | None = setting(None, "patch size of the Gaussian encoder")
    num_gaussians: int = setting(64, "Gaussians per image (k)")
    g0_layout: str = setting("uniform", "how g0's means are drawn (uniform as the paper, or a jittered grid)",
                             G0_LAYOUTS)
    scale_factor: float = setting(1.0, "c in scale = c * sigmoid(s)")
    learned_queries: bool = setting(False, "the encoder starts from learned queries instead of g0 (refine: learned "
                                                   "centres)")
    sample_image: bool = setting(False, "Gaussian tokens also see the image through g0's footprint")
    image_colors: bool = setting(False, "g0's colours are read from the image at its centres")
    pool: str = setting("cls", "classifier pooling", ("cls", "mean"))
    offline_train: str | None = setting(None, "model=offline: a gvit fit-dataset folder to train on")
    offline_eval: str | None = setting(None, "model=offline: a gvit fit-dataset folder to evaluate on")
    offline_input: str = setting("gaussians", "model=offline: the classifier reads the Gaussians, or a patch ViT "
                                              "their renders", OFFLINE_INPUTS)
    # model=tokenizer (GaussianToken and the plain VQ baseline: gvit.models.Tokenizer)
    tokenizer: str = setting("gaussian", "model=tokenizer: vq (A, plain VQ on the encoder grid), gaussian (B, "
                                         "GaussianToken), gaussian_fixed (C, fixed geometry), gaussian_bits (D, "
                                         "geometry quantised too)", TOKENIZER_KINDS)
    num_tokens: int = setting(64, "model=tokenizer: tokens per image (a square for vq and gaussian_fixed)")
    codebook_size: int = setting(1024, "model=tokenizer: codes in the codebook")
    code_dim: int = setting(3, "model=tokenizer: values per code (channels of the splatted map)")
    tokenizer_channels: int = setting(64, "model=tokenizer: channels of the CNN encoder and decoder")
    tokenizer_blocks: int = setting(1, "model=tokenizer: residual blocks per resolution in encoder and decoder")
    geometry_bits: int = setting(4, "model=tokenizer, gaussian_bits: bits per geometry value")
    commitment: float = setting(0.25, "model=tokenizer: weight of the commitment loss")
    codebook_decay: float = setting(0.8, "model=tokenizer: EMA decay of the codebook")
    code_gradient: str = setting("rotation", "model=tokenizer: the encoder's gradient through the quantiser",
                                 ("rotation", "straight_through"))
    # model=clip (an RGB CLIP trained on captioned pixels: the offline teacher of GaussianVision's stages)
    clip_size: str = setting("micro", "model=clip: size of both towers", SIZES)
    embed_dim: int = setting(64, "model=clip: width of the joint image-text embedding")
    text_length: int = setting(16, "model=clip: tokens per caption ([BOS] ... [EOS], padded or cut)")
    text_vocab: int = setting(1000, "model=clip: size of the byte-level BPE vocabulary learned from the training "
                                    "captions")
    prompt: str = setting("a photo of a {}.", "model=clip: caption of a labelled image ({} = class name), and the "
                                              "zero-shot prompt; several templates separated by | are a prompt "
                                              "ensemble for zero-shot (captions use the first)")
    # model=splat_distill (GaussianVision stage 1: a splat stem learns to stand in for the teacher's patches)
    teacher: str | None = setting(None, "model=splat_distill / splat_align: the RGB CLIP whose image embeddings the "
                                        "stem learns to match: a model=clip checkpoint, or a transformers CLIP folder "
                                        "(with its tokenizer; prompt is then this run's)")
    stage1: str | None = setting(None, "model=splat_align: the model=splat_distill checkpoint to start from (none: "
                                       "a new stem, the no-stage-1 ablation)")
    align_text: bool = setting(False, "model=splat_align: also train the last text block, text norm and projection")
    probe_images: int = setting(5000, "model=splat_distill / splat_align: training items whose frozen embeddings the "
                                      "evaluation's kNN and linear probe are fitted on (0: none)")
    stem_tokens: int = setting(64, "model=splat_distill: tokens the splat stem gives the vision tower (M)")
    stem_width: int = setting(128, "model=splat_distill: width inside the splat stem")
    stem_depth: int = setting(4, "model=splat_distill: Perceiver resampler layers")
    stem_pooling: str = setting("perceiver", "model=splat_distill: how the stem pools N splats into M tokens",
                                STEM_POOLINGS)
    # transfer (gvit finetune): start from a GViT checkpoint, encoder frozen, classifier with
    # layer-wise lr decay (Table A.1b); the head is new when the number of classes differs
    finetune_from: str | None = setting(None, "start from this GViT checkpoint (encoder frozen)")
    layer_decay: float = setting(1.0, "layer-wise lr decay of the classifier (1: none)")
    # losses and phases (the phase fractions and weights: see gvit.guidance.Phases)
    pixel_loss: str = setting("bce", "pixel term of the reconstruction loss", RECONSTRUCTION_LOSSES)
    guidance: bool = setting(True, "constructive guidance steps in the last phase")
    guidance_lr: float | None = setting(None, "encoder learning rate on guidance steps as a fraction of the peak lr "
                                              "(base_lr * batch / 256); none: the schedule's")
    measure_guidance: bool = setting(False, "log what each guidance step did (gradient norms, Gaussian shift, loss "
                                            "changes); one more encoder backward and forward per guidance step")
    # optimisation (``epochs``, when set, replaces ``steps`` by ceil(epochs * train images / batch_size))
    steps: int = setting(1000, "optimisation steps")
    epochs: float | None = setting(None, "train for this many epochs instead of steps")
    batch_size: int = setting(128, "global batch size (split over torchrun processes)")
    base_lr: float = setting(1e-3, "learning rate for batch 256 (scaled linearly with the batch)")
    weight_decay: float = setting(0.05, "AdamW weight decay (matrices only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    classifier_lr_scale: float = setting(1.0, "the classifier's learning rate, as a multiple of the schedule's")
    warmup: float = setting(0.05, "linear warm-up, as a fraction of training")
    grad_clip: float | None = setting(None, "clip each model's gradient norm to this")
    max_bad_steps: int = setting(20, "stop after this many steps with NaN/inf losses or gradients")
    # augmentation
    crop_scale_min: float = setting(0.5, "random resized crops keep at least this fraction of the area")
    hflip: bool = setting(True, "random horizontal flips")
    # run
    seed: int = setting(0, "seed of the weights, data order, augmentation and g0")
    out: str = setting("runs/train", "run folder (checkpoint.pt, metrics.jsonl, result.json)")
    log_every: int = setting(20, "steps between metric lines (every guidance step gets one too)")
    checkpoint_every: int = setting(200, "steps between checkpoints")
    device: str = setting("auto", "device", ("auto", "cpu", "cuda"))
    precision: str = setting("bf16", "arithmetic on CUDA: bf16 autocast or plain fp32 (CPU is always fp32)",
                             ("bf16", "fp32"))

    def __post_init__(self) -> None:
        validate_fields(self)
        positive = ("image_size", "patch", "num_gaussians", "steps", "batch_size", "log_every", "checkpoint_every",
                    "max_bad_steps", "refine_rounds", "refine_depth", "refine_features", "num_tokens",
                    "codebook_size", "code_dim", "tokenizer_channels", "tokenizer_blocks", "embed_dim",
                    "stem_tokens", "stem_width", "stem_depth")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("patch", "encoder_patch"):
            value = getattr(self, key)
            if value is not None and (value < 1 or self.image_size % value):
                raise ValueError(f"config: {key} must be >= 1 and divide image_size {self.image_size}, got {value}")
        for key in ("token_neighbours", "neighbour_layers", "fit_steps", "probe_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"config: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("limit_train", "limit_eval"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be >= 1 (or null), got {getattr(self, key)}")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"config: crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.cache_gaussians and self.crop_scale_min < 1:
            raise ValueError(f"config: cache_gaussians holds the Gaussians of whole images; it needs crop_scale_min=1, "
                             f"got {self.crop_scale_min}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"config: epochs must be > 0 (or null), got {self.epochs}")
        for key in ("base_lr", "scale_factor", "classifier_lr_scale", "fit_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"config: {key} must be > 0, got {getattr(self, key)}")
        if self.guidance_lr is not None and not self.guidance_lr > 0:
            raise ValueError(f"config: guidance_lr must be > 0 (or null), got {self.guidance_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"config: grad_clip must be > 0 (or null), got {self.grad_clip}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"config: layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.text_length < 3 or self.text_vocab < 300:
            raise ValueError(f"config: text_length must be >= 3 and text_vocab >= 300 (the 256 bytes and specials), "
                             f"got {self.text_length} and {self.text_vocab}")
        try:
            prompt_templates(self.prompt)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None
        if self.finetune_from and self.model != "gvit":
            raise ValueError("config: finetune_from needs model=gvit")
        if self.encoder == "refine" and (self.sample_image or self.image_colors):
            raise ValueError("config: encoder=refine reads the image itself; sample_image and image_colors belong "
                             "to encoder=denoise")
        for key in ("sample_image", "image_colors"):
            if getattr(self, key) and self.learned_queries:
                raise ValueError(f"config: {key} needs g0, so it cannot be combined with learned_queries")
        if self.model == "offline" and not self.offline_train:
            raise ValueError("config: model=offline needs offline_train (a folder written by gvit fit-dataset)")
        try:
            Phases.__post_init__(self)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None

    def phase_settings(self, **changes) -> Phases:
        """The phase schedule of these settings, with ``changes`` (the model kind decides them:
        :meth:`gvit.train.steps.ModelStep.phases`)."""
        values = {f.name: getattr(self, f.name) for f in fields(Phases)} | changes
        try:
            return Phases(**values)
        except ValueError as exc:
            raise ValueError(f"config: {exc}") from None

    def with_epochs_as_steps(self, train_images: int) -> "TrainConfig":
        """``epochs`` turned into ``steps`` for a training set of ``train_images`` images."""
        if self.epochs is None:
            return self
        return replace(self, steps=max(1, math.ceil(self.epochs * train_images / self.batch_size)), epochs=None)

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML (or JSON) file and ``key=value`` overrides; an unknown key
    or a bad value raises ValueError naming it (and the allowed keys or values)."""
    return load_settings(TrainConfig, path, overrides)


def config_from_dict(values: dict, *, where: str = "checkpoint") -> TrainConfig:
    """The config saved in a checkpoint (unknown keys or bad values name ``where``)."""
    return from_mapping(TrainConfig, values, where=f"{where} config")
