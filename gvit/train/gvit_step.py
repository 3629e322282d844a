"""``model=gvit``: :class:`gvit.models.GViT` with its phases (encoder, classifier pre-training, joint,
constructive guidance; paper 2.2, Algorithm 1, Appendix A): its settings (:class:`GViTConfig`) and
its training step (:class:`GViTStep`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..gaussians import G0_LAYOUTS
from ..guidance import Phases, batch_losses, guidance_backward
from ..losses import RECONSTRUCTION_LOSSES
from ..models import SIZES
from ..settings import setting
from .base import ModelStep, as_number
from .config import ClassifierSettings, GaussianTokenSettings, TrainConfig, check_schedule, model_setting, require
from ..data.transforms import augment_gaussians
from .data import flip_gaussians
from .guidance_effect import gaussians_compared
from .gvit_model import build_gvit
from .optim import adamw, apply_gradients, peak_learning_rate, set_learning_rate

__all__ = ["GViTConfig", "GViTStep"]

ENCODERS = ("denoise", "refine")


@dataclass
class GViTConfig(Phases, GaussianTokenSettings, ClassifierSettings, TrainConfig):
    """The core, the classifier and Gaussian-token sections, the phase schedule
    (:class:`gvit.guidance.Phases`) and GViT's encoder, guidance, test-time fitting and transfer keys."""

    kind = "gvit"
    model: str = model_setting("gvit")
    encoder: str = setting("denoise", "Gaussian encoder: the paper's denoising ViT over patches and g0 tokens, or "
                                      "the refinement encoder (CNN features and residuals read at each Gaussian, "
                                      "refine_rounds rounds)", ENCODERS)
    encoder_size: str = setting("tiny", "size of the Gaussian encoder (refine: width and heads of each round)", SIZES)
    encoder_patch: int | None = setting(None, "patch size of the denoising encoder (none: patch)")
    refine_rounds: int = setting(3, "encoder=refine: refinement rounds")
    refine_depth: int = setting(2, "encoder=refine: transformer blocks per round")
    refine_residual: bool = setting(True, "encoder=refine: each round also reads the current render's residual")
    refine_features: int = setting(64, "encoder=refine: channels of the CNN feature map the Gaussians read")
    g0_layout: str = setting("uniform", "how g0's means are drawn (uniform as the paper, or a jittered grid)",
                             G0_LAYOUTS)
    learned_queries: bool = setting(False, "the encoder starts from learned queries instead of g0 (refine: learned "
                                           "centres)")
    sample_image: bool = setting(False, "Gaussian tokens also see the image through g0's footprint")
    image_colors: bool = setting(False, "g0's colours are read from the image at its centres")
    cache_gaussians: bool = setting(False, "the classifier-only phase (pretrain_until) reads the frozen encoder's "
                                           "Gaussians of the whole training set, encoded once, in random batches "
                                           "(flips applied to the Gaussians; needs crop_scale_min=1)")
    fit_steps: int = setting(0, "test-time fitting steps (Adam on the MSE, fast rasterizer) that refine the "
                                "encoder's Gaussians before the classifier reads them; 0: none")
    fit_lr: float = setting(2.0, "step sizes of the test-time fitting steps, as multiples of gvit fit's")
    pixel_loss: str = setting("bce", "pixel term of the reconstruction loss", RECONSTRUCTION_LOSSES)
    guidance: bool = setting(True, "constructive guidance steps in the last phase")
    guidance_lr: float | None = setting(None, "encoder learning rate on guidance steps as a fraction of the peak lr "
                                              "(base_lr * batch / 256); none: the schedule's")
    measure_guidance: bool = setting(False, "log what each guidance step did (gradient norms, Gaussian shift, loss "
                                            "changes); one more encoder backward and forward per guidance step")
    guidance_control: bool = setting(False, "a copy of the model and optimisers takes the guidance phase's steps "
                                            "again from its start, with gamma = 0; the evaluation compares the two "
                                            "(top-1, Gaussian shift, opacity on the object); twice the phase's cost")
    # transfer (gvit finetune): start from a GViT checkpoint, encoder frozen, classifier with
    # layer-wise lr decay (Table A.1b); the head is new when the number of classes differs
    finetune_from: str | None = setting(None, "start from this GViT checkpoint (encoder frozen)")
    # a shared encoder: start the Gaussian encoder from another run's (the classifier starts new)
    encoder_from: str | None = setting(None, "start the Gaussian encoder from this GViT checkpoint's encoder, the "
                                             "classifier new (with classifier_from=0 the run has no encoder phase)")

    __post_init__ = TrainConfig.__post_init__  # not the schedule's own (it runs in check)

    def check(self) -> None:
        super().check()
        check_schedule(self, Phases)
        self.schedule().check_order(self.steps)  # boundaries in steps and fractions, ordered in this run
        require(self, positive=("refine_rounds", "refine_depth", "refine_features", "fit_lr"),
                non_negative=("fit_steps",), optional_positive=("guidance_lr",))
        if self.encoder_patch is not None and (self.encoder_patch < 1 or self.image_size % self.encoder_patch):
            raise ValueError(f"config: encoder_patch must be >= 1 and divide image_size {self.image_size}, "
                             f"got {self.encoder_patch}")
        if self.cache_gaussians and self.crop_scale_min < 1:
            raise ValueError(f"config: cache_gaussians holds the Gaussians of whole images; it needs crop_scale_min=1, "
                             f"got {self.crop_scale_min}")
        if self.finetune_from and self.encoder_from:
            raise ValueError("config: finetune_from starts encoder and classifier, encoder_from the encoder alone; "
                             "give one of them")
        if self.guidance_control and (not self.guidance or self.finetune_from):
            raise ValueError("config: guidance_control compares a guidance phase with its gamma = 0 control; it "
                             "needs guidance=true and no finetune_from")
        if self.encoder == "refine" and (self.sample_image or self.image_colors):
            raise ValueError("config: encoder=refine reads the image itself; sample_image and image_colors belong "
                             "to encoder=denoise")
        for key in ("sample_image", "image_colors"):
            if getattr(self, key) and self.learned_queries:
                raise ValueError(f"config: {key} needs g0, so it cannot be combined with learned_queries")

    def classifier_steps(self) -> int:
        return self.steps - self.schedule().classifier_start(self.steps)

    def schedule(self) -> Phases:
        """The phase schedule of these settings: a fine-tuning run trains the classifier alone on the
        frozen encoder's Gaussians; ``guidance=false`` ends the joint phase at the last step."""
        if self.finetune_from:
            changes = dict(perceptual_from=1.0, classifier_from=0.0, pretrain_until=1.0, guidance_from=1.0)
        else:
            changes = {} if self.guidance else {"guidance_from": 1.0}
        return Phases(**({f.name: getattr(self, f.name) for f in fields(Phases)} | changes))


class GViTStep(ModelStep):
    """Encoder and classifier, each with its optimiser; each step does what its phase says."""

    settings = GViTConfig
    makes_gaussians = True

    def __init__(self, cfg: GViTConfig, num_classes, device):
        super().__init__(cfg, num_classes, device)
        self.schedule = cfg.schedule()
        self.model = build_gvit(cfg, num_classes).to(device)
        classifier_opt = adamw(cfg, self.model.classifier, cfg.layer_decay)
        self.parts["classifier"] = (self.model.classifier, classifier_opt, "cls_opt")
        self.parts["encoder"] = (self.model.encoder, adamw(cfg, self.model.encoder), "enc_opt")
        self.training_set, self.training_collate = None, None  # attach_training_set
        self.cache = None  # (raw Gaussians [N, k, 9], labels [N]) of the frozen encoder, when cached
        self.cache_neighbourhoods = None  # the classifier's neighbourhoods of the cached Gaussians
        self.before_guidance: dict | None = None  # the encoder's weights when the guidance phase began
        self.control: GViTStep | None = None  # guidance_control: the gamma = 0 copy, from the phase's first step

    def step(self, step, inputs, labels, gen, rank, world):
        start = self.schedule.guidance_start(self.cfg.steps)
        if step == start:  # before the phase's first update
            self.before_guidance = {k: v.detach().clone() for k, v in self.model.encoder.state_dict().items()}
            if self.cfg.guidance_control:
                self.control = self._control_copy()
        drawn = gen.get_state() if self.control is not None else None  # the control draws the same flips, g0
        metrics = super().step(step, inputs, labels, gen, rank, world)
        if drawn is not None:
            with self._forked_rng():
                control = self.control.step(step, inputs, labels, torch.Generator().set_state(drawn), rank, world)
            if metrics is not None and control is not None:
                metrics |= {f"control_{k}": v for k, v in control.items() if k.startswith("loss")}
        return None if metrics is None else {"phase": self.schedule.at(step, self.cfg.steps).name} | metrics

    def _control_copy(self) -> GViTStep:
        """A step object with gamma = 0, holding a copy of this one's model and optimisers as they are now."""
        with self._forked_rng():  # building the model seeds torch
            control = GViTStep(replace(self.cfg, gamma=0.0, guidance_control=False, measure_guidance=False),
                               self.model.num_classes, self.device)
        control.load_state_dict(copy.deepcopy(ModelStep.state_dict(self)))  # no tensor shared with this run
        control.attach_training_set(self.training_set, self.training_collate)
        return control

    def _forked_rng(self):
        """torch's global random state (and this device's) restored on exit: the control leaves the run's alone."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def classifier_start(self) -> int:
        return self.schedule.classifier_start(self.cfg.steps)

    def schedule_span(self, step: int) -> tuple[int, int] | None:
        return self.schedule.span(step, self.cfg.steps) if self.cfg.phase_lr else None

    def part_learning_rate(self, name: str, step: int) -> float:
        """The base rule (:meth:`ModelStep.part_learning_rate`); with ``phase_lr``, the joint stage
        (from the end of classifier pre-training on) scaled by ``joint_lr``."""
        lr = super().part_learning_rate(name, step)
        joint = self.cfg.phase_lr and step >= self.schedule.boundaries(self.cfg.steps)[-2] > 0
        return lr * self.cfg.joint_lr if joint else lr

    def guidance_lr_share(self) -> float | None:
        """The encoder's mean learning rate over the guidance steps, as a fraction of the peak
        (``base_lr * batch / 256``); None when the run has no guidance steps."""
        steps = [s for s in range(self.cfg.steps) if self.schedule.at(s, self.cfg.steps).guidance]
        if not steps:
            return None
        if self.cfg.guidance_lr is not None:
            return self.cfg.guidance_lr
        mean = sum(self.part_learning_rate("encoder", s) for s in steps) / len(steps)
        return mean / peak_learning_rate(self.cfg)

    def logs_step(self, step: int) -> bool:
        return self.schedule.at(step, self.cfg.steps).guidance

    def starts_from(self) -> str | None:
        return self.cfg.finetune_from or self.cfg.encoder_from

    def load_pretrained(self, state: dict, log=print) -> None:
        """Encoder and classifier weights of a GViT checkpoint (``finetune_from``; the head only
        when the classes match), or its encoder alone (``encoder_from``)."""
        key = "finetune_from" if self.cfg.finetune_from else "encoder_from"
        if "encoder" not in state:
            raise ValueError(f"{key}: the checkpoint has no Gaussian encoder (not a model=gvit run)")
        try:
            self.model.encoder.load_state_dict(state["encoder"])
        except RuntimeError as exc:  # another encoder, size or number of Gaussians
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{key}: the checkpoint's encoder is not the one these settings build ({first})") \
                from None
        if self.cfg.encoder_from:
            log(f"encoder from {self.cfg.encoder_from}; the classifier starts new")
            return
        try:
            if not self.model.classifier.load_backbone(state["classifier"]):
                log(f"finetune: new head for {self.model.num_classes} classes")
        except ValueError as exc:
            raise ValueError(f"finetune_from: {exc}") from None

    def attach_training_set(self, dataset, collate) -> None:
        self.training_set, self.training_collate, self.cache = dataset, collate, None
        self.cache_neighbourhoods = None

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        cfg, model, phase = self.cfg, self.model, self.schedule.at(step, self.cfg.steps)
        if not phase.train_encoder and cfg.cache_gaussians:
            return self._cached_classifier_step(flips, gen, rank, world)
        self.cache = self.cache_neighbourhoods = None  # the encoder trains again: cached Gaussians are stale
        images = self._augment(inputs, flips, gen, rank, world)
        g0 = model.sample_g0(cfg.batch_size, gen)
        g0 = None if g0 is None else g0[rank::world]
        kw = dict(pixel_loss=cfg.pixel_loss, lambda_perc=phase.lambda_perc)
        encoder, classifier = self.parts["encoder"][:2], self.parts["classifier"][:2]
        if phase.guidance:
            return self._guidance_step(images, labels, g0, kw)
        augment = self._gaussian_augmentation(gen)
        if not phase.train_encoder:  # classifier pre-training on the frozen encoder's Gaussians
            with torch.no_grad(), self.autocast():
                g = model.gaussians(images, g0)
            read = (g, None) if augment is None else augment(g)
            return self._classifier_step(lambda: model.classifier(*read), labels)
        with self.autocast():
            out = batch_losses(model, images, labels, g0, classify=phase.train_classifier, augment=augment, **kw)
        loss, metrics, trained = out.reconstruction, {"loss_rec": as_number(out.reconstruction)}, [encoder]
        if out.classification is not None:
            metrics["loss_cls"] = as_number(out.classification)
            if phase.lambda_cls > 0:  # with 0 the classifier does not train (no AdamW step on a zero gradient)
                loss = loss + phase.lambda_cls * out.classification
                trained.append(classifier)
        return metrics if apply_gradients(trained, loss, grad_clip=cfg.grad_clip) else None

    def _gaussian_augmentation(self, gen):
        """The step's augmentation in Gaussian space of the classifier's input (None when off): the
        classifier's training steps on live Gaussians read them augmented as the cached ones are;
        the reconstruction loss and guidance steps read them as they are."""
        if not self.cfg.augments_gaussians():
            return None
        return lambda g: augment_gaussians(g, None, generator=gen, **self.cfg.gaussian_augmentation())

    def _cached_classifier_step(self, flips, gen, rank, world) -> dict | None:
        """A classifier step on the frozen encoder's Gaussians of ``batch_size`` training images
        drawn from the step's generator (the loader's batch is not used), flipped as the images
        would have been. The whole training set is encoded once, when the phase starts (or resumes:
        the encoder is frozen, so the cache is the same), and its neighbourhoods found once with it
        (a flip does not change them)."""
        if self.cache is None:
            self.cache = self.encode_training_set()
            raw = self.cache[0]
            hoods = [self.model.classifier.neighbourhoods(raw[i:i + 1024]) for i in range(0, len(raw), 1024)]
            self.cache_neighbourhoods = None if hoods[0] is None else tuple(map(torch.cat, zip(*hoods)))
        raw, targets = self.cache
        index = torch.randint(len(targets), (self.cfg.batch_size,), generator=gen)[rank::world].to(raw.device)
        g, valid = flip_gaussians(raw[index], flips.to(raw.device)), None
        hoods = None if self.cache_neighbourhoods is None else tuple(h[index] for h in self.cache_neighbourhoods)
        augment = self._gaussian_augmentation(gen)
        if augment is not None:  # augmented Gaussians have neighbourhoods of their own
            g, valid = augment(g)
            hoods = None if hoods is None else self.model.classifier.neighbourhoods(g, valid)
        return self._classifier_step(lambda: self.model.classifier(g, valid, neighbourhoods=hoods), targets[index])

    @torch.no_grad()
    def encode_training_set(self) -> tuple[Tensor, Tensor]:
        if self.training_set is None:
            raise RuntimeError("cache_gaussians: the loop did not attach the training set")
        loader = torch.utils.data.DataLoader(self.training_set, batch_size=256, collate_fn=self.training_collate,
                                             num_workers=self.cfg.num_workers)
        gen = torch.Generator().manual_seed(self.cfg.seed)  # one fixed g0 draw per image
        raws, targets = [], []
        for images, labels in loader:
            with self.autocast():
                raws.append(self.model.gaussians(images.to(self.device), generator=gen).float())
            targets.append(labels.to(self.device))
        return torch.cat(raws), torch.cat(targets)

    def _guidance_step(self, images, labels, g0, kw) -> dict | None:
        """One guidance step, at ``guidance_lr`` times the peak lr when set. With ``measure_guidance``
        its metrics also carry the gradient norms of :func:`gvit.guidance.guidance_backward`, and on
        the same batch and g0 how far the step moved the Gaussians (``guide_shift_px``: mean centre
        shift in pixels; ``guide_color``: mean absolute colour change) and what it did to both losses
        (``guide_dloss_cls``, ``guide_dloss_rec``: after - before)."""
        cfg, model = self.cfg, self.model
        encoder = self.parts["encoder"][:2]
        encoder[1].zero_grad(set_to_none=True)
        with self.autocast():
            out = guidance_backward(model, images, labels, g0, gamma=cfg.gamma, relative=cfg.gamma_relative,
                                    measure=cfg.measure_guidance, **kw)
        metrics = {"loss_rec": as_number(out.reconstruction), "loss_cls": as_number(out.classification)}
        if cfg.guidance_lr is not None:  # the guidance step's own step size (the next step sets the schedule's)
            metrics["lr"] = peak_learning_rate(cfg) * cfg.guidance_lr
            set_learning_rate([encoder[1]], metrics["lr"])
        if not apply_gradients([encoder], None, grad_clip=cfg.grad_clip):
            return None
        if not cfg.measure_guidance:
            return metrics
        with torch.no_grad(), self.autocast():
            after = batch_losses(model, images, labels, g0, **kw)
        old, new = model.decode(out.g.detach()), model.decode(after.g)
        pixels = max(images.shape[-2:]) / 2  # normalised units -> pixels
        return {**metrics, **out.stats,
                "guide_shift_px": as_number((new.means - old.means).norm(dim=-1).mean() * pixels),
                "guide_color": as_number((new.colors - old.colors).abs().mean()),
                "guide_dloss_cls": as_number(after.classification - out.classification),
                "guide_dloss_rec": as_number(after.reconstruction - out.reconstruction)}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.before_guidance is not None:
            state["encoder_before_guidance"] = self.before_guidance
        if self.control is not None:
            state["control"] = ModelStep.state_dict(self.control)
        return state

    def load_state_dict(self, state: dict, *, optimizers: bool = True) -> None:
        super().load_state_dict(state, optimizers=optimizers)
        self.before_guidance = state.get("encoder_before_guidance")
        self.control = None
        if "control" in state:
            self.control = self._control_copy()
            self.control.load_state_dict(state["control"], optimizers=optimizers)

    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        """The measures of every kind; after a guidance phase also what it did to the encoder's
        Gaussians on these images (:meth:`guidance_effect`)."""
        result = super().evaluate(dataset, collate)
        return result | (self.guidance_effect(dataset, collate) if self.before_guidance is not None else {})

    def encoder_before_guidance(self) -> torch.nn.Module | None:
        """A copy of the encoder as it was when the guidance phase began (None before it began)."""
        if self.before_guidance is None:
            return None
        before = copy.deepcopy(self.model.encoder)  # the encoder alone: g0 and decoding are the model's
        before.load_state_dict(self.before_guidance)
        return before.eval()

    @torch.no_grad()
    def gaussians_around_guidance(self, images: Tensor, seed: int | None = None) -> dict | None:
        """The decoded Gaussians of ``images`` from the encoder before its guidance phase
        (``"encoder before guidance"``), now (``"encoder after guidance"``) and, with a control run, the
        control's (``"gamma = 0 control"``), with the same g0
        (drawn from ``seed``, the config's by default); None when the run had no guidance phase."""
        before = self.encoder_before_guidance()
        if before is None:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed if seed is None else seed)
        images = images.to(self.device)
        g0 = self.model.sample_g0(len(images), gen)
        self.train(False)
        encoders = [("encoder before guidance", before), ("encoder after guidance", self.model.encoder)]
        if self.control is not None:
            encoders.append(("gamma = 0 control", self.control.model.encoder))
        out = {name: self.model.decode(encoder(images, g0)).to("cpu") for name, encoder in encoders}
        self.train(True)
        return out

    @torch.no_grad()
    def guidance_effect(self, dataset, collate) -> dict:
        """What the guidance phase did to the Gaussians of ``dataset``
        (:func:`gvit.train.guidance_effect.gaussians_compared`, with the config's seed), with
        ``guidance_lr_share`` and ``guidance_gamma``; with ``guidance_control`` also the control's
        ``control_top1``, ``control_loss`` and ``control_psnr``, measured as :meth:`evaluate` measures this run."""
        encoders = {"before": self.encoder_before_guidance(), "guided": self.model.encoder}
        if self.control is not None:
            encoders["control"] = self.control.model.encoder
        self.train(False)
        out = gaussians_compared(self.model, encoders, dataset, collate, batch_size=self.cfg.batch_size,
                                 seed=self.cfg.seed, device=self.device)
        self.train(True)
        out |= {"guidance_lr_share": self.guidance_lr_share(), "guidance_gamma": self.cfg.gamma}
        if self.control is not None:
            measured = ModelStep.evaluate(self.control, dataset, collate)
            out |= {f"control_{key}": measured[key] for key in ("top1", "loss", "psnr") if key in measured}
        return out

    def evaluate_batch(self, inputs, gen):
        out = self.model.predict(inputs, generator=gen)
        return out["logits"], {"psnr": out["psnr"], "psnr_encoder": out["psnr_encoder"]}

    def predict_images(self, images, gen):
        return self.model.predict(images, generator=gen)
