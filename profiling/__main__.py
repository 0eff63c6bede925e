"""``python -m profiling compare | maxbatch | report | bench``.

    python -m profiling compare --modes e2e,simultaneous,sequential --arch resnet50 \\
        --image-size 224 --batch-size 256 --steps 20 --out DIR [-- extra trainer flags]
    python -m profiling maxbatch --modes e2e,sequential --start 256 --out DIR
    python -m profiling report RUN_DIR [RUN_DIR ...] [--out DIR]   (--out needed with several)
    python -m profiling bench BENCH.json [--baseline torch_compile] [--out FILE.md]

``compare`` and ``maxbatch`` pass the flags they do not know, and those after ``--``, to every
trainer run (``python -m blockwise.train``); ``report`` and ``bench`` refuse unknown flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from profiling import bench, compare, maxbatch
from profiling.report import load_run_dir, write_report


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories holding profile.json")
    p.add_argument("--out", default=None,
                   help="report directory (default: the run directory when there is one)")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    p.add_argument("--title", default=None)


def _report(args: argparse.Namespace, extra: List[str]) -> int:
    if extra:
        raise ValueError(f"report takes no trainer flags, got {extra}")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.run_dirs)} run dirs")
    out = args.out
    if out is None:
        if len(args.run_dirs) != 1:
            raise ValueError("--out is required with several run directories")
        out = args.run_dirs[0]
    runs = [load_run_dir(d, labels[i] if labels else None) for i, d in enumerate(args.run_dirs)]
    seen = set()
    for r in runs:  # labels key the tables: make them unique
        base, n = r.label, 2
        while r.label in seen:
            r.label = f"{base} #{n}"
            n += 1
        seen.add(r.label)
    write_report(runs, out, command="python -m profiling report " + " ".join(
        args._argv), **({"title": args.title} if args.title else {}))
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # --help shows each flag's default (compare.HelpFormatter)
    c = sub.add_parser("compare", help="run each mode as a fresh trainer process; one report",
                       description=compare.__doc__, formatter_class=compare.HelpFormatter)
    compare.add_arguments(c)
    m = sub.add_parser("maxbatch", help="largest batch each mode fits in GPU memory",
                       description=maxbatch.__doc__, formatter_class=compare.HelpFormatter)
    maxbatch.add_arguments(m)
    r = sub.add_parser("report", help="render report.md/json/plots from --profile run dirs")
    _report_args(r)
    b = sub.add_parser("bench", help="pytest-benchmark JSON as tables with ratios to a baseline")
    bench.add_arguments(b)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args._argv = argv[1:] + (["--"] + extra if extra else [])
    if unknown and args.command in ("report", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    extra = unknown + extra
    handler = {"compare": compare.run, "maxbatch": maxbatch.run, "report": _report,
               "bench": bench.run}[args.command]
    try:
        return handler(args, extra)
    except (ValueError, OSError) as e:  # bad input, or a path that cannot be read or written
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
