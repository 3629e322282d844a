"""Why a joint stage that learns costs accuracy: the steps after classifier pre-training, taken apart.

Trains a GViT recipe (the demo's settings with ``--common`` overrides, one seed) up to its joint
stage once, then continues a fresh copy of that state over the joint stage's steps (the same
batches, flips and g0 as the run) in each of these ways, and evaluates each on val:

- the classifier alone on the cached Gaussians (its pre-training, continued);
- the classifier alone on live Gaussians (encoder frozen, fresh g0, test-time fitting as configured);
- the joint stage as configured (``GViTStep.step``: reconstruction + ``lambda_cls`` x class loss);
- the same, the encoder learning from the reconstruction loss alone (the class loss trains the
  classifier only);
- the same, the encoder learning from the class loss alone;
- the encoder learning from the class loss alone, the classifier frozen.

Each row also shows the mean class loss of its first and last 10 steps (on the batches it trains
on). Then the reach of the encoder's class gradient: one encoder step on the class loss alone
(classifier frozen), at the joint stage's learning rate and a tenth of it, taken on each of 20
batches in turn; the change of the class loss on that batch against the mean change on 4 other batches.

    python bench/joint_stage.py --seed 0 --common steps=1600 classifier_from=0.15625 pretrain_until=0.96875 \
        guidance=false phase_lr=true lr_floor=0.1 classifier_lr_scale=1.0 joint_lr=0.1 lambda_cls=0.1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gvit.data.transforms import crop_boxes
from gvit.losses import reconstruction_loss
from gvit.tools.demo import demo_config
from _util import train_until_stage

from gvit.train import evaluate, kind_of, load_checkpoint, model_step, step_generator
from gvit.train.data import StepBatches, flip_gaussians, limit
from gvit.train.optim import apply_gradients, set_learning_rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--common", nargs="*", default=[], help="key=value overrides of the demo's settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the run up to the joint stage here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.keep or Path(tmp) / "prefix"
        cfg = demo_config(out.parent, [*a.common, f"seed={a.seed}"])
        cfg = replace(cfg, out=str(out))
        if cfg.crop_scale_min < 1:
            raise SystemExit("--common: this bench replays the run's flips only; it needs crop_scale_min=1")
        Stage(cfg).report()


# the joint stage's steps taken otherwise: (the losses whose gradient reaches the encoder, whether
# the classifier learns); every one trains on the run's batches, flips and g0
VARIANTS = {"classifier, live Gaussians": ((), True), "encoder: reconstruction only": (("rec",), True),
            "encoder: class only": (("cls",), True), "encoder: class only, classifier frozen": (("cls",), False)}


class Stage:
    """The run's state where its joint stage begins, and its steps from there."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.start, self.end = train_until_stage(cfg, "joint"), cfg.steps
        step = load_checkpoint(Path(cfg.out) / "checkpoint.pt")["step"]
        if step != self.start:
            raise SystemExit(f"{cfg.out}: the kept run stopped at step {step}, not {self.start}")
        kind = kind_of(cfg)
        self.train_ds, _ = kind.datasets(cfg)
        self.val_ds = limit(kind.datasets(replace(cfg, eval_split="val"))[1], cfg.limit_eval)
        self.collate = kind.collate(cfg)

    def fresh(self):
        """The run at the start of its joint stage, read from disk each time (a loaded optimiser
        state shares its tensors with the state it was loaded from, and steps change them)."""
        run = model_step(self.cfg, len(self.train_ds.classes), "cpu")
        run.attach_training_set(self.train_ds, self.collate)
        run.load_state_dict(load_checkpoint(Path(self.cfg.out) / "checkpoint.pt"))
        return run

    def batches(self):
        """``(step, images, images flipped as the run flips them, labels, flips, the step's generator
        with the flips and crop boxes drawn, so that g0 comes next, as in the run)``."""
        cfg = self.cfg
        sampler = StepBatches(len(self.train_ds), cfg.batch_size, self.start, self.end, cfg.seed, 0, 1)
        loader = torch.utils.data.DataLoader(self.train_ds, batch_sampler=sampler, collate_fn=self.collate)
        for step, (images, labels) in enumerate(loader, start=self.start):
            gen = step_generator(cfg.seed, step)
            flips = (torch.rand(cfg.batch_size, generator=gen) < 0.5) & cfg.hflip
            crop_boxes(cfg.batch_size, cfg.image_size, cfg.image_size, scale=(cfg.crop_scale_min, 1.0),
                       generator=gen)  # drawn (and unused at scale 1) before g0, as the run draws them
            flipped = torch.where(flips[:, None, None, None], images.flip(-1), images)
            yield step, images, flipped, labels, flips, gen

    @staticmethod
    def class_loss(run, images, labels, g0, encoder_learns: bool):
        """The encoder's raw Gaussians and the class loss of the classifier reading them (after
        test-time fitting); its gradient reaches the encoder only when ``encoder_learns``."""
        model = run.model
        g = model.encode(images, g0)
        logits = model.classifier(model.refine(images, g if encoder_learns else g.detach()))
        return g, F.cross_entropy(logits, labels)

    def variant(self, how: str) -> tuple[float, float, float]:
        """Val top-1 after the joint stage's steps taken ``how`` (a key of :data:`VARIANTS`), and the
        mean class loss of the first and last 10 of them."""
        run, losses, cfg = self.fresh(), [], self.cfg
        encoder, classifier = run.parts["encoder"][:2], run.parts["classifier"][:2]
        for step, images, flipped, labels, flips, gen in ([] if how == "before" else self.batches()):
            for name, (_, opt, _) in run.parts.items():
                set_learning_rate([opt], run.part_learning_rate(name, step))
            if how == "joint as configured":  # the run's own step, with the step's generator from its start
                losses.append(run.step(step, images, labels, step_generator(cfg.seed, step), 0, 1)["loss_cls"])
                continue
            if how == "classifier, cached Gaussians":  # as GViTStep draws a cached batch
                if run.cache is None:
                    run.cache = run.encode_training_set()
                raw, targets = run.cache
                index = torch.randint(len(targets), (cfg.batch_size,), generator=gen)
                loss = F.cross_entropy(run.model.classifier(flip_gaussians(raw[index], flips)), targets[index])
                apply_gradients([classifier], loss, grad_clip=cfg.grad_clip)
                losses.append(float(loss.detach()))
                continue
            to_encoder, classifier_learns = VARIANTS[how]
            g0 = run.model.sample_g0(cfg.batch_size, gen)
            g, cls = self.class_loss(run, flipped, labels, g0, encoder_learns="cls" in to_encoder)
            loss = cls
            if "rec" in to_encoder:
                rendered = run.model.reconstruct(g, *flipped.shape[-2:])
                loss = loss + reconstruction_loss(rendered, flipped, cfg.pixel_loss)
            apply_gradients([classifier] * classifier_learns + [encoder] * bool(to_encoder), loss,
                            grad_clip=cfg.grad_clip)
            losses.append(float(cls.detach()))
        top1 = evaluate(run, self.val_ds, self.collate)["top1"]
        first, last = (sum(losses[:10]) / max(1, len(losses[:10])), sum(losses[-10:]) / max(1, len(losses[-10:])))
        return top1, first, last

    def reach(self, scale: float) -> tuple[float, float]:
        """Mean change of the class loss on its own batch and on 4 other batches after one encoder
        step on the class loss alone (classifier frozen, lr ``scale`` x the joint stage's)."""
        run, batches = self.fresh(), []
        for _, _, flipped, labels, _, gen in self.batches():
            batches.append((flipped, labels, run.model.sample_g0(self.cfg.batch_size, gen)))
            if len(batches) == 24:
                break
        n_held = min(4, len(batches) // 2)  # 4 unless the joint stage is shorter than 24 steps
        held, batches, own, other = batches[-n_held:], batches[:-n_held], [], []
        opt = run.parts["encoder"][1]

        def loss(batch):
            with torch.no_grad():
                return float(self.class_loss(run, *batch, encoder_learns=False)[1])

        for batch in batches:
            set_learning_rate([opt], run.part_learning_rate("encoder", self.start) * scale)
            before_own, before_other = loss(batch), sum(map(loss, held)) / len(held)
            opt.zero_grad(set_to_none=True)
            self.class_loss(run, *batch, encoder_learns=True)[1].backward()
            opt.step()
            own.append(loss(batch) - before_own)
            other.append(sum(map(loss, held)) / len(held) - before_other)
        return sum(own) / len(own), sum(other) / len(other)

    def report(self) -> None:
        cfg = self.cfg
        print(f"{cfg.data}, seed {cfg.seed}: joint stage = steps {self.start}-{self.end} of {cfg.steps}, "
              f"lambda_cls {cfg.lambda_cls}, fit_steps {cfg.fit_steps}, token_neighbours {cfg.token_neighbours}\n")
        print("| the joint stage's steps taken as | val top-1 % | class loss, first 10 steps | last 10 | s |")
        print("|---|---|---|---|---|")
        for how in ("before", "classifier, cached Gaussians", "joint as configured", *VARIANTS):
            t0 = time.perf_counter()
            top1, first, last = self.variant(how)
            label = "(none: the state before the joint stage)" if how == "before" else how
            losses = ("-", "-") if how == "before" else (f"{first:.3f}", f"{last:.3f}")
            print(f"| {label} | {100 * top1:.1f} | {losses[0]} | {losses[1]} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
        print("\n| one encoder step on the class loss alone, lr | class loss change on its batch "
              "| on 4 other batches |")
        print("|---|---|---|")
        for scale in (1.0, 0.1):
            own, other = self.reach(scale)
            print(f"| {scale:g} x the joint stage's | {own:+.4f} | {other:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
