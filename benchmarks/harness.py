"""Benchmark harness: a registry of cases, interleaved runs, a table, JSON and a chart.

A case pairs a *baseline* measurement (raw aioquic) with a *subject* measurement (conec_trio)
of the same thing in the same unit. Both are plain callables ``(quick: bool) -> float``; they
run in this process and start whatever child processes they need. The harness runs them
interleaved (baseline, subject, baseline, subject, ...) so that drift on a noisy machine hits
both alike, and reports the ratio of the medians, oriented so that above 1 is always better
for the subject. Cases with the same baseline share its runs: baseline, subject 1, subject 2,
..., baseline, subject 1, subject 2, ...

Some cases are *absolute*: judged by the subject's own value against a fixed target (the
issue's "at least 50,000 messages/s", "at most 100 KB per client"), with no ratio. Any case
may carry such a value target (``target_value``) besides or instead of a ratio target. Several
cases may take their values from one measurement that yields many numbers at once (a
``Metric`` subject: one run per round, each case reading its own key of the result).

A case is *noisy* when one side's samples spread more than ``SPREAD_LIMIT`` (max/min): on a
busy machine a run can fall into two modes, and a median taken across them means little.
The table flags such cases and the runner names them at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

Measure = Callable[[bool], float]


Source = Callable[[bool], Mapping[str, Any]]
# A source that stopped part-way (its first figures measured, the rest not) says why here.
STOPPED = "stopped"


@dataclass(frozen=True, eq=False)
class Metric:
    """A subject that reads ``key`` from a measurement yielding many numbers at once.

    All cases of one group whose ``Metric`` has the same ``source`` (the very same callable)
    share one call of it per round; the whole result of each call is kept in the JSON
    (``runs``) of every case reading it."""

    source: Source
    key: str

    def __call__(self, quick: bool) -> float:
        return float(self.source(quick)[self.key])


@dataclass(frozen=True)
class Case:
    """One named comparison.

    ``target``: the ratio to the baseline the subject should reach (None: no ratio target).
    ``target_value``: a bound on the subject's median itself, in the case's unit: at least
    this much if higher is better, at most this much if lower is better (None: none).
    ``absolute``: the case has no ratio at all; it is judged by ``target_value`` only (or
    just reported). Its ``baseline`` may be None, or the baseline of the other cases of its
    group (whose runs it then only shares the schedule with, not its judgement).
    ``judge_worst``: ``target_value`` applies to the worst sample, not the median (for
    "must never happen" counts: one lost message in any round is a miss).
    ``probes_limit``: the case looks for where the library stops (the largest scale runs): a
    failed run is its finding, reported with its reason, not an error of the run.
    ``max_repeats`` / ``quick_repeats``: at most this many runs per side (with ``--quick``),
    for expensive cases. ``in_quick``: False leaves the case out of ``--quick`` runs unless
    it is named with ``--only``.
    """

    name: str
    description: str
    unit: str
    higher_is_better: bool
    baseline: Measure | None
    subject: Measure
    baseline_name: str
    target: float | None = None
    target_value: float | None = None
    absolute: bool = False
    judge_worst: bool = False
    max_repeats: int | None = None
    quick_repeats: int | None = None
    in_quick: bool = True
    probes_limit: bool = False

    def repeats(self, repeats: int, quick: bool) -> int:
        """Runs per side for this case when ``repeats`` are asked for."""
        cap = self.quick_repeats if quick and self.quick_repeats is not None else self.max_repeats
        return repeats if cap is None else min(repeats, cap)

    def __post_init__(self) -> None:
        if self.absolute and self.target is not None:
            raise ValueError(f"{self.name}: an absolute case has no ratio target")
        if self.baseline is None and not self.absolute:
            raise ValueError(f"{self.name}: a case without a baseline must be absolute")


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add ``case`` to the registry.

    Names are unique. Cases with the same ``baseline_name`` share their baseline runs, so they
    must use the very same baseline callable and unit.
    """
    if case.name in REGISTRY:
        raise ValueError(f"benchmark case {case.name!r} is already registered")
    for other in REGISTRY.values():
        if other.baseline_name != case.baseline_name:
            continue
        if other.baseline is not case.baseline:
            raise ValueError(
                f"cases {other.name!r} and {case.name!r} share the baseline name "
                f"{case.baseline_name!r} but not the same baseline callable"
            )
        if not (other.absolute or case.absolute) and (
            other.unit != case.unit or other.higher_is_better != case.higher_is_better
        ):
            raise ValueError(
                f"cases {other.name!r} and {case.name!r} share the baseline name "
                f"{case.baseline_name!r} but not the same unit and direction"
            )
    REGISTRY[case.name] = case
    return case


# A side whose largest sample is more than this many times its smallest makes a case noisy.
SPREAD_LIMIT = 1.5


def spread(samples: Sequence[float]) -> float | None:
    """max/min of ``samples``: 1 when they agree, 2 when the largest is twice the smallest.

    None with fewer than two samples, or when the smallest is zero or below and the samples
    differ (counts that may be 0, such as messages lost: no ratio says how far apart they
    are)."""
    if len(samples) < 2:
        return None
    low, high = min(samples), max(samples)
    if low == high:
        return 1.0
    if low <= 0:
        return None
    return high / low


# Raised by a subject whose library code is not there yet: reported, not an error.
SUBJECT_MISSING: tuple[type[BaseException], ...] = (NotImplementedError, ImportError)


@dataclass
class CaseResult:
    case: Case
    baseline: list[float] = field(default_factory=list)
    subject: list[float] = field(default_factory=list)
    subject_status: str = "ok"  # "ok", "not available", "error", "stopped", "not run"
    subject_note: str = ""
    errors: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # a Metric source's results

    @property
    def ratio(self) -> float | None:
        """Subject vs baseline medians, > 1 meaning the subject did better."""
        if self.case.absolute or not self.baseline or not self.subject:
            return None
        b = statistics.median(self.baseline)
        s = statistics.median(self.subject)
        if self.case.higher_is_better:
            return s / b if b else None
        return b / s if s else None

    @property
    def noisy_sides(self) -> dict[str, float]:
        """The sides (``baseline``, ``subject``) whose spread exceeds ``SPREAD_LIMIT``, with
        their spread. An absolute case's baseline is not its own and is left out."""
        sides = {"baseline": [] if self.case.absolute else self.baseline, "subject": self.subject}
        found: dict[str, float] = {}
        for side, samples in sides.items():
            s = spread(samples)
            if s is not None and s > SPREAD_LIMIT:
                found[side] = s
        return found

    @property
    def value(self) -> float | None:
        """The subject's value judged by ``target_value``: its median, or its worst sample
        (``judge_worst``)."""
        if not self.subject:
            return None
        if self.case.judge_worst:
            return min(self.subject) if self.case.higher_is_better else max(self.subject)
        return statistics.median(self.subject)

    @property
    def value_met(self) -> bool | None:
        """Whether the subject's median meets ``target_value`` (None: no such target or value)."""
        target, value = self.case.target_value, self.value
        if target is None or value is None:
            return None
        return value >= target if self.case.higher_is_better else value <= target

    @property
    def verdict(self) -> str:
        """PASS when every target of the case is met, MISS when one is not, ``-`` without
        targets, ``n/a`` when a result is missing."""
        case = self.case
        if not self.subject or (not case.absolute and not self.baseline):
            return "n/a"
        checks: list[bool] = []
        if case.target is not None:
            ratio = self.ratio
            if ratio is None:
                return "n/a"
            checks.append(ratio >= case.target)
        value_met = self.value_met
        if value_met is not None:
            checks.append(value_met)
        if not checks:
            return "-"
        return "PASS" if all(checks) else "MISS"


def run_group(
    cases: Sequence[Case], repeats: int, quick: bool, log: Callable[[str], None]
) -> list[CaseResult]:
    """Run cases that share one baseline: baseline, each subject, baseline, each subject, ...

    Every case of the group gets the same baseline samples; a subject that is missing or fails
    drops out of the later rounds, the others go on. Cases whose ``Metric`` subjects share a
    source get their values from one call of it per round. A group without a baseline
    (absolute cases only) runs just its subjects.
    """
    results = [CaseResult(case) for case in cases]
    live = list(results)
    baseline = cases[0].baseline
    label = cases[0].baseline_name
    unit = next((c.unit for c in cases if not c.absolute), cases[0].unit)
    rounds = max(c.repeats(repeats, quick) for c in cases)
    for i in range(rounds):
        if baseline is not None:
            start = time.perf_counter()
            try:
                value = baseline(quick)
            except Exception as exc:
                log(f"  {label}: baseline run {i + 1} FAILED: {_describe(exc)}")
                traceback.print_exc()
                for r in results:
                    if not r.case.absolute:
                        r.errors.append(f"baseline run {i + 1}: {_describe(exc)}")
                if not any(r.case.absolute for r in live):
                    break
            else:
                log(f"  {label}: {i + 1}/{rounds}: {fmt(value)} {unit}  ({_since(start)})")
                for r in results:
                    if not r.case.absolute:
                        r.baseline.append(value)
        sources: dict[int, Mapping[str, Any] | BaseException] = {}
        for r in list(live):
            name = r.case.name
            if i >= r.case.repeats(repeats, quick):
                continue
            start = time.perf_counter()
            try:
                value = _measure(r, quick, sources, log)
            except SUBJECT_MISSING as exc:
                live.remove(r)
                r.subject_status = "not available"
                r.subject_note = _describe(exc)
                log(f"  {name}: subject not available ({_describe(exc)})")
                continue
            except Exception as exc:
                live.remove(r)
                r.subject_note = _describe(exc)
                if r.case.probes_limit:
                    r.subject_status = "stopped"
                    log(f"  {name}: run {i + 1} stopped here: {_describe(exc)}")
                    continue
                r.subject_status = "error"
                r.errors.append(f"subject run {i + 1}: {_describe(exc)}")
                log(f"  {name}: subject run {i + 1} FAILED: {_describe(exc)}")
                if not isinstance(r.case.subject, Metric):
                    traceback.print_exc()
                continue
            r.subject.append(value)
            log(f"  {name}: {i + 1}/{rounds}: {fmt(value)} {r.case.unit}  ({_since(start)})")
    for r in results:
        if r.subject_status == "ok" and not r.subject:
            r.subject_status = "not run"
    return results


def _measure(
    result: CaseResult,
    quick: bool,
    sources: dict[int, Mapping[str, Any] | BaseException],
    log: Callable[[str], None],
) -> float:
    """One subject value; a ``Metric``'s source runs once per round (``sources``)."""
    subject = result.case.subject
    if not isinstance(subject, Metric):
        return subject(quick)
    key = id(subject.source)
    if key not in sources:
        start = time.perf_counter()
        try:
            sources[key] = subject.source(quick)
        except Exception as exc:
            sources[key] = exc
            if not isinstance(exc, SUBJECT_MISSING):
                traceback.print_exc()
        log(f"  ({result.case.name} and the cases sharing its measurement: {_since(start)})")
    outcome = sources[key]
    if isinstance(outcome, BaseException):
        raise outcome
    result.runs.append(dict(outcome))
    if subject.key not in outcome:
        # a measurement that stopped part-way says why under STOPPED (scale: the relay)
        raise RuntimeError(outcome.get(STOPPED) or f"the measurement gave no {subject.key!r}")
    return float(outcome[subject.key])


def run_all(
    cases: Iterable[Case], repeats: int, quick: bool, log: Callable[[str], None] = print
) -> list[CaseResult]:
    """Run ``cases``, grouped by baseline; results come back in the order given."""
    cases = list(cases)
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.baseline_name, []).append(case)
    by_name: dict[str, CaseResult] = {}
    for group in groups.values():
        log(f"{group[0].baseline_name} vs: {', '.join(c.name for c in group)}")
        for case in group:
            log(f"  {case.name}: {case.description}")
        for result in run_group(group, repeats, quick, log):
            by_name[result.case.name] = result
    return [by_name[case.name] for case in cases]


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"


# --------------------------------------------------------------------------------------------
# Reporting


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def fmt(value: float) -> str:
    """A short number: 3 significant digits, no exponent for the usual ranges."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _median_range(samples: Sequence[float]) -> str:
    if not samples:
        return ""
    return f"{fmt(statistics.median(samples))} ({fmt(min(samples))}-{fmt(max(samples))})"


def _format_spread(result: CaseResult) -> str:
    """``1.04 / 2.31 NOISY``: baseline / subject max/min, ``-`` where there is none."""

    def one(samples: Sequence[float]) -> str:
        s = spread(samples)
        return "-" if s is None else f"{s:.2f}"

    baseline = "-" if result.case.absolute else one(result.baseline)
    flag = " NOISY" if result.noisy_sides else ""
    return f"{baseline} / {one(result.subject)}{flag}"


def noisy_summary(results: Sequence[CaseResult]) -> str:
    """One line naming the cases with a side spread over ``SPREAD_LIMIT``, or saying none."""
    noisy = [
        f"{r.case.name} ({', '.join(f'{side} {s:.2f}x' for side, s in r.noisy_sides.items())})"
        for r in results
        if r.noisy_sides
    ]
    if not noisy:
        return f"spread: no case has a side whose max/min exceeds {SPREAD_LIMIT:g}x"
    return (
        f"NOISY: {len(noisy)} case(s) with a side whose max/min exceeds {SPREAD_LIMIT:g}x "
        f"(maybe two modes; run again before trusting the median): {'; '.join(noisy)}"
    )


def format_value_target(case: Case) -> str:
    """``>= 50,000`` / ``<= 0.100``: the case's bound on its own value (``worst <= 0`` when
    every sample must meet it), or ``-``."""
    if case.target_value is None:
        return "-"
    bound = f"{'>=' if case.higher_is_better else '<='} {fmt(case.target_value)}"
    return f"worst {bound}" if case.judge_worst else bound


def format_table(results: Sequence[CaseResult]) -> str:
    """Plain-text table: one row per case."""
    header = ("case", "unit", "baseline median (min-max)", "subject median (min-max)",
              "spread b / s", "ratio", "target ratio", "target value", "result")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for r in results:
        unit = r.case.unit + ("" if r.case.higher_is_better else " (lower better)")
        if r.subject:
            subject = _median_range(r.subject)
        elif r.subject_status == "not available":
            subject = "subject not available"
        elif r.subject_status == "error":
            subject = "subject FAILED"
        elif r.subject_status == "stopped":
            subject = "stopped here (below)"
        else:
            subject = "-"
        if r.case.absolute:
            baseline = "(absolute)"
        else:
            baseline = _median_range(r.baseline) if r.baseline else "baseline FAILED"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        target = f"{r.case.target:.2f}" if r.case.target is not None else "-"
        value_target = format_value_target(r.case)
        rows.append((r.case.name, unit, baseline, subject, _format_spread(r), ratio, target,
                     value_target, r.verdict))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "aioquic": _version("aioquic"),
        "trio": _version("trio"),
        "cryptography": _version("cryptography"),
        "conec_trio": _version("conec_trio") or _version("conec-trio"),
    }


def _stats(samples: Sequence[float]) -> dict[str, Any] | None:
    if not samples:
        return None
    return {
        "samples": list(samples),
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "spread": spread(samples),
    }


def results_json(
    results: Sequence[CaseResult],
    *,
    quick: bool,
    repeats: int,
    wall_time: float,
    pinning: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "repeats": repeats,
        "wall_time_s": round(wall_time, 2),
        "machine": machine_info(),
        "pinning": dict(pinning) if pinning is not None else None,
        "spread_limit": SPREAD_LIMIT,
        "cases": [
            {
                "name": r.case.name,
                "description": r.case.description,
                "baseline_name": r.case.baseline_name,
                "unit": r.case.unit,
                "higher_is_better": r.case.higher_is_better,
                "absolute": r.case.absolute,
                "target": r.case.target,
                "target_value": r.case.target_value,
                "target_value_judges": "worst" if r.case.judge_worst else "median",
                "target_value_met": r.value_met,
                "baseline": _stats(r.baseline),
                "subject": _stats(r.subject),
                "subject_status": r.subject_status,
                "subject_note": r.subject_note,
                "ratio": r.ratio,
                "result": r.verdict,
                "noisy": r.noisy_sides or None,
                "errors": r.errors,
                **({"runs": r.runs} if r.runs else {}),
            }
            for r in results
        ],
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
