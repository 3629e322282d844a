"""Measures of embeddings ``[N, D]`` (image or text, any scale: cosine where it matters): zero-shot
classification by class-prompt embeddings, image <-> text retrieval, a weighted kNN classifier and a
linear probe. Plain tensors in, numbers out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["same_caption", "zero_shot_accuracy", "zero_shot_measures", "retrieval_recall", "knn_accuracy",
           "linear_probe_accuracy"]


def same_caption(captions: list[str]) -> Tensor:
    """``[N, N]`` bool: items i and j carry the same caption text."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions])
    return index[:, None] == index[None, :]


def zero_shot_accuracy(image: Tensor, class_text: Tensor, targets: Tensor, templates: int = 1, *,
                       among: list[int] | None = None) -> Tensor:
    """Per image, 1 where the nearest class-prompt embedding (cosine) is its class: ``[N]``.
    ``class_text`` is ``[C * templates, D]``, class-major; with several templates per class their
    l2-normalised embeddings are averaged (CLIP's prompt ensembling). ``among``: only these classes
    are candidates (an image of another class then always counts 0)."""
    if templates < 1 or len(class_text) % templates:
        raise ValueError(f"class_text: {len(class_text)} embeddings are not {templates} per class")
    class_text = F.normalize(class_text, dim=-1).unflatten(0, (-1, templates)).mean(1)
    scores = F.normalize(image, dim=-1) @ F.normalize(class_text, dim=-1).T
    if among is not None:
        candidate = torch.zeros(len(class_text), dtype=torch.bool, device=scores.device)
        candidate[among] = True
        scores = scores.masked_fill(~candidate, float("-inf"))
    return (scores.argmax(-1) == targets).float()


def zero_shot_measures(image: Tensor, class_text: Tensor, targets: Tensor, templates: int = 1, *,
                       held_out: Tensor | None = None, unseen: list[int] | None = None) -> dict[str, float]:
    """Zero-shot ``top1`` over all classes, ``top1_held_out`` on the images ``held_out`` marks (still
    among all classes), and with ``unseen`` classes (held out of training) ``top1_unseen``: their
    images among the unseen classes only, and ``top1_seen``: the other images among the other classes."""
    hits = zero_shot_accuracy(image, class_text, targets, templates)
    out = {"top1": float(hits.mean())}
    if held_out is not None and held_out.any():
        out["top1_held_out"] = float(hits[held_out].mean())
    if unseen:
        is_unseen = torch.isin(targets, torch.tensor(unseen, device=targets.device))
        seen = [c for c in range(len(class_text) // templates) if c not in unseen]
        for name, mask, among in (("top1_unseen", is_unseen, unseen), ("top1_seen", ~is_unseen, seen)):
            if mask.any() and among:
                out[name] = float(zero_shot_accuracy(image[mask], class_text, targets[mask], templates,
                                                     among=among).mean())
    return out


def retrieval_recall(image: Tensor, text: Tensor, captions: list[str], ks=(1, 5, 10)) -> dict[str, float]:
    """Image -> text and text -> image recall@k over a split where image i's caption is
    ``captions[i]`` (embedded as ``text[i]``). Repeated captions (class prompts, repeated shape
    descriptions) are one text: image -> text ranks the distinct captions, a hit when the image's own
    is among the first k (with class prompts: top-k accuracy); text -> image asks each distinct caption
    once, a hit when one of the first k images carries it."""
    first_item: dict[str, int] = {}  # each distinct caption -> its first item, in order of appearance
    for i, c in enumerate(captions):
        first_item.setdefault(c, i)
    index = {c: u for u, c in enumerate(first_item)}
    own = torch.tensor([index[c] for c in captions], device=image.device)  # [N]: each image's caption
    first = torch.tensor(list(first_item.values()), device=image.device)  # [U]: one item per caption
    scores = F.normalize(image, dim=-1) @ F.normalize(text[first], dim=-1).T  # [N, U]
    i2t_hits = scores.argsort(-1, descending=True) == own[:, None]  # [N, U]: the r-th caption is the image's own
    order = scores.T.argsort(-1, descending=True)  # [U, N]
    t2i_hits = own[order] == torch.arange(len(first_item), device=image.device)[:, None]
    out = {}
    for name, hits in (("i2t", i2t_hits), ("t2i", t2i_hits)):
        for k in ks:
            out[f"{name}_r{k}"] = float(hits[:, :k].any(1).float().mean())
    return out


def knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Top-1 of a weighted kNN vote on cosine similarity (each of the ``k`` nearest training items
    votes for its label with weight exp(similarity / temperature))."""
    sim = F.normalize(test.double(), dim=-1) @ F.normalize(train.double(), dim=-1).T
    top, index = sim.topk(min(k, len(train)), dim=-1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(len(test), classes, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return float((votes.argmax(-1) == test_labels).double().mean())


def linear_probe_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, *,
                          weight_decay: float = 1e-4, steps: int = 100) -> float:
    """Top-1 of a multinomial logistic regression on standardised features (float64, L-BFGS to
    convergence, L2 penalty ``weight_decay`` on the weights)."""
    mean, std = train.double().mean(0), train.double().std(0).clamp_min(1e-8)
    x, xt = (train.double() - mean) / std, (test.double() - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(-1) == test_labels).double().mean())
