"""``model=splat_align``: GaussianVision's stage 2, contrastive alignment of the stage-1 student
(:mod:`gvit.train.splat_distill_step`) with the text tower."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.captions import mirror_caption
from ..settings import setting
from .base import as_number
from .clip_step import contrastive_loss
from .config import model_setting
from .data import class_texts
from .embedding_eval import same_caption
from .optim import apply_gradients
from .splat_distill_step import DistillStep, SplatDistillConfig

__all__ = ["SplatAlignConfig", "AlignStep"]


@dataclass
class SplatAlignConfig(SplatDistillConfig):
    """Stage 1's settings, the stage-1 checkpoint to start from, and whether the text side trains."""

    kind = "splat_align"
    model: str = model_setting("splat_align")
    stage1: str | None = setting(None, "the model=splat_distill checkpoint to start from (none: a new stem, the "
                                       "no-stage-1 ablation)")
    align_text: bool = setting(False, "also train the last text block, text norm and projection")


class AlignStep(DistillStep):
    """``model=splat_align``: GaussianVision's stage 2. The student (from the stage-1 checkpoint
    ``stage1``, or a new stem without it) learns by symmetric InfoNCE between its image embeddings of
    the Gaussians and the text embeddings of each image's caption - the teacher run's prompt with the
    image's class; images of one class are each other's positives. Trains the stem, the first two
    vision blocks, the vision tower's final norm and the visual projection; with ``align_text`` also
    the last text block, the text norm and the text projection."""

    settings = SplatAlignConfig

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        self.classes: list[str] = []

    def starts_from(self) -> str | None:
        return self.cfg.stage1

    def load_pretrained(self, state: dict, log=print) -> None:
        """The stage-1 student (stem, with its statistics, and the tower it was distilled into)."""
        stage1 = self.cfg.stage1
        try:
            SplatDistillConfig.from_record(state["config"], where=str(stage1))
        except ValueError:
            raise ValueError(f"{stage1}: stage1 must be a model=splat_distill checkpoint") from None
        if "student" not in state:
            raise ValueError(f"{stage1}: stage1 must be a model=splat_distill checkpoint")
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError as exc:
            raise ValueError(f"{stage1}: its student does not fit this config ({str(exc).splitlines()[0]})") from None

    def stage(self) -> str:
        return "align_text" if self.cfg.align_text else "align"

    def keeps_statistics(self) -> bool:
        return bool(self.cfg.stage1)  # stage 1's stem brings its own

    def attach_training_set(self, dataset, collate) -> None:
        super().attach_training_set(dataset, collate)
        self.classes = class_texts(dataset)  # what class prompts call them (names or descriptions)

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        _, g, own = inputs
        g = self.augmented(None, g, flips, gen)[1]
        captions = [mirror_caption(c) if f else c
                     for c, f in zip(self.captions(own, labels.tolist(), self.classes), flips.tolist())]
        with self.autocast():
            loss = contrastive_loss(self.student.image_embeddings(g).float(), self.student_text(captions, cpu=False),
                                    self.student.logit_scale.detach(), same_caption(captions).to(self.device))
        ok = apply_gradients([self.parts["student"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_align": as_number(loss)} if ok else None
