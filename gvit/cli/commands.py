"""What each ``gvit`` command does once its arguments are parsed: call one job of :mod:`gvit.tools` or
:mod:`gvit.train` and print its result in a line or two."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..fit import FitConfig
from ..settings import add_arguments, from_arguments

__all__ = ["add_fit_options", "demo", "report", "explain", "fit_demo", "fit", "encode", "decode", "fit_dataset",
           "train", "evaluate", "tokens", "sweep", "leakage", "interpret", "vl_eval"]


def add_fit_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--option`` per :class:`~gvit.fit.FitConfig` field (as declared there), and ``--device``."""
    add_arguments(parser, FitConfig, title="fitting", **defaults)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU if any")


def _fit_config(args: argparse.Namespace) -> FitConfig:
    return from_arguments(FitConfig, args)


def _score(result: dict, model: str) -> str:
    """One line of an evaluation result, as the run's kind words it."""
    from ..train import kind_of

    return kind_of(model).describe(result)


def demo(args: argparse.Namespace) -> int:
    from ..tools.demo import demo_lines, run_demo

    summary = run_demo(args.out, args.overrides, resume=args.resume, overwrite=args.overwrite,
                       baseline=not args.no_baseline, progress=not args.quiet)
    if "top1" in summary:
        print("\n".join(demo_lines(summary, args.out)))
    return 0


def report(args: argparse.Namespace) -> int:
    from ..tools.report import training_report

    summary = training_report(args.checkpoint, args.out, num_examples=args.examples, overrides=args.overrides,
                              overwrite=args.overwrite)
    print(f"{_score(summary, summary['model'])} -> {Path(args.out) / 'report.html'}")
    return 0


def explain(args: argparse.Namespace) -> int:
    from ..tools.explain import explain_files

    summary = explain_files(args.checkpoint, args.inputs, args.out, target=args.target, grid=args.grid,
                            batch_size=args.batch_size, skip_bad=args.skip_bad, overwrite=args.overwrite,
                            progress=not args.quiet)
    print(f"explained {len(summary['images'])} image(s), {len(summary['skipped'])} unreadable skipped "
          f"-> {Path(args.out) / 'index.html'}")
    return 0


def fit_demo(args: argparse.Namespace) -> int:
    from ..tools.demo import run_fit_demo

    print(run_fit_demo(args.out, _fit_config(args), images=args.images, size=args.size, seed=args.seed,
                       overwrite=args.overwrite, device=args.device, progress=not args.quiet))
    outdir = Path(args.out)
    print(f"wrote {outdir / 'reconstructions.png'} (image | Gaussians | 2-sigma ellipses), "
          f"{outdir / 'gaussians.safetensors'}, {outdir / 'report.md'}")
    return 0


def fit(args: argparse.Namespace) -> int:
    from ..tools.fit_files import fit_files

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = fit_files(args.inputs, args.out, _fit_config(args), batch_size=args.batch_size, dtype=args.dtype,
                        skip_bad=args.skip_bad, overwrite=args.overwrite, pictures=not args.no_pictures,
                        device=args.device, progress=not args.quiet)
    print(f"fitted {summary['fitted']} image(s) in {summary['seconds']:.1f} s, mean PSNR {summary['mean_psnr']:.2f} dB"
          f"; {summary['already_done']} already done; {len(summary['skipped_bad'])} unreadable skipped"
          f" -> {summary['out']}/metrics.csv")
    return 0


def encode(args: argparse.Namespace) -> int:
    from ..codec import BitDepths
    from ..tools.codec_files import encode_files

    if args.bpp is None and args.num_gaussians is None:
        args.bpp = 0.5
    bits = BitDepths(position=args.position_bits, scale=args.scale_bits, angle=args.angle_bits,
                     color=args.color_bits, opacity=args.opacity_bits)
    summary = encode_files(args.inputs, args.out, bpp=args.bpp, num_gaussians=args.num_gaussians, bits=bits,
                           skip_bad=args.skip_bad, overwrite=args.overwrite, progress=not args.quiet)
    print(f"coded {summary['coded']} image(s): mean {summary['mean_bpp']:.3f} bpp, {summary['mean_psnr']:.2f} dB; "
          f"{summary['already_done']} already done; {len(summary['skipped_bad'])} unreadable skipped "
          f"-> {summary['out']}/codec.csv")
    return 0


def decode(args: argparse.Namespace) -> int:
    from ..tools.codec_files import decode_files

    summary = decode_files(args.inputs, args.out, scale=args.scale, overwrite=args.overwrite, progress=not args.quiet)
    print(f"decoded {summary['decoded']} file(s) at scale {args.scale:g}; {summary['already_done']} already done "
          f"-> {summary['out']}")
    return 0


def fit_dataset(args: argparse.Namespace) -> int:
    from ..tools.fit_dataset import fit_dataset

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


def train(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    overrides = list(args.overrides) + ([f"finetune_from={args.checkpoint}"] if args.command == "finetune" else [])
    cfg = load_config(args.config, overrides, as_model=args.as_model)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if result.get("finished") and "eval_images" in result:
        print(f"{cfg.model}: {_score(result, cfg.model)} -> {cfg.out}/result.json")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ..train import load_trained

    trained = load_trained(args.checkpoint, args.overrides)
    result = trained.evaluate()
    print(f"{args.checkpoint} ({result['eval_split']} split): {trained.kind.describe(result)}")
    return 0


def tokens(args: argparse.Namespace) -> int:
    from ..tools.tokens import decode_tokens, encode_tokens, tokenizer_report
    from ..train.tokenizer_step import TokenizerStep

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


def sweep(args: argparse.Namespace) -> int:
    from ..tools.sweep import parse_grid, run_sweep

    rows = run_sweep(args.config, parse_grid(args.grid), args.out, overrides=args.overrides, nproc=args.nproc,
                     overwrite=args.overwrite)
    print(f"{len(rows)} variant(s) finished -> {Path(args.out) / 'results.md'} (results.csv, plot_*.png)")
    return 0


def leakage(args: argparse.Namespace) -> int:
    from ..tools.leakage import run_leakage

    f = run_leakage(args.checkpoint, args.sgd_train, args.sgd_test, args.out, overrides=args.overrides,
                    data=args.data, overwrite=args.overwrite, progress=not args.quiet)
    m, r = f["cross_training"], f["rasterisation"]
    print(f"cross-training top-1 (trained -> evaluated): SGD->SGD {100 * m['sgd']['sgd']:.1f}%, SGD->learned "
          f"{100 * m['sgd']['learned']:.1f}%, learned->learned {100 * m['learned']['learned']:.1f}%, learned->SGD "
          f"{100 * m['learned']['sgd']:.1f}%; renders: SGD {100 * r['sgd']['renders']:.1f}%, learned "
          f"{100 * r['learned']['renders']:.1f}% -> {Path(args.out) / 'leakage.md'}")
    return 0


def interpret(args: argparse.Namespace) -> int:
    from ..tools.interpret import saliency_statistics

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


def vl_eval(args: argparse.Namespace) -> int:
    from ..tools.vl_eval import vl_eval

    rows = vl_eval(args.checkpoint, args.gaussians, args.out, limit=args.limit, overwrite=args.overwrite,
                   progress=not args.quiet)["rows"]
    for r in rows:
        print(f"{r['gaussians']}: k={r['k']} {r['compression']:.2f}x, "
              f"zero-shot {100 * r.get('top1', float('nan')):.1f}% "
              f"(teacher {100 * r.get('teacher_top1', float('nan')):.1f}%), cosine {r['cosine']:.3f}")
    print(f"-> {Path(args.out) / 'vl_eval.md'}")
    return 0
