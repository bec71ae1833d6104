"""``python -m benchmarks [--quick] [--only NAME ...] [--no-pin] [--json PATH] [--png PATH]``."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from . import cases  # noqa: F401  (registers the cases)
    from ._procs import configure_pinning, pinning_report
    from .chart import Bar, ValueBar, draw, value_score
    from .harness import (
        REGISTRY,
        fmt,
        format_table,
        format_value_target,
        noisy_summary,
        results_json,
        run_all,
        write_json,
    )

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="conec_trio vs raw aioquic; every number is a ratio to a baseline "
        "measured in the same run (> 1 means conec_trio did better).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 repeats (1 for the scale cases) and smaller sizes (about a minute and a half)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these cases (shell patterns work: 'scale_*_1000')",
    )
    parser.add_argument(
        "--repeats", type=int, help="runs of each side per case (default 5, 2 with --quick)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place every process (default: the server/coordinator side "
        "and the client side of each measurement on separate CPUs, where there are two)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json", metavar="PATH")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "latest.png", metavar="PATH")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    if args.list:
        for case in REGISTRY.values():
            targets = []
            if case.target is not None:
                targets.append(f"ratio >= {case.target:.2f}")
            if case.target_value is not None:
                targets.append(f"{format_value_target(case)} {case.unit}")
            judged = f" [target: {'; '.join(targets)}]" if targets else ""
            width = max(len(name) for name in REGISTRY)
            print(f"{case.name:{width}} {case.description}{judged}")
        return 0
    names = [n for n, case in REGISTRY.items() if case.in_quick or not args.quick]
    if args.only:
        unknown = [p for p in args.only if not fnmatch.filter(REGISTRY, p)]
        if unknown:
            parser.error(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
        names = [n for n in REGISTRY if any(fnmatch.fnmatchcase(n, p) for p in args.only)]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")

    pinning = configure_pinning(not args.no_pin)
    _log(f"pinning: {pinning.describe()}")
    start = time.perf_counter()
    results = run_all([REGISTRY[n] for n in names], repeats, args.quick, log=_log)
    wall = time.perf_counter() - start
    pinned = pinning_report()

    print()
    print(format_table(results))
    print(f"\n{len(results)} case(s), {repeats} repeat(s), {wall:.1f} s")
    refused = pinned["refused"]
    note = f"; refused for {len(refused)} process(es), which ran unpinned" if refused else ""
    print(f"pinning: {pinned['description']}{note}")
    print(noisy_summary(results))
    for r in results:
        if r.subject_status == "stopped":
            print(f"stopped here: {r.case.name}: {r.subject_note}")

    data = results_json(results, quick=args.quick, repeats=repeats, wall_time=wall, pinning=pinned)
    write_json(data, args.json)
    print(f"raw samples: {_show(args.json)}")
    # The ratio panel judges the ratio target alone; the value panel the value target alone.
    bars = [
        Bar(r.case.name, r.ratio, r.case.target, _ratio_verdict(r.ratio, r.case.target))
        for r in results
        if not r.case.absolute
    ]
    value_bars = []
    for r in results:
        target, value = r.case.target_value, r.value
        if target is None:
            continue
        score = None if value is None else value_score(value, target, r.case.higher_is_better)
        label = "n/a" if value is None else f"{fmt(value)} ({format_value_target(r.case)})"
        value_bars.append(ValueBar(r.case.name, score, label, "PASS" if r.value_met else "MISS"))
    title = f"conec_trio / aioquic ({'quick' if args.quick else 'full'}, {data['timestamp']})"
    if draw(bars, args.png, title, value_bars):
        print(f"chart: {_show(args.png)}")
    else:
        print(
            f"chart: {_show(args.png)} (matplotlib is not installed: plain bar chart without text; "
            "green PASS, red MISS, blue no target, grey stub no subject, black tick target, "
            "dashed line ratio 1; below it, if any, the cases with an absolute target: "
            "value / target, the target at 1)"
        )
    return 1 if any(r.errors for r in results) else 0


def _ratio_verdict(ratio: float | None, target: float | None) -> str:
    if ratio is None:
        return "n/a"
    if target is None:
        return "-"
    return "PASS" if ratio >= target else "MISS"


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
