"""A CLIP model that sees Gaussians: GaussianVision's splat stem in front of a Hugging Face
``transformers`` CLIP vision tower (the optional extra ``gvit[vl]``).

The stem's M tokens (:class:`gvit.models.splat_stem.SplatStem`) replace the tower's patch
embeddings: the pretrained class token (with its position embedding, index 0) is prepended, then the
tower's ``pre_layrnorm``, encoder blocks, ``post_layernorm`` on the class token and
``visual_projection`` run unchanged. Stem tokens get no patch position embedding (their count M is
independent of the patch grid; the stem carries position itself). The RGB path
(:meth:`GaussianCLIP.rgb_embeddings`) is the unmodified tower: the teacher in distillation.

Embeddings are returned unnormalised ``[B, projection_dim]``; the trainable parts per training stage
are set by :meth:`GaussianCLIP.set_stage`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..gaussians import Gaussians
from .layers import get_size
from .splat_stem import SplatStem

__all__ = ["GaussianCLIP", "load_clip", "rgb_clip", "clip_pixels", "STAGES"]

STAGES = ("distill", "align", "align_text")


def load_clip(name_or_path: str | os.PathLike):
    """``transformers.CLIPModel.from_pretrained`` (a hub name or a local folder; offline runs set
    ``HF_HUB_OFFLINE=1``), with a clear error when the extra is missing."""
    try:
        from transformers import CLIPModel
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("GaussianCLIP needs Hugging Face transformers: pip install 'gvit[vl]'") from None
    return CLIPModel.from_pretrained(str(name_or_path))


def rgb_clip(size: str, *, image_size: int, patch: int, vocab_size: int, text_length: int, embed_dim: int,
             pad_id: int = 0, bos_id: int = 2, eos_id: int = 3):
    """A new (random) ``transformers.CLIPModel`` with both towers of gvit size ``size``
    (:data:`gvit.models.SIZES`): the RGB CLIP gvit trains where no pretrained one is at hand. The
    text tower pools at ``eos_id`` (:mod:`gvit.data.text`'s ids)."""
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("an RGB CLIP needs Hugging Face transformers: pip install 'gvit[vl]'") from None
    s = get_size(size)
    tower = dict(hidden_size=s.width, intermediate_size=int(s.width * s.mlp_ratio), num_hidden_layers=s.depth,
                 num_attention_heads=s.heads)
    config = CLIPConfig(text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=text_length,
                                         pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id),
                        vision_config=dict(tower, image_size=image_size, patch_size=patch), projection_dim=embed_dim)
    return CLIPModel(config)


def clip_pixels(images: Tensor) -> Tensor:
    """Images in [0, 1] -> the pixels gvit's RGB CLIPs read ((x - 0.5) / 0.5)."""
    return (images - 0.5) / 0.5


class GaussianCLIP(nn.Module):
    """``clip``: a ``transformers.CLIPModel``; ``stem``: a :class:`SplatStem` whose ``out_dim`` is the
    vision tower's width."""

    def __init__(self, clip: nn.Module, stem: SplatStem):
        super().__init__()
        width = clip.config.vision_config.hidden_size
        if stem.proj.out_features != width:
            raise ValueError(
                f"the stem projects to {stem.proj.out_features} values; the CLIP vision tower is {width} wide"
            )
        self.clip, self.stem = clip, stem

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **stem_kwargs) -> "GaussianCLIP":
        """Load a CLIP (:func:`load_clip`) and put a new splat stem (``stem_kwargs``) in front of it."""
        clip = load_clip(name_or_path)
        return cls(clip, SplatStem(clip.config.vision_config.hidden_size, **stem_kwargs))

    # -- embeddings
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """``[B, M, width]`` tokens in place of the patch embeddings -> image embeddings."""
        vision = self.clip.vision_model
        emb = vision.embeddings
        cls = (emb.class_embedding + emb.position_embedding.weight[0]).to(tokens.dtype)
        x = torch.cat([cls.expand(len(tokens), 1, -1), tokens], 1)
        x = vision.encoder(inputs_embeds=vision.pre_layrnorm(x)).last_hidden_state
        return self.clip.visual_projection(vision.post_layernorm(x[:, 0]))

    def image_embeddings(self, gaussians: Gaussians) -> Tensor:
        """Gaussian sets -> ``[B, projection_dim]`` through the stem and the tower."""
        return self.embed_tokens(self.stem(gaussians))

    def rgb_embeddings(self, pixels: Tensor) -> Tensor:
        """CLIP-normalised pixels ``[B, 3, S, S]`` -> ``[B, projection_dim]`` through the unmodified tower."""
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale

    # -- what trains
    def set_stage(self, stage: str) -> dict[str, float]:
        """Freeze everything, then unfreeze per stage: ``distill`` the stem; ``align`` the stem, the
        first two vision blocks, the vision tower's final norm and the visual projection; ``align_text``
        also the last text block, the text tower's final norm and the text projection. Returns the
        trainable fraction of all parameters and of the image side (stem + vision tower + projection)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.requires_grad_(False)
        parts: list[nn.Module] = [self.stem]
        vision, text = self.clip.vision_model, self.clip.text_model
        if stage in ("align", "align_text"):
            parts += [*vision.encoder.layers[:2], vision.post_layernorm, self.clip.visual_projection]
        if stage == "align_text":
            parts += [text.encoder.layers[-1], text.final_layer_norm, self.clip.text_projection]
        for part in parts:
            part.requires_grad_(True)
        image_side = [self.stem, vision, self.clip.visual_projection]

        def count(modules, trainable_only):
            return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)

        return {"trainable": count([self], True) / count([self], False),
                "trainable_image": count(image_side, True) / count(image_side, False)}
