"""``python -m benchmarks [--quick] [--only NAME ...] [--json PATH] [--png PATH]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from . import cases  # noqa: F401  (registers the cases)
    from .chart import Bar, draw
    from .harness import REGISTRY, format_table, results_json, run_all, write_json

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="conec_trio vs raw aioquic; every number is a ratio to a baseline "
        "measured in the same run (> 1 means conec_trio did better).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 repeats and smaller sizes (about a minute)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases")
    parser.add_argument(
        "--repeats", type=int, help="runs of each side per case (default 5, 2 with --quick)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json", metavar="PATH")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "latest.png", metavar="PATH")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    if args.list:
        for case in REGISTRY.values():
            print(f"{case.name:24} {case.description}")
        return 0
    names = args.only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")

    start = time.perf_counter()
    results = run_all([REGISTRY[n] for n in names], repeats, args.quick, log=_log)
    wall = time.perf_counter() - start

    print()
    print(format_table(results))
    print(f"\n{len(results)} case(s), {repeats} repeat(s), {wall:.1f} s")

    data = results_json(results, quick=args.quick, repeats=repeats, wall_time=wall)
    write_json(data, args.json)
    print(f"raw samples: {_show(args.json)}")
    bars = [Bar(r.case.name, r.ratio, r.case.target, r.verdict) for r in results]
    title = f"conec_trio / aioquic ({'quick' if args.quick else 'full'}, {data['timestamp']})"
    if draw(bars, args.png, title):
        print(f"chart: {_show(args.png)}")
    else:
        print(
            f"chart: {_show(args.png)} (matplotlib is not installed: plain bar chart without text; "
            "green PASS, red MISS, blue no target, grey stub no subject, black tick target, "
            "dashed line ratio 1)"
        )
    return 1 if any(r.errors for r in results) else 0


def _show(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _log(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
