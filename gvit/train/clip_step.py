"""``model=clip``: an RGB CLIP (``transformers``) trained on captioned pixels with a symmetric
contrastive loss - the teacher and backbone of GaussianVision's stages where no pretrained CLIP is at
hand - and the vision-language measures every stage reports.

Captions come from :func:`gvit.train.data.caption_datasets`; the text tokenizer (byte-level BPE,
:class:`gvit.data.TextTokenizer`) is learned from the training captions when a run starts and is kept
in the checkpoint. Several images of a batch may share a caption (class prompts, repeated shape
descriptions): every pair with the same caption text counts as a positive (the target of each row is
uniform over them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TextTokenizer
from ..data.captions import class_prompts, mirror_caption
from ..models import SIZES
from ..models.gaussian_clip import clip_pixels, rgb_clip
from ..settings import setting
from .base import ModelStep, as_number
from .config import PatchSettings, PromptSettings, TrainConfig, model_setting, require
from .data import caption_collate, caption_datasets, class_texts, dataset_captions, unseen_classes
from .embedding_eval import retrieval_recall, same_caption, zero_shot_measures
from .optim import adamw, apply_gradients

__all__ = ["ClipConfig", "ClipStep", "contrastive_loss"]

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class ClipConfig(PromptSettings, PatchSettings, TrainConfig):
    """The core, the prompt, the image tower's patch, and the towers' sizes."""

    kind = "clip"
    model: str = model_setting("clip")
    clip_size: str = setting("micro", "size of both towers", SIZES)
    embed_dim: int = setting(64, "width of the joint image-text embedding")
    text_length: int = setting(16, "tokens per caption ([BOS] ... [EOS], padded or cut)")
    text_vocab: int = setting(1000, "size of the byte-level BPE vocabulary learned from the training captions")

    def check(self) -> None:
        super().check()
        require(self, positive=("embed_dim",))
        if self.text_length < 3 or self.text_vocab < 300:
            raise ValueError(f"config: text_length must be >= 3 and text_vocab >= 300 (the 256 bytes and specials), "
                             f"got {self.text_length} and {self.text_vocab}")


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE of embeddings ``[B, D]`` (normalised here); ``positives`` ``[B, B]`` bool marks
    the matching pairs (the diagonal at least); each row's target is uniform over its positives."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    target = positives.float() / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2


class ClipStep(ModelStep):
    """``model=clip``: one optimiser over the whole CLIP (both towers, projections, logit scale)."""

    settings = ClipConfig
    classifies = False
    text_tower = True
    report_elsewhere = "a CLIP checkpoint (model=clip); its measures are in its result.json"

    @staticmethod
    def datasets(cfg: TrainConfig) -> tuple:
        return caption_datasets(cfg)

    @staticmethod
    def collate(cfg: TrainConfig):
        return caption_collate(cfg.image_size)

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        torch.manual_seed(cfg.seed)
        self.model = rgb_clip(cfg.clip_size, image_size=cfg.image_size, patch=cfg.patch, vocab_size=cfg.text_vocab,
                              text_length=cfg.text_length, embed_dim=cfg.embed_dim).to(device)
        self.parts["clip"] = (self.model, adamw(cfg, self.model), "clip_opt")
        self.text: TextTokenizer | None = None

    # -- the text tokenizer: learned from the training captions, kept in the checkpoint
    def attach_training_set(self, dataset, collate) -> None:
        self.text = TextTokenizer.train(dataset_captions(dataset)[0], self.cfg.text_vocab)

    def state_dict(self) -> dict:
        return super().state_dict() | {"text_tokenizer": self.text.to_str()}

    def load_state_dict(self, state: dict, *, optimizers: bool = True) -> None:
        super().load_state_dict(state, optimizers=optimizers)
        if "text_tokenizer" not in state:
            raise ValueError("the checkpoint has no text tokenizer")
        self.text = TextTokenizer.from_str(state["text_tokenizer"])

    # -- embeddings
    def image_embeddings(self, images: Tensor) -> Tensor:
        vision = self.model.vision_model(pixel_values=clip_pixels(images.to(self.device)))
        return self.model.visual_projection(vision.pooler_output)

    @property
    def prompt(self) -> str:
        return self.cfg.prompt

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Caption ids ``[N, text_length]`` and attention mask."""
        return self.text.encode(captions, self.cfg.text_length)

    def text_embeddings(self, captions: list[str]) -> Tensor:
        ids, mask = self.encode_text(captions)
        out = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return self.model.text_projection(out.pooler_output)

    # -- one step
    def _step(self, step, inputs, labels, flips, gen, rank, world):
        images, captions = inputs
        images = self._augment(images, flips, gen, rank, world)
        captions = [mirror_caption(c) if f else c for c, f in zip(captions, flips.tolist())]
        with self.autocast():
            loss = contrastive_loss(self.image_embeddings(images).float(), self.text_embeddings(captions).float(),
                                    self.model.logit_scale, same_caption(captions).to(self.device))
        ok = apply_gradients([self.parts["clip"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_clip": as_number(loss), "logit_scale": as_number(self.model.logit_scale.exp())} if ok else None

    # -- evaluation
    @staticmethod
    def describe(result: dict) -> str:
        return (ModelStep.describe(result) + f", image->text R@1 {100 * result['i2t_r1']:.1f}%, "
                f"text->image R@1 {100 * result['t2i_r1']:.1f}%")

    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        """Zero-shot ``top1`` with ``cfg.prompt`` over the classes (and ``top1_held_out`` on the
        images whose attribute pair training never showed), image <-> text recall@1/5/10."""
        captions, targets, held_out = dataset_captions(dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, collate_fn=collate,
                                             num_workers=self.cfg.num_workers)
        self.train(False)
        image, text = [], []
        for (images, caps), _ in loader:
            image.append(self.image_embeddings(images).float().cpu())
            text.append(self.text_embeddings(caps).float().cpu())
        image, text = torch.cat(image), torch.cat(text)
        result = {"eval_images": len(image)} | retrieval_recall(image, text, captions)
        classes = class_texts(dataset)
        if classes and (targets >= 0).all():
            prompts = class_prompts(self.cfg.prompt, classes)
            result |= zero_shot_measures(image, self.text_embeddings(prompts).float().cpu(), targets,
                                         len(prompts) // len(classes), held_out=held_out,
                                         unseen=unseen_classes(dataset))
        self.train(True)
        return result
