"""``model=splat_distill``: GaussianVision's stage 1 (stage 2, ``model=splat_align``, builds on it in
:mod:`gvit.train.splat_align_step`).

A frozen RGB CLIP (the teacher, a ``model=clip``
checkpoint named by ``teacher``) embeds each image; the student - a new splat stem in front of a
frozen copy of the same CLIP (:class:`gvit.models.GaussianCLIP`, stage ``distill``) - embeds the
image's fitted Gaussians (``gvit fit-dataset`` folders ``offline_train`` / ``offline_eval``, whose
manifests name the images they were fitted from and the compositing mode). Loss: the squared
distance between the two l2-normalised embeddings (= 2 - 2 cosine), per image, averaged.

The stem's input statistics are measured on the training Gaussians when a run starts and saved
with its weights. Evaluation (both stages): mean teacher-student cosine, zero-shot top-1 through the text tower of
student and teacher with the teacher run's prompt and their ratio, and for both image embeddings a
weighted kNN and a linear probe fitted on ``probe_images`` training items. The student's measures
have plain names (``top1``, ``knn``, ...), the teacher's the same names after ``teacher_``.

Stage 2 starts from a stage-1 checkpoint (loaded by the loop before the first step), or without one
(the ablation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import AttributeCaptions, open_dataset
from ..data.captions import DEFAULT_PROMPT, class_prompt, class_prompts
from ..data.shards import load_shards, read_manifest
from ..data.transforms import augment_pairs, resize_square
from ..gaussians import Gaussians, concat, valid_mask
from ..models.gaussian_clip import GaussianCLIP
from ..models.splat_stem import STEM_POOLINGS, SplatStem, splat_set_features, splat_statistics
from ..settings import setting
from .base import ModelStep, as_number
from .config import GaussianAugmentation, GaussianFolders, PromptSettings, TrainConfig, model_setting, require
from .data import class_texts, dataset_captions, folder_splits, hold_out_classes, limit, unseen_classes
from .embedding_eval import knn_accuracy, linear_probe_accuracy, retrieval_recall, zero_shot_measures
from .optim import adamw, apply_gradients
from .teacher import load_teacher

__all__ = ["SplatDistillConfig", "DistillStep", "PairedGaussians", "paired_collate", "mirror_sets", "splat_mode",
           "in_chunks"]


@dataclass
class SplatDistillConfig(GaussianFolders, PromptSettings, GaussianAugmentation, TrainConfig):
    """The core, the Gaussian folders (the fitted images), the prompt, the augmentation in Gaussian space
    (stage 1 crops and jitters the teacher's image with the Gaussians), the teacher, the probes and the
    splat stem."""

    kind = "splat_distill"
    model: str = model_setting("splat_distill")
    teacher: str | None = setting(None, "the RGB CLIP whose image embeddings the stem learns to match: a model=clip "
                                        "checkpoint, or a transformers CLIP folder (with its tokenizer; prompt is "
                                        "then this run's)")
    probe_images: int = setting(5000, "training items whose frozen embeddings the evaluation's kNN and linear probe "
                                      "are fitted on (0: none)")
    stem_tokens: int = setting(64, "tokens the splat stem gives the vision tower (M)")
    stem_width: int = setting(128, "width inside the splat stem")
    stem_depth: int = setting(4, "Perceiver resampler layers")
    stem_pooling: str = setting("perceiver", "how the stem pools N splats into M tokens", STEM_POOLINGS)

    def check(self) -> None:
        super().check()
        require(self, positive=("stem_tokens", "stem_width", "stem_depth"), non_negative=("probe_images",))


def splat_mode(folder) -> str:
    """The compositing mode a ``gvit fit-dataset`` folder was fitted with."""
    return read_manifest(folder)["settings"]["fit"]["mode"]


class PairedGaussians(torch.utils.data.Dataset):
    """A finished ``gvit fit-dataset`` folder with the images it was fitted from: items
    ``((image [3, H, W], gaussians, caption), label)``, the Gaussians a batch of one padded set.
    ``captions`` are the image dataset's own (``captioned-shapes``, caption files); where it has none,
    with ``captions="attributes"`` each image's attribute caption (:class:`gvit.data.AttributeCaptions`
    with ``prompt``; ``class_texts`` the classes' descriptions), else "" for every item (the steps then
    caption by class prompt); ``held_out`` marks the attribute pairs training never showed (None where
    the dataset has no such marks); ``split`` the split the images come from."""

    def __init__(self, folder, *, captions: str = "prompt", prompt: str = DEFAULT_PROMPT):
        g, labels, indices, manifest = load_shards(folder)
        settings = manifest["settings"]
        self.split = settings["split"]
        self.images = open_dataset(settings["data"], self.split, val_every=settings.get("val_every", 0))
        g.valid = valid_mask(g)
        self.gaussians, self.targets, self.indices = g, labels, indices.tolist()
        self.classes = manifest.get("classes") or list(getattr(self.images, "classes", []))
        self.class_texts, self.unseen = list(self.classes), []
        own = getattr(self.images, "captions", None)
        if own is None and captions == "attributes":
            described = AttributeCaptions(self.images, prompt)
            own, self.class_texts = described.captions, described.class_texts
        self.captions = [own[i] for i in self.indices] if own is not None else [""] * len(self.indices)
        held_out = getattr(self.images, "held_out", None)
        self.held_out = None if held_out is None else held_out[indices]
        self.manifest = manifest

    @classmethod
    def for_run(cls, folder, cfg, *, train: bool) -> "PairedGaussians":
        """The folder as a run with ``cfg`` reads it: captioned as ``cfg.captions`` says, and with
        ``cfg.unseen_classes`` dropped (``train``) or marked (evaluation; :func:`hold_out_classes`)."""
        return hold_out_classes(cls(folder, captions=cfg.captions, prompt=cfg.prompt), cfg.unseen(), train=train)

    def select(self, indices: list[int]) -> "PairedGaussians":
        """The items at ``indices``, with their Gaussians, captions and marks."""
        out = copy.copy(self)
        index = torch.as_tensor(indices, dtype=torch.long)
        out.gaussians, out.targets = self.gaussians[index], self.targets[index]
        out.indices = [self.indices[i] for i in indices]
        out.captions = [self.captions[i] for i in indices]
        out.held_out = None if self.held_out is None else self.held_out[index]
        return out

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        image, _ = self.images[self.indices[i]]
        return (image, self.gaussians[i], self.captions[i]), int(self.targets[i])


def paired_collate(size: int):
    """Items of :class:`PairedGaussians` -> ``([B, 3, size, size] images, Gaussians, captions)`` and labels."""
    def collate(items):
        images = torch.stack([resize_square(img, size) for (img, _, _), _ in items])
        gaussians = concat([g for (_, g, _), _ in items])
        captions = [c for (_, _, c), _ in items]
        return (images, gaussians, captions), torch.tensor([t for _, t in items], dtype=torch.long)

    return collate


def in_chunks(embed, texts: list[str], size: int = 1024) -> Tensor:
    """``embed`` applied to ``size`` texts at a time, the results concatenated."""
    return torch.cat([embed(texts[i:i + size]) for i in range(0, len(texts), size)])


def mirror_sets(g: Gaussians, flip: Tensor) -> Gaussians:
    """Mirror left-right the sets where ``flip`` ``[B]``: x -> -x, angle -> -angle."""
    means = torch.where(flip[:, None, None], g.means * torch.tensor([-1.0, 1.0]), g.means)
    angles = torch.where(flip[:, None], -g.angles, g.angles)
    return Gaussians(means, g.scales, angles, g.colors, g.opacities, g.valid)


class DistillStep(ModelStep):
    """``model=splat_distill``: trains the student's stem only."""

    settings = SplatDistillConfig
    classifies = False
    splat_student = True

    @staticmethod
    def datasets(cfg: TrainConfig) -> tuple:
        return folder_splits(cfg, lambda folder, train: PairedGaussians.for_run(folder, cfg, train=train))

    @staticmethod
    def collate(cfg: TrainConfig):
        return paired_collate(cfg.image_size)

    def __init__(self, cfg, num_classes, device):
        super().__init__(cfg, num_classes, device)
        if not cfg.teacher:
            raise ValueError("config: model=splat_distill needs teacher (a model=clip checkpoint or a CLIP folder)")
        self.teacher = teacher = load_teacher(cfg.teacher, cfg.prompt, device, num_classes)
        torch.manual_seed(cfg.seed)
        stem = SplatStem(teacher.model.config.vision_config.hidden_size, mode=splat_mode(cfg.offline_train),
                         num_tokens=cfg.stem_tokens, width=cfg.stem_width, depth=cfg.stem_depth,
                         pooling=cfg.stem_pooling)
        self.student = GaussianCLIP(copy.deepcopy(teacher.model), stem).to(device)
        self.fractions = self.student.set_stage(self.stage())
        self.parts["student"] = (self.student, adamw(cfg, self.student), "student_opt")
        self.probe_set = None

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.student.clip.eval()  # the frozen tower keeps its eval behaviour (no dropout)

    def attach_training_set(self, dataset, collate) -> None:
        """The stem's input statistics from the training Gaussians (unless :meth:`keeps_statistics`);
        the items the evaluation's probes are fitted on."""
        if not self.keeps_statistics():
            g = dataset.gaussians if isinstance(dataset, PairedGaussians) else dataset.dataset.gaussians
            self.student.stem.set_statistics(*splat_statistics(splat_set_features(g, self.student.stem.mode), g.valid))
        self.set_probe_set(limit(dataset, self.cfg.probe_images) if self.cfg.probe_images else None)

    def set_probe_set(self, dataset) -> None:
        """The paired training items the evaluation's kNN and linear probe are fitted on (None: no probes)."""
        self.probe_set = dataset

    def keeps_statistics(self) -> bool:
        return False

    def stage(self) -> str:
        """What trains (:meth:`gvit.models.GaussianCLIP.set_stage`)."""
        return "distill"

    def embed(self, dataset, collate) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher (RGB) and student (Gaussian) image embeddings and labels of a paired dataset."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, collate_fn=collate,
                                             num_workers=self.cfg.num_workers)
        teacher, student, targets = [], [], []
        for (images, g, _), labels in loader:
            teacher.append(self.teacher_embeddings(images).cpu())
            student.append(self.student.image_embeddings(g.to(self.device)).float().cpu())
            targets.append(labels)
        return torch.cat(teacher), torch.cat(student), torch.cat(targets)

    def teacher_embeddings(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher.image_embeddings(images).float()

    def augmented(self, images: Tensor | None, g: Gaussians, flips: Tensor, gen: torch.Generator):
        """A training batch's images (None: none) and Gaussians, mirrored where ``flips`` says, then
        augmented in Gaussian space as the settings say (the images the same way), on the device."""
        g = mirror_sets(g, flips).to(self.device)
        if images is not None:
            images = torch.where(flips[:, None, None, None], images.flip(-1), images).to(self.device)
        return augment_pairs(images, g, generator=gen, **self.cfg.pair_augmentation())

    def _step(self, step, inputs, labels, flips, gen, rank, world):
        images, g = self.augmented(*inputs[:2], flips, gen)
        target = F.normalize(self.teacher_embeddings(images), dim=-1)
        with self.autocast():
            student = F.normalize(self.student.image_embeddings(g).float(), dim=-1)
        loss = (student - target).pow(2).sum(-1).mean()
        ok = apply_gradients([self.parts["student"][:2]], loss, grad_clip=self.cfg.grad_clip)
        return {"loss_distill": as_number(loss)} if ok else None

    @staticmethod
    def describe(result: dict) -> str:
        return (ModelStep.describe(result) + f" ({100 * result['top1_ratio']:.0f}% of the RGB teacher's "
                f"{100 * result['teacher_top1']:.2f}%), teacher-student cosine {result['cosine']:.3f}")

    @torch.no_grad()
    def evaluate(self, dataset, collate) -> dict:
        self.train(False)
        teacher, student, targets = self.embed(dataset, collate)
        probe = self.embed(self.probe_set, collate) if self.probe_set is not None else None
        result = {"eval_images": len(teacher), "cosine": float(F.cosine_similarity(teacher, student).mean()),
                  "trainable_fraction": self.fractions["trainable"]}
        if probe is not None:  # frozen embeddings of probe_images training items: kNN and a linear probe
            for name, train_emb, test_emb in (("teacher_", probe[0], teacher), ("", probe[1], student)):
                result[f"{name}knn"] = knn_accuracy(train_emb, probe[2], test_emb, targets)
                result[f"{name}linear"] = linear_probe_accuracy(train_emb, probe[2], test_emb, targets)
        captions, _, held_out = dataset_captions(dataset)
        classes = class_texts(dataset)
        captions = self.captions(captions, targets.tolist(), classes)
        if all(captions):  # image <-> caption retrieval, student (its text tower) and teacher
            unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # each distinct caption embedded once
            where = torch.tensor([unique[c] for c in captions])
            for name, image, text in (("", student, self.student_text), ("teacher_", teacher, self.teacher_text)):
                emb = text(list(unique))[where]
                result |= {f"{name}{k}": v for k, v in retrieval_recall(image, emb, captions).items()}
        if classes and (targets >= 0).all():
            prompts = class_prompts(self.teacher.prompt, classes)  # every template (a prompt ensemble)
            per_class, unseen = len(prompts) // len(classes), unseen_classes(dataset)
            for name, image, text in (("", student, self.student_text), ("teacher_", teacher, self.teacher_text)):
                measures = zero_shot_measures(image, text(prompts), targets, per_class, held_out=held_out,
                                              unseen=unseen)
                result |= {f"{name}{key}": value for key, value in measures.items()}
            result["top1_ratio"] = result["top1"] / max(result["teacher_top1"], 1e-12)
        self.train(True)
        return result

    def captions(self, own: list[str], targets: list[int], classes: list[str]) -> list[str]:
        """Each item's own caption, or its class prompt where it has none ("")."""
        prompts = self.prompts(classes) if classes else []
        return [c or (prompts[t] if 0 <= t < len(prompts) else "") for c, t in zip(own, targets)]

    def teacher_text(self, captions: list[str]) -> Tensor:
        """The teacher's text embeddings (on the CPU), 1,024 captions at a time."""
        return in_chunks(lambda part: self.teacher.text_embeddings(part).float().cpu(), captions)

    def prompts(self, classes: list[str]) -> list[str]:
        """The teacher's prompt (its first template) for each class name: the class captions."""
        return [class_prompt(self.teacher.prompt, c) for c in classes]

    def student_text(self, captions: list[str], *, cpu: bool = True) -> Tensor:
        """Text embeddings through the student's own text tower (the teacher's, unless stage 2 trains
        it), 1,024 captions at a time; on the CPU unless ``cpu=False`` (kept on the device, with gradient)."""
        def embed(part: list[str]) -> Tensor:
            ids, mask = self.teacher.encode_text(part)
            out = self.student.text_embeddings(ids.to(self.device), mask.to(self.device)).float()
            return out.cpu() if cpu else out

        return in_chunks(embed, captions)
