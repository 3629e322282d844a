"""The ``gvit`` argument parser: one subcommand per job, each set to its handler in
:mod:`gvit.cli.commands`."""

from __future__ import annotations

import argparse

from . import commands
from .commands import add_fit_options

__all__ = ["build_parser", "OVERWRITE"]


OVERWRITE = ("write into a folder that holds other files, another job's outputs or work made with other settings "
             "(a run there starts again)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvit", description="Vision on 2D Gaussians.")
    sub = parser.add_subparsers(dest="command", required=True)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    job = [quiet, overwrite]  # the options every job that writes a folder takes

    demo = sub.add_parser("demo", parents=job,
                          help="train a small GViT on the built-in shapes (a few minutes on a CPU) and "
                               "write a report with accuracy, reconstructions and Gaussian overlays",
                          description="Settings: gvit.tools.demo.DEMO_SETTINGS; key=value overrides any GViT setting "
                                      "(gvit.train.GViTConfig).")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    demo.add_argument("--no-baseline", action="store_true", help="skip the patch ViT trained with the same budget")
    demo.set_defaults(func=commands.demo)

    fdemo = sub.add_parser("fit-demo", parents=job,
                           help="fit Gaussians to a few built-in shapes images and write a report")
    fdemo.add_argument("--images", type=int, default=8)
    fdemo.add_argument("--size", type=int, default=32)
    fdemo.add_argument("--out", default="runs/fit-demo")
    add_fit_options(fdemo, num_gaussians=128, iters=300, dssim_weight=0.2)
    fdemo.set_defaults(func=commands.fit_demo)

    fit = sub.add_parser("fit", parents=[quiet], help="fit Gaussians to image files or folders of images",
                         description="Writes per image NAME.gaussians.safetensors, NAME.recon.png, "
                                     "NAME.overlay.png (2-sigma ellipses) and one metrics.csv. Rerunning skips "
                                     "images that are done (a metrics row and a valid Gaussian file).")
    fit.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    fit.add_argument("--out", required=True)
    fit.add_argument("--batch-size", type=int, default=None,
                     help="images of one size fitted together (default: as many as use a quarter of the free "
                          "memory, at most 256)")
    fit.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    fit.add_argument("--skip-bad", action="store_true", help="skip (and list) unreadable images instead of failing")
    fit.add_argument("--overwrite", action="store_true",
                     help="refit every image, also in a folder holding other files or work made with other settings")
    fit.add_argument("--no-pictures", action="store_true", help="write no PNGs")
    add_fit_options(fit)
    fit.set_defaults(func=commands.fit)

    from ..codec import BitDepths

    enc = sub.add_parser("encode", parents=job, help="code images as .gvc files (quantised, entropy-coded Gaussians)",
                         description="Writes NAME.gvc per image and codec.csv (bytes, bpp, PSNR and SSIM of the "
                                     "decoded image, seconds). Resumable. Format: docs/codec.md.")
    enc.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    enc.add_argument("--out", required=True)
    rate = enc.add_mutually_exclusive_group()
    rate.add_argument("--bpp", type=float, default=None,
                      help="target bits per pixel; each file stays under it (default 0.5)")
    rate.add_argument("--num-gaussians", type=int, default=None, help="a fixed Gaussian budget instead of a rate")
    depths = BitDepths()
    for field, what in (("position", "sub-pixel bits of positions"), ("scale", "log2 steps per octave of scales"),
                        ("angle", "bits of the angle"), ("color", "bits per colour channel"),
                        ("opacity", "bits of opacity")):
        enc.add_argument(f"--{field}-bits", type=int, default=getattr(depths, field),
                         help=f"{what} (default %(default)s)")
    enc.add_argument("--skip-bad", action="store_true", help="skip (and list) unreadable images instead of failing")
    enc.set_defaults(func=commands.encode)

    dec = sub.add_parser("decode", parents=job, help="render .gvc files to PNGs at any resolution")
    dec.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    dec.add_argument("--out", required=True)
    dec.add_argument("--scale", type=float, default=1.0, help="output size as a multiple of the coded image's")
    dec.set_defaults(func=commands.decode)

    ds = sub.add_parser("fit-dataset", parents=job,
                        help="convert a whole dataset into sharded Gaussian files plus labels",
                        description="Resumable (finished shards are kept); run under torchrun to split the "
                                    "shards across processes.")
    ds.add_argument("--data", required=True, help="'shapes', a folder with <split>.zip or <split>/, an "
                                                   "ImageFolder (folder or .zip), or CIFAR python batches")
    ds.add_argument("--split", choices=("train", "val", "test"), default="train")
    ds.add_argument("--val-every", type=int, default=0, help="train / val: every n-th training image of each class "
                                                              "is val (as the training runs' val_every)")
    ds.add_argument("--out", required=True)
    ds.add_argument("--shard-size", type=int, default=1024)
    ds.add_argument("--batch-size", type=int, default=256)
    ds.add_argument("--limit", type=int, default=None, help="convert only the first N images")
    ds.add_argument("--dtype", choices=("float32", "float16", "gvc"), default="float16",
                    help="how the Gaussians are stored: floats, or gvc (quantised and entropy-coded, about 4-5 bytes "
                         "a Gaussian; docs/codec.md)")
    ds.add_argument("--skip-bad", action="store_true")
    add_fit_options(ds)
    ds.set_defaults(func=commands.fit_dataset)

    tr = sub.add_parser("train", parents=job, help="train GViT or a baseline (config file + key=value overrides)",
                        description="Keys and defaults: the core (gvit.train.TrainConfig) and the chosen model kind's "
                                    "section (gvit.train.KINDS[model].settings); a key of another kind is refused. "
                                    "Runs under torchrun as well.")
    tr.add_argument("--config", help="YAML file of key: value")
    tr.add_argument("--as-model", metavar="KIND", help="train this model kind with the config's keys that it "
                                                         "shares (a baseline from a GViT recipe); the rest are dropped")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    tr.set_defaults(func=commands.train)

    ft = sub.add_parser("finetune", parents=job,
                        help="transfer a GViT checkpoint: frozen encoder, classifier with layer-wise "
                                          "lr decay (config keys as for train, e.g. layer_decay=0.65)")
    ft.add_argument("--checkpoint", required=True, help="a model=gvit checkpoint")
    ft.add_argument("--config", help="YAML file of key: value")
    ft.set_defaults(as_model=None)
    ft.add_argument("overrides", nargs="*", metavar="key=value")
    ft.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    ft.set_defaults(func=commands.train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its evaluation split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... eval_split=test")
    ev.set_defaults(func=commands.evaluate)

    ex = sub.add_parser("explain", parents=job,
                        help="per image: reconstruction, Gaussian ellipses, det(Sigma) map, CDAM map and "
                             "top-5 of a GViT checkpoint, as PNG panels and index.html")
    ex.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ex.add_argument("--checkpoint", required=True, help="a model=gvit checkpoint")
    ex.add_argument("--out", required=True)
    ex.add_argument("--class", dest="target", default=None,
                    help="explain this class (index or name) instead of the predicted one")
    ex.add_argument("--grid", type=int, default=16, help="CDAM grid cells per side (default 16, as the paper)")
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--skip-bad", action="store_true", help="skip (and list) unreadable images instead of failing")
    ex.set_defaults(func=commands.explain)

    sw = sub.add_parser("sweep", parents=[overwrite],
                        help="train every combination of a grid of config values; resumable; writes a "
                             "results table and one plot per key (the paper's Fig. 3 and Table 1)")
    sw.add_argument("--config", help="base YAML config")
    sw.add_argument("--grid", action="append", required=True, metavar="key=v1,v2,...",
                    help="a config key and its values (repeat for more keys)")
    sw.add_argument("--out", required=True, help="sweep folder (one subfolder per variant)")
    sw.add_argument("--nproc", type=int, default=1, help="processes per variant (torchrun when > 1)")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="settings shared by every variant")
    sw.set_defaults(func=commands.sweep)

    lk = sub.add_parser("leakage", parents=job,
                        help="the paper's leakage tests: cross-training on SGD-fitted vs learned Gaussians, "
                             "and classifiers on Gaussians vs on their renders (Markdown and CSV tables)")
    lk.add_argument(
        "--checkpoint", required=True, help="a model=gvit checkpoint (its encoder makes the learned Gaussians)"
    )
    lk.add_argument("--sgd-train", required=True, help="gvit fit-dataset folder of the training split (same k)")
    lk.add_argument("--sgd-test", required=True, help="gvit fit-dataset folder of the test split")
    lk.add_argument("--out", required=True)
    lk.add_argument("--data", help="read the images from here instead of the dataset recorded in the SGD folders")
    lk.add_argument("overrides", nargs="*", metavar="key=value", help="classifier training settings, e.g. steps=400")
    lk.set_defaults(func=commands.leakage)

    it = sub.add_parser("interpret", parents=job,
                        help="interpretability in numbers over a test set: det(Sigma)-CDAM rank "
                             "correlation, and CDAM mass on the object where masks exist (shapes)")
    it.add_argument("--checkpoint", required=True, help="a model=gvit checkpoint")
    it.add_argument("--out", required=True)
    it.add_argument("--limit", type=int, default=512, help="test images, spread over the split (default 512)")
    it.add_argument("--batch-size", type=int, default=128)
    it.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... eval_split=test")
    it.set_defaults(func=commands.interpret)

    vl = sub.add_parser("vl-eval", parents=job,
                        help="splat-stage checkpoints (model=splat_distill / splat_align) on fitted test "
                             "Gaussians beside the RGB teacher: zero-shot, retrieval, held-out pairs, kNN, "
                             "linear probe, cosine, against the compression ratio")
    vl.add_argument("--checkpoint", required=True, nargs="+", help="one checkpoint for every folder, or one per folder")
    vl.add_argument("--gaussians", required=True, nargs="+", help="gvit fit-dataset folders of test images")
    vl.add_argument("--out", required=True)
    vl.add_argument("--limit", type=int, default=None, help="test items per folder, spread over it (default: all)")
    vl.set_defaults(func=commands.vl_eval)

    tk = sub.add_parser("tokens", parents=job,
                        help="a trained tokenizer (model=tokenizer): encode its evaluation split to a token "
                             "file, decode a token file to images, or report several tokenizers side by side")
    tk.add_argument("action", choices=("encode", "decode", "report"))
    tk.add_argument("--checkpoint", required=True, help="a model=tokenizer checkpoint (report: the first of them)")
    tk.add_argument("--out", required=True)
    tk.add_argument("--tokens", help="decode: a token file written by gvit tokens encode")
    tk.add_argument("--also", nargs="*", metavar="CHECKPOINT", help="report: more tokenizer checkpoints")
    tk.add_argument("--names", nargs="*", help="report: a name per checkpoint (default: the run folders' names)")
    tk.add_argument("--limit", type=int, default=None, help="encode / decode at most this many images")
    tk.add_argument("overrides", nargs="*", metavar="key=value", help="encode: e.g. data=... eval_split=train")
    tk.set_defaults(func=commands.tokens)

    rep = sub.add_parser("report", parents=[overwrite],
                         help="evaluate a checkpoint and write report.html with examples and curves")
    rep.add_argument("--checkpoint", required=True)
    rep.add_argument("--out", required=True)
    rep.add_argument("--examples", type=int, default=8, help="test images shown")
    rep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... limit_eval=1000")
    rep.set_defaults(func=commands.report)
    return parser
