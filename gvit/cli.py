"""The ``gvit`` command line: argparse and printing only; each command calls one job of
:mod:`gvit.tools` or :mod:`gvit.train` (demo, fit-demo, fit, fit-dataset, train, finetune, eval, explain,
report, sweep, leakage, interpret, vl-eval, tokens)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fit import FitConfig
from .settings import add_arguments, from_arguments


def _add_fit_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--option`` per :class:`~gvit.fit.FitConfig` field (as declared there), and ``--device``."""
    add_arguments(parser, FitConfig, title="fitting", **defaults)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU if any")


def _fit_config(args: argparse.Namespace) -> FitConfig:
    return from_arguments(FitConfig, args)


def _score(result: dict, model: str) -> str:
    """One line of an evaluation result, as the run's kind words it."""
    from .train import kind_of

    return kind_of(model).describe(result)


def _demo(args: argparse.Namespace) -> int:
    from .tools.demo import demo_lines, run_demo

    summary = run_demo(args.out, args.overrides, resume=args.resume, overwrite=args.overwrite,
                       baseline=not args.no_baseline, progress=not args.quiet)
    if "top1" in summary:
        print("\n".join(demo_lines(summary, args.out)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .tools.report import training_report

    summary = training_report(args.checkpoint, args.out, num_examples=args.examples, overrides=args.overrides,
                              overwrite=args.overwrite)
    print(f"{_score(summary, summary['model'])} -> {Path(args.out) / 'report.html'}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .tools.explain import explain_files

    summary = explain_files(args.checkpoint, args.inputs, args.out, target=args.target, grid=args.grid,
                            batch_size=args.batch_size, skip_bad=args.skip_bad, overwrite=args.overwrite,
                            progress=not args.quiet)
    print(f"explained {len(summary['images'])} image(s), {len(summary['skipped'])} unreadable skipped "
          f"-> {Path(args.out) / 'index.html'}")
    return 0


def _fit_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_fit_demo

    print(run_fit_demo(args.out, _fit_config(args), images=args.images, size=args.size, seed=args.seed,
                       overwrite=args.overwrite, device=args.device, progress=not args.quiet))
    outdir = Path(args.out)
    print(f"wrote {outdir / 'reconstructions.png'} (image | Gaussians | 2-sigma ellipses), "
          f"{outdir / 'gaussians.safetensors'}, {outdir / 'report.md'}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .tools.fit_files import fit_files

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = fit_files(args.inputs, args.out, _fit_config(args), batch_size=args.batch_size, dtype=args.dtype,
                        skip_bad=args.skip_bad, overwrite=args.overwrite, pictures=not args.no_pictures,
                        device=args.device, progress=not args.quiet)
    print(f"fitted {summary['fitted']} image(s) in {summary['seconds']:.1f} s, mean PSNR {summary['mean_psnr']:.2f} dB"
          f"; {summary['already_done']} already done; {len(summary['skipped_bad'])} unreadable skipped"
          f" -> {summary['out']}/metrics.csv")
    return 0


def _fit_dataset(args: argparse.Namespace) -> int:
    from .tools.fit_dataset import fit_dataset

    result = fit_dataset(args.data, args.out, _fit_config(args), split=args.split, val_every=args.val_every,
                         shard_size=args.shard_size,
                         batch_size=args.batch_size, limit=args.limit, dtype=args.dtype, skip_bad=args.skip_bad,
                         overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    if "num_images" in result:
        print(f"{result['num_images']} images in {len(result['shards'])} shard(s): mean PSNR "
              f"{result['mean_psnr']:.2f} dB, mean count {result['mean_count']:.1f}, "
              f"{result['compression_vs_8bit']:.2f}x vs 8-bit pixels, {len(result['skipped'])} skipped "
              f"-> {args.out}/manifest.json")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    overrides = list(args.overrides) + ([f"finetune_from={args.checkpoint}"] if args.command == "finetune" else [])
    cfg = load_config(args.config, overrides, as_model=args.as_model)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if result.get("finished") and "eval_images" in result:
        print(f"{cfg.model}: {_score(result, cfg.model)} -> {cfg.out}/result.json")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import load_trained

    trained = load_trained(args.checkpoint, args.overrides)
    result = trained.evaluate()
    print(f"{args.checkpoint} ({result['eval_split']} split): {trained.kind.describe(result)}")
    return 0


def _tokens(args: argparse.Namespace) -> int:
    from .tools.tokens import decode_tokens, encode_tokens, tokenizer_report
    from .train.tokenizer_step import TokenizerStep

    if args.action == "encode":
        summary = encode_tokens(args.checkpoint, args.out, overrides=args.overrides, limit=args.limit,
                                overwrite=args.overwrite, progress=not args.quiet)
        print(f"{summary['images']} images -> {Path(args.out) / 'tokens.safetensors'} "
              f"({summary['num_tokens']} tokens, {summary['bits_per_image']:.0f} bits per image)")
    elif args.action == "decode":
        if not args.tokens:
            raise ValueError("gvit tokens decode needs --tokens FILE (written by gvit tokens encode)")
        result = decode_tokens(args.checkpoint, args.tokens, args.out, limit=args.limit, overwrite=args.overwrite)
        print(f"{result['images']} images -> {Path(args.out) / 'decoded.safetensors'} (decoded.png)")
    else:
        checkpoints = [args.checkpoint] + list(args.also or [])
        result = tokenizer_report(checkpoints, args.out, names=args.names, overwrite=args.overwrite)
        for row in result["tokenizers"]:
            print(f"{row['name']}: {TokenizerStep.describe(row)}")
        print(f"-> {Path(args.out) / 'report.html'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .tools.sweep import parse_grid, run_sweep

    rows = run_sweep(args.config, parse_grid(args.grid), args.out, overrides=args.overrides, nproc=args.nproc,
                     overwrite=args.overwrite)
    print(f"{len(rows)} variant(s) finished -> {Path(args.out) / 'results.md'} (results.csv, plot_*.png)")
    return 0


def _leakage(args: argparse.Namespace) -> int:
    from .tools.leakage import run_leakage

    f = run_leakage(args.checkpoint, args.sgd_train, args.sgd_test, args.out, overrides=args.overrides,
                    data=args.data, overwrite=args.overwrite, progress=not args.quiet)
    m, r = f["cross_training"], f["rasterisation"]
    print(f"cross-training top-1 (trained -> evaluated): SGD->SGD {100 * m['sgd']['sgd']:.1f}%, SGD->learned "
          f"{100 * m['sgd']['learned']:.1f}%, learned->learned {100 * m['learned']['learned']:.1f}%, learned->SGD "
          f"{100 * m['learned']['sgd']:.1f}%; renders: SGD {100 * r['sgd']['renders']:.1f}%, learned "
          f"{100 * r['learned']['renders']:.1f}% -> {Path(args.out) / 'leakage.md'}")
    return 0


def _interpret(args: argparse.Namespace) -> int:
    from .tools.interpret import saliency_statistics

    f = saliency_statistics(args.checkpoint, args.out, limit=args.limit, batch_size=args.batch_size,
                            overrides=args.overrides, overwrite=args.overwrite, progress=not args.quiet)
    line = (f"{f['images']} images: Spearman(log det Sigma, CDAM) {f['det_cdam_spearman']['mean']:+.3f}, "
            f"with |CDAM| {f['det_abs_cdam_spearman']['mean']:+.3f}")
    if "cdam_mass_inside" in f:
        m = f["cdam_mass_inside"]
        line += (f"; positive CDAM mass on the object {100 * m['inside']['mean']:.1f}% (Gaussians there "
                 f"{100 * m['gaussians_inside']['mean']:.1f}%, object area {100 * m['area']['mean']:.1f}%)")
    print(line + f" -> {Path(args.out) / 'interpret.md'}")
    return 0


def _vl_eval(args: argparse.Namespace) -> int:
    from .tools.vl_eval import vl_eval

    rows = vl_eval(args.checkpoint, args.gaussians, args.out, limit=args.limit, overwrite=args.overwrite,
                   progress=not args.quiet)["rows"]
    for r in rows:
        print(f"{r['gaussians']}: k={r['k']} {r['compression']:.2f}x, "
              f"zero-shot {100 * r.get('top1', float('nan')):.1f}% "
              f"(teacher {100 * r.get('teacher_top1', float('nan')):.1f}%), cosine {r['cosine']:.3f}")
    print(f"-> {Path(args.out) / 'vl_eval.md'}")
    return 0


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
    demo.set_defaults(func=_demo)

    fdemo = sub.add_parser("fit-demo", parents=job,
                           help="fit Gaussians to a few built-in shapes images and write a report")
    fdemo.add_argument("--images", type=int, default=8)
    fdemo.add_argument("--size", type=int, default=32)
    fdemo.add_argument("--out", default="runs/fit-demo")
    _add_fit_options(fdemo, num_gaussians=128, iters=300, dssim_weight=0.2)
    fdemo.set_defaults(func=_fit_demo)

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
    _add_fit_options(fit)
    fit.set_defaults(func=_fit)

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
    ds.add_argument("--dtype", choices=("float32", "float16"), default="float16")
    ds.add_argument("--skip-bad", action="store_true")
    _add_fit_options(ds)
    ds.set_defaults(func=_fit_dataset)

    tr = sub.add_parser("train", parents=job, help="train GViT or a baseline (config file + key=value overrides)",
                        description="Keys and defaults: the core (gvit.train.TrainConfig) and the chosen model kind's "
                                    "section (gvit.train.KINDS[model].settings); a key of another kind is refused. "
                                    "Runs under torchrun as well.")
    tr.add_argument("--config", help="YAML file of key: value")
    tr.add_argument("--as-model", metavar="KIND", help="train this model kind with the config's keys that it "
                                                         "shares (a baseline from a GViT recipe); the rest are dropped")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    tr.set_defaults(func=_train)

    ft = sub.add_parser("finetune", parents=job,
                        help="transfer a GViT checkpoint: frozen encoder, classifier with layer-wise "
                                          "lr decay (config keys as for train, e.g. layer_decay=0.65)")
    ft.add_argument("--checkpoint", required=True, help="a model=gvit checkpoint")
    ft.add_argument("--config", help="YAML file of key: value")
    ft.set_defaults(as_model=None)
    ft.add_argument("overrides", nargs="*", metavar="key=value")
    ft.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    ft.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its evaluation split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... eval_split=test")
    ev.set_defaults(func=_eval)

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
    ex.set_defaults(func=_explain)

    sw = sub.add_parser("sweep", parents=[overwrite],
                        help="train every combination of a grid of config values; resumable; writes a "
                             "results table and one plot per key (the paper's Fig. 3 and Table 1)")
    sw.add_argument("--config", help="base YAML config")
    sw.add_argument("--grid", action="append", required=True, metavar="key=v1,v2,...",
                    help="a config key and its values (repeat for more keys)")
    sw.add_argument("--out", required=True, help="sweep folder (one subfolder per variant)")
    sw.add_argument("--nproc", type=int, default=1, help="processes per variant (torchrun when > 1)")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="settings shared by every variant")
    sw.set_defaults(func=_sweep)

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
    lk.set_defaults(func=_leakage)

    it = sub.add_parser("interpret", parents=job,
                        help="interpretability in numbers over a test set: det(Sigma)-CDAM rank "
                             "correlation, and CDAM mass on the object where masks exist (shapes)")
    it.add_argument("--checkpoint", required=True, help="a model=gvit checkpoint")
    it.add_argument("--out", required=True)
    it.add_argument("--limit", type=int, default=512, help="test images, spread over the split (default 512)")
    it.add_argument("--batch-size", type=int, default=128)
    it.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... eval_split=test")
    it.set_defaults(func=_interpret)

    vl = sub.add_parser("vl-eval", parents=job,
                        help="splat-stage checkpoints (model=splat_distill / splat_align) on fitted test "
                             "Gaussians beside the RGB teacher: zero-shot, retrieval, held-out pairs, kNN, "
                             "linear probe, cosine, against the compression ratio")
    vl.add_argument("--checkpoint", required=True, nargs="+", help="one checkpoint for every folder, or one per folder")
    vl.add_argument("--gaussians", required=True, nargs="+", help="gvit fit-dataset folders of test images")
    vl.add_argument("--out", required=True)
    vl.add_argument("--limit", type=int, default=None, help="test items per folder, spread over it (default: all)")
    vl.set_defaults(func=_vl_eval)

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
    tk.set_defaults(func=_tokens)

    rep = sub.add_parser("report", parents=[overwrite],
                         help="evaluate a checkpoint and write report.html with examples and curves")
    rep.add_argument("--checkpoint", required=True)
    rep.add_argument("--out", required=True)
    rep.add_argument("--examples", type=int, default=8, help="test images shown")
    rep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=... limit_eval=1000")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import ImageReadError

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value settings may follow flags (``gvit train --quiet out=x``): argparse stops taking positionals there
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, or argparse's own usage error (exit status 2)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImageReadError, FloatingPointError, ChildProcessError) as exc:
        print(f"gvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gvit {args.command}: interrupted; finished outputs are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
