"""``python -m profiling bench``: pytest-benchmark JSON as tables a paper can quote.

    python -m pytest tests/benchmarks/test_bench_barlow_twins.py --benchmark-only \\
        --benchmark-json bt.json
    python -m profiling bench bt.json --baseline torch_compile [--out bt.md]

One table per benchmark group (one shape), one row per provider (the ``provider`` in each
benchmark's ``extra_info``, else its parametrize id): median ms (IQR, rounds), how many times
faster than the baseline provider, peak extra memory and its ratio to the baseline's, and the
median over the benchmark's own floor (``floor_ms``) where the benchmark recorded one. A figure
the file does not hold is printed as ``n/a (reason)``, never as 0. The header names the device,
versions, host and date the file records.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from profiling._io import atomic_write_text


@dataclass
class Row:
    provider: str
    median_ms: float
    iqr_ms: Optional[float]
    rounds: int
    peak_mib: Optional[float]
    floor_ms: Optional[float]
    energy_j: Optional[float] = None   # GPU energy per image (pair), where recorded
    peak_na: str = "not recorded"      # why peak_mib is None (extra_info's peak_unavailable)


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def load(path: str) -> Dict[str, Any]:
    """The parsed JSON of one ``--benchmark-json`` file; ValueError when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bench: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"bench: {path} is not JSON ({e}); expected the file written by "
                         "pytest --benchmark-json") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"bench: {path} has no 'benchmarks' list; expected the file written by "
                         "pytest --benchmark-json")
    for i, b in enumerate(data["benchmarks"]):
        if not isinstance(b, dict) or any(b.get(k) is not None and not isinstance(b[k], dict)
                                          for k in ("stats", "extra_info", "params")):
            raise ValueError(f"bench: {path}: benchmarks[{i}] is not a benchmark record (an "
                             "object whose stats, extra_info and params are objects); expected "
                             "the file written by pytest --benchmark-json")
    return data


def _provider(b: Dict[str, Any]) -> str:
    extra = b.get("extra_info") or {}
    if extra.get("provider"):
        return str(extra["provider"])
    params = b.get("params") or {}
    if "provider" in params:
        return str(params["provider"])
    return str(b.get("param") or b.get("name"))


def groups(data: Dict[str, Any]) -> Dict[str, List[Row]]:
    """group name -> rows in file order. Benchmarks without stats (run with timing disabled)
    are skipped: they were not measured."""
    out: Dict[str, List[Row]] = {}
    for b in data["benchmarks"]:
        stats = b.get("stats") or {}
        median = _num(stats.get("median"))
        if median is None:
            continue
        extra = b.get("extra_info") or {}
        iqr = _num(stats.get("iqr"))
        peak = _num(extra.get("peak_extra_mib"))
        if peak is None and _num(extra.get("peak_allocated_gib")) is not None:
            peak = extra["peak_allocated_gib"] * 1024.0
        out.setdefault(str(b.get("group") or b.get("name")), []).append(Row(
            provider=_provider(b), median_ms=median * 1e3,
            iqr_ms=iqr * 1e3 if iqr is not None else None,
            rounds=int(stats.get("rounds") or 0),
            peak_mib=peak, floor_ms=_num(extra.get("floor_ms")),
            energy_j=_num(extra.get("energy_per_image_j")),
            peak_na=str(extra.get("peak_unavailable") or "not recorded")))
    return out


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _ratio(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:#.3g}"  # three significant digits


def header(data: Dict[str, Any], path: str) -> List[str]:
    m = data.get("machine_info") or {}
    cpu = (m.get("cpu") or {}).get("brand_raw", "n/a")
    gpu = m.get("cuda_device") or ("no GPU (CPU run)" if m.get("device") == "cpu" else
                                   "n/a (not recorded; files from before this field)")
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda") if m.get(k))
    commit = data.get("commit_info") or {}
    rev = commit.get("id") if commit.get("id") not in (None, "unknown") else None
    lines = [f"- file: `{path}` (pytest-benchmark {data.get('version', '?')}, "
             f"{data.get('datetime', 'date n/a')})",
             f"- device: {gpu}; host {m.get('node', 'n/a')}, {cpu}, Python "
             f"{m.get('python_version', 'n/a')}" + (f"; {versions}" if versions else ""),
             f"- commit: {rev + (' (dirty)' if commit.get('dirty') else '') if rev else 'n/a'}"]
    return lines


def render(data: Dict[str, Any], path: str, baseline: Optional[str] = None,
           title: Optional[str] = None) -> str:
    """Markdown: a header, then one table per group."""
    by_group = groups(data)
    if not by_group:
        raise ValueError(f"bench: {path} holds no timed benchmark (run pytest with "
                         "--benchmark-only, not with timing disabled)")
    if baseline is not None:
        known = sorted({r.provider for rows in by_group.values() for r in rows})
        if baseline not in known:
            raise ValueError(f"bench: baseline provider {baseline!r} is not in {path}; "
                             f"valid: {', '.join(known)}")
    any_energy = any(r.energy_j is not None for rows in by_group.values() for r in rows)
    lines = [f"# {title or 'Benchmarks'}", ""] + header(data, path) + [
        "- median of the rounds, in ms (IQR); peak (MiB) = the memory one call allocates above "
        "what was allocated before it (`peak_extra_mib`), or for a training step the step's "
        "whole peak allocation (`peak_allocated_gib`); floor = the benchmark's own bound (flops "
        "over the measured matmul rate, or bytes over the measured copy rate)"
        + ("; J/pair = GPU energy per image pair, where the benchmark measured it"
           if any_energy else "; no benchmark in this file measured energy"), ""]
    for group, rows in by_group.items():
        lines += [f"## {group}", ""]
        base = next((r for r in rows if r.provider == baseline), None) if baseline else None
        energy = any(r.energy_j is not None for r in rows)
        head = ["provider", "median ms (IQR)", "rounds"]
        head += [f"x faster ({baseline} / this)"] if baseline else []
        head += ["peak MiB"] + ([f"peak / {baseline}"] if baseline else []) + ["x floor"]
        if energy:
            head += ["J/pair"] + ([f"J / {baseline}"] if baseline else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        no_base = f"no {baseline} here"

        def vs(num, den, missing):  # a ratio cell, or why it is n/a
            if base is None:
                return f"n/a ({no_base})"
            return _ratio(num / den) if num is not None and den else f"n/a ({missing})"

        for r in rows:
            iqr = _ms(r.iqr_ms) if r.iqr_ms is not None else "n/a"
            cells = [r.provider, f"{_ms(r.median_ms)} ({iqr})", str(r.rounds)]
            if baseline:
                cells.append(vs(base and base.median_ms, r.median_ms, no_base))
            cells.append(f"{r.peak_mib:.1f}" if r.peak_mib is not None else f"n/a ({r.peak_na})")
            if baseline:
                cells.append(vs(r.peak_mib, base and base.peak_mib, r.peak_na))
            cells.append(_ratio(r.median_ms / r.floor_ms) if r.floor_ms
                         else "n/a (no floor recorded)")
            if energy:
                cells.append(f"{r.energy_j:#.3g}" if r.energy_j is not None
                             else "n/a (not measured)")
                if baseline:
                    cells.append(vs(r.energy_j, base and base.energy_j, "not measured"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="JSON files written by pytest --benchmark-json")
    p.add_argument("--baseline", default=None,
                   help="provider the ratios are taken against (e.g. torch_compile)")
    p.add_argument("--out", default=None, help="write the markdown here too (atomically)")
    p.add_argument("--title", default=None)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ValueError(f"bench takes no trainer flags, got {list(extra)}")
    parts = [render(load(f), f, args.baseline, args.title) for f in args.files]
    text = "\n\n".join(parts) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0
