"""The ``gvit`` command line: argparse and printing only (:mod:`~gvit.cli.parser` builds the parser,
:mod:`~gvit.cli.commands` runs each command); each command calls one job of
:mod:`gvit.tools` or :mod:`gvit.train` (demo, fit-demo, fit, encode, decode, fit-dataset, train, finetune, eval,
explain, report, sweep, leakage, interpret, vl-eval, tokens)."""

from __future__ import annotations

import sys

from .parser import build_parser

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    from ..data import ImageReadError

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
