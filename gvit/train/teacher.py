"""The RGB CLIP the splat stages learn from (:func:`load_teacher`), behind one interface: ``model``
(a ``transformers.CLIPModel``, frozen, eval mode), ``prompt`` (``{}`` = class name),
``image_embeddings(images in [0, 1])`` and ``text_embeddings(captions)``, ``encode_text(captions)``
-> ``(ids, attention mask)``.

* a ``model=clip`` checkpoint trained by gvit (its text tokenizer and pixel convention come with it);
* a pretrained CLIP as Hugging Face ``transformers`` saves it - a local folder (or a hub name, when
  the machine may download): ``CLIPModel.from_pretrained``, its tokenizer by ``AutoTokenizer``, the
  pixel mean and std of its ``preprocessor_config.json`` (OpenAI CLIP's when absent), images resized
  to the tower's input size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.gaussian_clip import load_clip
from .checkpoint import load_checkpoint
from .clip_step import ClipConfig, ClipStep

__all__ = ["load_teacher", "PretrainedCLIP", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PretrainedCLIP:
    """A ``transformers`` CLIP folder (or hub name) as a teacher; see the module docstring."""

    def __init__(self, name_or_path: str, prompt: str, device: torch.device):
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("a pretrained CLIP teacher needs Hugging Face transformers: pip install 'gvit[vl]'") \
                from None
        self.model = load_clip(name_or_path).to(device).eval().requires_grad_(False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{name_or_path}: no text tokenizer next to the CLIP ({str(exc).splitlines()[0]})"
            ) from None
        pre = Path(name_or_path) / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(stats.get("image_mean", OPENAI_CLIP_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.get("image_std", OPENAI_CLIP_STD), device=device).view(1, 3, 1, 1)
        self.image_size = self.model.config.vision_config.image_size
        self.text_length = min(self.model.config.text_config.max_position_embeddings, 77)
        self.prompt, self.device = prompt, device

    def image_embeddings(self, images: Tensor) -> Tensor:
        x = images.to(self.device)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        vision = self.model.vision_model(pixel_values=(x - self.mean) / self.std)
        return self.model.visual_projection(vision.pooler_output)

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.text_length,
                             return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    def text_embeddings(self, captions: list[str]) -> Tensor:
        ids, mask = self.encode_text(captions)
        out = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return self.model.text_projection(out.pooler_output)


def load_teacher(path: str, prompt: str, device: torch.device, num_classes: int = 0):
    """A gvit ``model=clip`` checkpoint (a file) or a ``transformers`` CLIP (a folder or hub name),
    frozen. ``prompt`` is used for a pretrained CLIP; a gvit checkpoint keeps its own."""
    if Path(path).is_file():
        state = load_checkpoint(path, map_location="cpu")
        try:
            cfg = ClipConfig.from_record(state["config"], where=str(path))
        except ValueError as exc:
            raise ValueError(f"{exc}; the teacher must be a model=clip checkpoint or a CLIP folder") from None
        teacher = ClipStep(cfg, num_classes, device)
        teacher.load_state_dict(state, optimizers=False)
        teacher.train(False)
        teacher.model.requires_grad_(False)
        return teacher
    return PretrainedCLIP(path, prompt, device)
