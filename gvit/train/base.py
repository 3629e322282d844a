"""The step object every model kind derives from (:class:`ModelStep`): its models and optimisers,
datasets, one optimisation step, evaluation, and what the kind can do (capabilities the tools ask
for instead of its name). Each kind lives in a file of its own (``gvit_step.py``,
``patch_vit_step.py``, ...) and is registered in :mod:`gvit.train.kinds`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.transforms import crop_boxes, resized_crop
from ..models.layers import set_drop_path_generator
from .config import TrainConfig
from .data import image_collate, image_datasets, step_generator
from .optim import apply_gradients, learning_rate, set_learning_rate

__all__ = ["ModelStep", "as_number"]


def as_number(t: Tensor) -> float:
    return float(t.detach())


class ModelStep:
    """A model kind: ``parts`` maps checkpoint names to ``(module, optimizer, optimizer name)``.

    Capabilities (class attributes the tools ask for): ``settings``, the kind's settings class;
    ``reads_images`` (False: saved Gaussians); ``makes_gaussians`` (a GViT: its encoder turns images
    into Gaussians, so explain, interpret and leakage apply); ``tokenizes`` (``gvit tokens``);
    ``text_tower`` (a CLIP that can be GaussianVision's teacher); ``splat_student`` (a GaussianVision
    stage, ``gvit vl-eval``); ``classifies`` (a classifier of images or Gaussians: :meth:`evaluate`'s top-1
    and loss are also measured on training images, so the train-eval gap shows); ``report_elsewhere``:
    None where ``gvit report`` applies, else where the kind's measures are reported."""

    settings: type[TrainConfig] = TrainConfig
    reads_images = True
    makes_gaussians = False
    tokenizes = False
    text_tower = False
    splat_student = False
    classifies = True
    report_elsewhere: str | None = None

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.parts: dict[str, tuple[nn.Module, torch.optim.Optimizer, str]] = {}

    # -- data
    @staticmethod
    def datasets(cfg: TrainConfig) -> tuple:
        """``(train, test or None)``."""
        return image_datasets(cfg)

    @staticmethod
    def collate(cfg: TrainConfig):
        return image_collate(cfg.image_size)

    # -- state
    @property
    def classifier(self) -> nn.Module:
        return self.parts["classifier"][0]

    def modules(self) -> list[nn.Module]:
        return [module for module, _, _ in self.parts.values()]

    def state_dict(self) -> dict:
        state = {}
        for name, (module, opt, opt_name) in self.parts.items():
            state[name], state[opt_name] = module.state_dict(), opt.state_dict()
        return state

    def load_state_dict(self, state: dict, *, optimizers: bool = True) -> None:
        for name, (module, opt, opt_name) in self.parts.items():
            if name not in state:
                raise ValueError(f"the checkpoint has no {name} weights")
            module.load_state_dict(state[name])
            if optimizers:
                opt.load_state_dict(state[opt_name])

    def starts_from(self) -> str | None:
        """The checkpoint whose weights a new run of this kind starts from (:meth:`load_pretrained`,
        before its first step; a resumed run has them in its own checkpoint). None: new weights."""
        return None

    def load_pretrained(self, state: dict, log=print) -> None:
        """Take the weights this kind starts from out of the checkpoint ``state`` (:meth:`starts_from`)."""
        raise NotImplementedError(f"{type(self).__name__} does not start from another run")

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    # -- one step
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def step(self, step: int, inputs, labels: Tensor, gen: torch.Generator, rank: int, world: int) -> dict | None:
        """One optimisation step; returns its metrics, or None when it was skipped (NaN/inf)."""
        for name, (_, opt, _) in self.parts.items():
            set_learning_rate([opt], self.part_learning_rate(name, step))
        # randomness of step s is drawn for the whole global batch from (seed, s), then sliced like the data
        flips = (torch.rand(self.cfg.batch_size, generator=gen) < 0.5)[rank::world] & self.cfg.hflip
        if getattr(self.cfg, "drop_path", 0):  # stochastic depth draws from (seed, step, rank), not from gen
            set_drop_path_generator(self.modules(), step_generator(self.cfg.seed, (1 << 40) + step * world + rank))
        metrics = self._step(step, inputs, labels.to(self.device), flips, gen, rank, world)
        return None if metrics is None else {"lr": self.part_learning_rate("", step)} | metrics

    def part_learning_rate(self, name: str, step: int) -> float:
        """The learning rate of part ``name`` at ``step``: the schedule's (over :meth:`schedule_span`);
        a classifier's times ``classifier_lr_scale``, warmed up from the step it starts training
        (:meth:`classifier_start`)."""
        span = self.schedule_span(step)
        if name != "classifier":
            return learning_rate(self.cfg, step, span=span)
        return learning_rate(self.cfg, step, self.classifier_start(), span) * self.cfg.classifier_lr_scale

    def schedule_span(self, step: int) -> tuple[int, int] | None:
        """The steps ``(first, end)`` whose warm-up and cosine ``step`` is on; None: the whole run."""
        return None

    def classifier_start(self) -> int:
        """The first step at which the classifier trains."""
        return 0

    def logs_step(self, step: int) -> bool:
        """Whether ``step`` gets a metric line whatever ``log_every`` says (GViT's guidance steps)."""
        return False

    def _augment(self, images: Tensor, flips: Tensor, gen: torch.Generator, rank: int, world: int) -> Tensor:
        size = self.cfg.image_size
        boxes = crop_boxes(self.cfg.batch_size, size, size, scale=(self.cfg.crop_scale_min, 1.0),
                           generator=gen)[rank::world]
        images = resized_crop(images, boxes, (size, size))
        return torch.where(flips[:, None, None, None], images.flip(-1), images).to(self.device)

    def _classifier_step(self, logits_fn, labels: Tensor) -> dict | None:
        with self.autocast():
            loss = F.cross_entropy(logits_fn(), labels)
        ok = apply_gradients([self.parts["classifier"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_cls": as_number(loss)} if ok else None

    def _step(self, step: int, inputs, labels: Tensor, flips: Tensor, gen: torch.Generator, rank: int,
              world: int) -> dict | None:
        raise NotImplementedError

    def attach_training_set(self, dataset, collate) -> None:
        """The training set, for steps that read more than their batch (called once by the loop)."""

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        """Top-1 accuracy, the mean cross-entropy (``loss``) and the means of :meth:`evaluate_batch`'s
        per-image measures on ``dataset``; g0 and other randomness come from a generator seeded by the
        config's seed, so evaluation is deterministic."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, collate_fn=collate,
                                             num_workers=self.cfg.num_workers)
        correct, total, loss, measures = 0, 0, 0.0, {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.train(False)
        for inputs, labels in loader:
            logits, per_image = self.evaluate_batch(inputs, gen)
            if logits is not None:
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                loss += float(torch.nn.functional.cross_entropy(logits.float().cpu(), labels, reduction="sum"))
            total += len(labels)
            for name, values in per_image.items():
                measures.setdefault(name, []).append(values.float().cpu())
        self.train(True)
        result = {"top1": correct / max(1, total), "loss": loss / max(1, total)} if logits is not None else {}
        result["eval_images"] = total
        result.update({name: float(torch.cat(values).mean()) for name, values in measures.items()})
        return result

    def evaluate_batch(self, inputs, gen: torch.Generator) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``(logits or None, per-image measures by name)`` of one evaluation batch (for GViT ``psnr``
        and ``psnr_encoder``; for the tokenizer no logits and its reconstruction measures)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_images(self, images: Tensor, gen: torch.Generator) -> dict:
        """What the model makes of ``images [B, 3, S, S]``: ``logits`` (and, for GViT, ``g``,
        ``rendered`` and ``psnr``)."""
        if not self.reads_images:
            raise ValueError(f"model={self.cfg.model} reads saved Gaussians, not images")
        return {"logits": self.evaluate_batch(images, gen)[0]}

    @staticmethod
    def describe(result: dict) -> str:
        """One line of an evaluation result: ``top-1 X% on N images`` (and PSNR where measured)."""
        extra = f", PSNR {result['psnr']:.2f} dB" if "psnr" in result else ""
        return f"top-1 {100 * result['top1']:.2f}% on {result['eval_images']} images{extra}"
