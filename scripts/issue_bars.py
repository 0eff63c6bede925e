"""The open issues' GPU bars, read from what a device call produced: one verdict line each.

    python scripts/issue_bars.py [--compare DIR/report.json ...] [--bt-bench bt_bench.json]

--compare: reports of ``python -m profiling compare`` (ratios are the report's own, to its
baseline run: plain e2e when it was made with --baseline-without). Issue 4 asks, on an H100 at
ResNet-50 224 px, batch 256, projector 8192-8192-8192, bf16, LARS: simultaneous peak memory at
most 0.5x e2e, sequential at most 0.3x, simultaneous throughput with --fused at least 0.95x.
--bt-bench: the Barlow Twins benchmark JSON. Issue 3 asks, bf16 at D=8192, forward+backward:
N=256 at least 10x faster than torch.compile of the reference, N=2048 at least 2x, and peak
extra memory at most a quarter of torch.compile's at every N.

Each line reads ``BAR issue N: what value (bar): PASS|MISS``, or ``n/a (why)`` when the file does
not hold the figure or was not made at the bar's settings (named). This script reads figures;
it measures nothing. Exit status 0 (even on MISS: it reports), 2 on unreadable input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from profiling import bench  # noqa: E402

#: the settings issue 4's bars are stated at (report header "settings")
ISSUE4_SETTINGS = {"arch": "resnet50", "image_size": 224, "batch_size": 256,
                   "projector": "8192-8192-8192", "precision": "bf16", "optimizer": "lars"}
#: the GPU every bar is stated on (a device call may be given an H200 when no H100 is free)
BAR_GPU = "H100"
#: trainer flags that make an e2e run other than plain e2e (the memory bars' baseline)
NOT_PLAIN = ("--split-views", "--activation-checkpointing", "--checkpoint-blocks",
             "--no-expander-recompute")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _load_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"issue_bars: cannot read {path}: {e}") from None


def compare_bars(rep: Dict[str, Any], path: str) -> List[str]:
    """Issue 4's memory and throughput lines from one compare report.json."""
    tag = f"[{os.path.basename(os.path.dirname(os.path.abspath(path))) or path}]"
    settings = (rep.get("header") or {}).get("settings") or {}
    off = [f"{k} {settings.get(k)!r} (bar: {v!r})" for k, v in ISSUE4_SETTINGS.items()
           if settings.get(k) != v]
    gpu = (rep.get("header") or {}).get("gpu")
    if not gpu:
        off.append("no GPU")
    elif BAR_GPU not in str(gpu):
        off.append(f"GPU {gpu} (bar: an {BAR_GPU})")
    # the summary's rows are the runs in order; a row's label may carry a suffix (sequential
    # mode's "(all 4 blocks, one pass each)"), so rows are matched to runs by position
    table_rows = rep["tables"]["summary"]["rows"]
    run_list = rep.get("runs", [])
    if len(table_rows) != len(run_list):
        raise ValueError(f"issue_bars: {path}: {len(table_rows)} summary rows for "
                         f"{len(run_list)} runs; not a report this script can read")
    rows = {r["label"]: row["cells"] for r, row in zip(run_list, table_rows)}
    runs = {r["label"]: r for r in run_list}
    base = rep.get("baseline")
    out = [f"BAR {tag} baseline: {base or 'none'}; GPU {gpu or 'n/a'}"]
    # the bars are against plain e2e: a baseline run with a memory option is not that
    base_cmd = next((r.get("command") or [] for r in run_list if r.get("label") == base), [])
    opts = [f for f in NOT_PLAIN if any(str(a).split("=", 1)[0] == f for a in base_cmd)]
    if opts:
        off.append(f"baseline {base!r} is not plain e2e (it ran with {' '.join(opts)})")
    if off:
        out.append(f"BAR {tag} n/a: not the bar's settings: {', '.join(off)}")
        return out
    wanted = [("simultaneous", "peak_allocated_gib_vs_e2e", 0.5, "<="),
              ("sequential", "peak_allocated_gib_vs_e2e", 0.3, "<="),
              ("simultaneous", "throughput_img_s_vs_e2e", 0.95, ">=")]
    for mode, key, bar, op in wanted:
        labels = [lab for lab, r in runs.items() if r.get("mode") == mode and lab != base]
        what = "peak memory" if key.startswith("peak") else "throughput"
        if not labels:
            out.append(f"BAR {tag} issue 4: {mode} {what}: n/a (no {mode} run in this report)")
            continue
        for lab in labels:
            v = rows.get(lab, {}).get(key)
            name = f"BAR {tag} issue 4: {lab} {what}"
            if what == "throughput" and not runs[lab].get("fused"):
                out.append(f"{name}: n/a (the bar is with --fused; this run was not fused)")
            elif v is None:
                out.append(f"{name}: n/a (not measured in this report)")
            else:
                ok = v <= bar if op == "<=" else v >= bar
                out.append(f"{name} {v:.3f}x {base} ({op} {bar}): {_verdict(ok)}")
    out += _same_options_lines(rep, tag)
    return out


def _same_options_lines(rep: Dict[str, Any], tag: str) -> List[str]:
    """The report's own "against e2e with the same options" table (compare --baseline-without),
    one line per blockwise run, for reading the verdicts: the bars are against plain e2e, and a
    paper compares like with like."""
    table = rep["tables"].get("same_options")
    if not table:
        return []
    # its rows are the runs other than the baseline, in order
    others = [r for r in rep.get("runs", []) if r["label"] != rep.get("baseline")]
    out = []
    for r, row in zip(others, table["rows"]):
        if r.get("mode") not in ("simultaneous", "sequential"):
            continue
        parts = [f"{what} {row['cells'][key]:.3f}x"
                 for key, what in (("peak_allocated_gib_vs_e2e", "peak memory"),
                                   ("throughput_img_s_vs_e2e", "throughput"))
                 if row["cells"].get(key) is not None]
        if parts:
            out.append(f"BAR {tag} (not a bar) {r['label']} against e2e with the same options: "
                       + ", ".join(parts))
    return out


def _bt_by_n(data: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
    """{N: {provider: benchmark}} of the timed bf16 D=8192 benchmarks."""
    by_n: Dict[int, Dict[str, Any]] = {}
    for b in data["benchmarks"]:
        e = b.get("extra_info") or {}
        if e.get("d") == 8192 and e.get("dtype") == "bf16" and (b.get("stats") or {}).get("median"):
            by_n.setdefault(int(e["n"]), {})[e.get("provider")] = b
    return by_n


def bt_bars(data: Dict[str, Any], path: str, provider: str = "fused_auto") -> List[str]:
    """Issue 3's speed and memory lines from the Barlow Twins benchmark JSON."""
    by_n = _bt_by_n(data)
    out = []
    if not by_n:
        return [f"BAR issue 3: n/a (no timed bf16 D=8192 benchmark in {path})"]
    gpu = (data.get("machine_info") or {}).get("cuda_device")
    if gpu and BAR_GPU not in str(gpu):  # files before the conftest hook do not record it
        return [f"BAR issue 3: {provider}: n/a (measured on {gpu}; the bar is on an {BAR_GPU})"]
    for n, speed in ((256, 10.0), (1024, None), (2048, 2.0)):
        got = by_n.get(n, {})
        f, c = got.get(provider), got.get("torch_compile")
        if f is None or c is None:
            out.append(f"BAR issue 3: N={n}: n/a ({provider} or torch_compile not in {path})")
            continue
        ratio = c["stats"]["median"] / f["stats"]["median"]
        if speed is not None:
            out.append(f"BAR issue 3: N={n} {provider} {ratio:.2f}x faster than torch_compile "
                       f"(>= {speed:g}): {_verdict(ratio >= speed)}")
        pf, pc = (f["extra_info"].get("peak_extra_mib"), c["extra_info"].get("peak_extra_mib"))
        if pf is None or not pc:
            out.append(f"BAR issue 3: N={n} peak memory: n/a (not recorded)")
        else:
            out.append(f"BAR issue 3: N={n} {provider} peak {pf:.1f} MiB = {pf / pc:.3f}x "
                       f"torch_compile's {pc:.1f} (<= 0.25): {_verdict(pf / pc <= 0.25)}")
        like = got.get("torch_compile_graphs")
        if provider == "fused_graph" and like is not None:
            out.append(f"BAR issue 3: N={n} fused_graph "
                       f"{like['stats']['median'] / f['stats']['median']:.2f}x faster than "
                       "torch_compile_graphs (mode reduce-overhead: graphs on both sides; "
                       "for reading the line above, not a bar)")
    return out


def bt_floor(data: Dict[str, Any]) -> List[str]:
    """The host floor (one empty launch each way) at N=256 against the 10x target, when the
    file has both: whether that line of the bar is reachable on this host at all."""
    got = _bt_by_n(data).get(256, {})
    floor, c = got.get("host_floor"), got.get("torch_compile")
    if floor is None or c is None:
        return []
    fl, target = floor["stats"]["median"], c["stats"]["median"] / 10
    return [f"BAR issue 3: N=256 host floor {fl * 1e3:.3f} ms per call against the 10x target "
            f"{target * 1e3:.3f} ms: " + (
                "reachable on this host" if fl <= target else
                "out of reach on this host (one empty launch each way costs more)")]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs="*", default=[], help="compare report.json files")
    p.add_argument("--bt-bench", default=None, help="Barlow Twins benchmark JSON")
    p.add_argument("--providers", default="fused_auto,fused_graph",
                   help="the fused providers the BT bars are read for, where the file has them "
                        "(default fused_auto,fused_graph: the default op and cuda_graphs=True)")
    args = p.parse_args(argv)
    if not args.compare and not args.bt_bench:
        p.error("give --compare REPORT.json and/or --bt-bench BENCH.json")
    try:
        lines: List[str] = []
        for path in args.compare:
            rep = _load_json(path)
            if "tables" not in rep or "summary" not in rep.get("tables", {}):
                raise ValueError(f"issue_bars: {path} is not a compare report.json")
            lines += compare_bars(rep, path)
        if args.bt_bench:
            data = bench.load(args.bt_bench)
            present = {(b.get("extra_info") or {}).get("provider") for b in data["benchmarks"]}
            wanted = [p for p in args.providers.split(",") if p]
            for i, prov in enumerate(wanted):
                if i == 0 or prov in present:  # the first always: it says n/a when absent
                    lines += bt_bars(data, args.bt_bench, prov)
            lines += bt_floor(data)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
