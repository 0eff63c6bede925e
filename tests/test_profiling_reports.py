"""Reports (compare / report / maxbatch): tables, ratios recomputed from report.json, plots,
"n/a (reason)" never 0, failed runs, the search, the trainer command, and a real CPU compare."""
import importlib.util
import json
import os
import sys

import pytest

from profile_factory import make_profile
from profiling import __main__ as cli
from profiling.compare import parse_modes, run_trainer, trainer_command
from profiling.maxbatch import render_markdown as maxbatch_md
from profiling.maxbatch import search, write_outputs
from profiling.report import PLOTS, RunResult, load_run_dir, write_report

HAS_TRAINER = importlib.util.find_spec("blockwise.train") is not None


def _png_ok(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _runs(monkeypatch, tmp_path, modes=("e2e", "simultaneous", "sequential"), **kw):
    runs = []
    for i, mode in enumerate(modes):
        d = tmp_path / "runs" / mode
        # different speeds and powers per mode, so that ratios are not all 1
        p = make_profile(monkeypatch, str(d / "profile.json"), mode, slow=1.0 + 0.3 * i,
                         power_w=300.0 - 40 * i, **kw)
        runs.append(RunResult(mode, str(d), p))
    return runs


def check_ratios(rep):
    """Every ratio cell equals its value over the baseline value, and the baseline values are
    the e2e run's own numbers."""
    base = next(r for r in rep["runs"] if r["label"] == rep["baseline"])
    checked = 0
    for name, table in rep["tables"].items():
        for key, bval in table["baseline"].items():
            if name in ("summary", "memory", "arithmetic", "detail", "per_block"):
                assert bval == base["metrics"].get(key), (name, key)
            elif name == "phases":
                assert bval == base["phases_ms_per_image"][key]
        for col in table["columns"]:
            if "ratio_of" not in col:
                continue
            for row in table["rows"]:
                v, b = row["cells"][col["ratio_of"]], table["baseline"][col["ratio_of"]]
                got = row["cells"][col["key"]]
                if v is None or b is None or b == 0:
                    assert got is None and col["key"] in row["na"]
                else:
                    assert got == pytest.approx(v / b, rel=1e-12), (name, row["label"], col)
                    checked += 1
    return checked


def test_report_tables_ratios_and_plots(monkeypatch, tmp_path):
    runs = _runs(monkeypatch, tmp_path)
    out = tmp_path / "report"
    write_report(runs, str(out), command="test")
    assert sorted(os.listdir(out)) == sorted(["report.md", "report.json", *PLOTS])
    for png in PLOTS:
        assert _png_ok(str(out / png)), png
    rep = json.load(open(out / "report.json"))
    assert rep["baseline"] == "e2e"
    assert check_ratios(rep) > 40
    # e2e's own ratios are exactly 1
    e2e_row = rep["tables"]["summary"]["rows"][0]
    assert e2e_row["cells"]["throughput_img_s_vs_e2e"] == 1.0
    # sequential: all 4 blocks, one pass each = sum over blocks, recomputed from profile.json
    seq_prof = runs[2].profile
    segs = seq_prof["run"]["segments"]
    assert [s["label"] for s in segs] == ["block1", "block2", "block3", "block4"]
    seq = next(r for r in rep["runs"] if r["mode"] == "sequential")
    assert seq["metrics"]["time_per_image_ms"] == pytest.approx(
        1000 * sum(s["time_s"] / s["images"] for s in segs))
    assert seq["metrics"]["energy_per_image_j"] == pytest.approx(
        sum(s["energy_j"] / s["images"] for s in segs))
    assert seq["metrics"]["throughput_img_s"] == pytest.approx(
        1000.0 / seq["metrics"]["time_per_image_ms"])
    assert seq["metrics"]["peak_allocated_gib"] == max(s["peak_allocated_gib"] for s in segs)
    assert len(seq["per_block"]) == 4
    # simultaneous per block: its block<k> windows over the run's image pairs
    sim = next(r for r in rep["runs"] if r["mode"] == "simultaneous")
    w1 = runs[1].profile["windows"]["block1"]
    assert sim["per_block"][0]["time_per_image_ms"] == pytest.approx(
        1000 * w1["time_s_total"] / runs[1].profile["run"]["images"])
    md = open(out / "report.md").read()
    for text in ("## Summary", "## Per block", "| e2e |", "all 4 blocks, one pass each",
                 "x e2e", "Fake H100 80GB", "peak_memory.png", "power_trace.png",
                 "## How this was measured"):
        assert text in md, text
    # the unit is the image pair (batch size counts pairs), per second of measured step time
    for text in ("throughput (pairs/s)", "time/pair (ms)", "GPU energy/pair (J)", "(ms/pair)"):
        assert text in md, text
    assert "/img" not in md and "img/s" not in md


def test_unmeasured_is_na_never_zero(monkeypatch, tmp_path):
    runs = _runs(monkeypatch, tmp_path, gpu=False)
    out = tmp_path / "report"
    rep = write_report(runs, str(out))
    for png in PLOTS:
        assert _png_ok(str(out / png))
    for row in rep["tables"]["summary"]["rows"]:
        for key in ("peak_allocated_gib", "energy_per_image_j", "mean_power_w"):
            assert row["cells"][key] is None and "cpu" in row["na"][key].lower()
        assert row["cells"]["throughput_img_s"] > 0  # time is measured on CPU too
    check_ratios(rep)
    md = open(out / "report.md").read()
    assert "n/a (CPU run)" in md
    summary = md.split("## Summary")[1].split("## Peak memory breakdown")[0]
    # columns unmeasured in every run are left out of the pasted table and named under it
    header = next(l for l in summary.splitlines() if l.startswith("| run"))
    for label in ("peak allocated (GiB)", "GPU energy/pair (J)", "mean GPU power (W)"):
        assert label not in header, header
    assert "throughput (pairs/s)" in header and "time/pair (ms)" in header
    omitted = next(l for l in summary.splitlines() if l.startswith("Not in this table:"))
    for label in ("peak allocated (GiB)", "GPU energy/pair (J)", "mean GPU power (W)"):
        assert label in omitted, omitted
    assert "n/a (CPU run)" in omitted
    rows = [l for l in summary.splitlines() if l.startswith(("| e2e", "| sequential"))]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == header.count("|") - 1 and float(cells[1]) > 0, cells
    assert "## Not measured" in md and "device is cpu" in md
    assert "(not measured): not measured" not in md  # every n/a names a real reason
    assert "**CUDA** not used" in md  # the torch build's CUDA version is not a CUDA run
    # the per-window tables: no energy, so no count of windows too short for the counter
    win_rows = [l for l in md.splitlines() if l.startswith("| step |")]
    assert win_rows and all(l.rstrip(" |").endswith("n/a (no energy)") for l in win_rows), win_rows


def test_figures_spanning_orders_of_magnitude_keep_significant_digits():
    """A CPU's achieved TFLOP/s (0.0x) printed with one decimal read 0.0: unmeasured-looking."""
    from profiling.report import ARITHMETIC_COLUMNS, _fmt
    fmt = dict((k, f) for k, _, f, _ in ARITHMETIC_COLUMNS)
    assert _fmt(0.0234, fmt["achieved_tflops"]) == "0.0234"
    assert _fmt(412.6, fmt["achieved_tflops"]) == "413"
    assert _fmt(12.345, fmt["gflop_per_pair"]) == "12.3"


def test_peak_memory_breakdown(monkeypatch, tmp_path):
    gib = 1 << 30
    resident = {"e2e": [(0.5, 0.5)], "simultaneous": [(0.25, 0.125)],
                "sequential": [(0.125, 0.0625), (0.25, 0.125), (0.375, 0.1875), (0.5, 0.25)]}
    runs = []
    for i, mode in enumerate(resident):
        d = tmp_path / "runs" / mode
        meta = {"resident": [{"parameters_bytes": int(p * gib), "optimizer_state_bytes":
                              int(o * gib)} for p, o in resident[mode]]}
        prof = make_profile(monkeypatch, str(d / "profile.json"), mode, slow=1.0 + 0.3 * i,
                            meta_extra=meta)
        runs.append(RunResult(mode, str(d), prof))
    runs.append(RunResult("e2e-old", str(tmp_path / "old"),
                          make_profile(monkeypatch, str(tmp_path / "old" / "profile.json"), "e2e")))
    too_big = {"resident": [{"parameters_bytes": 8 * gib, "optimizer_state_bytes": 8 * gib}]}
    runs.append(RunResult("e2e-inconsistent", str(tmp_path / "bad"), make_profile(
        monkeypatch, str(tmp_path / "bad" / "profile.json"), "e2e", meta_extra=too_big)))
    rep = write_report(runs, str(tmp_path / "report"))
    rows = {r["label"].split(" (")[0]: r for r in rep["tables"]["memory"]["rows"]}
    for mode, run in zip(resident, runs):
        segs = run.profile["run"]["segments"]
        i = max(range(len(segs)), key=lambda j: segs[j]["peak_allocated_gib"])
        p, o = resident[mode][i]
        cells = rows[mode]["cells"]
        assert cells["parameters_gib"] == pytest.approx(p)
        assert cells["optimizer_state_gib"] == pytest.approx(o)
        assert cells["rest_at_peak_gib"] == pytest.approx(segs[i]["peak_allocated_gib"] - p - o)
    # sequential: the block with the highest peak (block 1 in the factory: the most activations)
    assert rows["sequential"]["cells"]["parameters_gib"] == pytest.approx(0.125)
    assert check_ratios(rep) > 0
    bad = rows["e2e-inconsistent"]  # never a negative rest
    assert bad["cells"]["rest_at_peak_gib"] is None and "inconsistent" in bad["na"]["rest_at_peak_gib"]
    old = rows["e2e-old"]
    assert old["cells"]["parameters_gib"] is None and "not recorded" in old["na"]["parameters_gib"]
    md = open(tmp_path / "report" / "report.md").read()
    section = md.split("## Peak memory breakdown")[1].split("## Per block")[0]
    assert "| run | peak allocated (GiB) |" in section and "optimizer state (GiB)" in section
    assert "n/a (not recorded)" in section  # the old profile's cells say why


def test_arithmetic_table(monkeypatch, tmp_path):
    flops = {"e2e": [6.4e12], "simultaneous": [7.2e12], "sequential": [2e12, 3e12, 4e12, 5e12]}
    runs = []
    for i, mode in enumerate(flops):
        d = tmp_path / "runs" / mode
        prof = make_profile(monkeypatch, str(d / "profile.json"), mode, slow=1.0 + 0.3 * i,
                            batch=32, meta_extra={"flops_per_step": flops[mode]})
        runs.append(RunResult(mode, str(d), prof))
    d = tmp_path / "runs" / "uncounted"
    runs.append(RunResult("uncounted", str(d), make_profile(
        monkeypatch, str(d / "profile.json"), "e2e", meta_extra={"flops_per_step": [None]})))
    rep = write_report(runs, str(tmp_path / "report"))
    rows = {r["label"].split(" (")[0]: r for r in rep["tables"]["arithmetic"]["rows"]}
    for mode in flops:
        cells = rows[mode]["cells"]
        gflop = sum(flops[mode]) / 32 / 1e9  # sequential: all 4 blocks, one pass each
        assert cells["gflop_per_pair"] == pytest.approx(gflop)
        thr = next(r for r in rep["runs"] if r["label"] == mode)["metrics"]["throughput_img_s"]
        assert cells["achieved_tflops"] == pytest.approx(gflop * thr / 1000)
    assert rows["simultaneous"]["cells"]["gflop_per_pair_vs_e2e"] == pytest.approx(7.2 / 6.4)
    # sequential per block: each block's own step (the frozen blocks' forward included)
    blocks = [r for r in rep["tables"]["per_block"]["rows"] if r["label"].startswith("sequential")]
    assert [b["cells"]["gflop_per_pair"] for b in blocks] == pytest.approx(
        [f / 32 / 1e9 for f in flops["sequential"]])
    sim_block = next(r for r in rep["tables"]["per_block"]["rows"]
                     if r["label"].startswith("simultaneous"))
    assert sim_block["cells"]["gflop_per_pair"] is None
    assert "per training step" in sim_block["na"]["gflop_per_pair"]
    assert rows["uncounted"]["cells"]["gflop_per_pair"] is None
    assert "warm-up" in rows["uncounted"]["na"]["gflop_per_pair"]
    assert check_ratios(rep) > 0
    md = open(tmp_path / "report" / "report.md").read()
    assert "| run | GFLOP/pair (matmul + conv) | x e2e | achieved TFLOP/s per GPU |" in md


def test_arithmetic_on_cpu_is_per_process_not_per_gpu(monkeypatch, tmp_path):
    """A CPU run has no GPU: its achieved TFLOP/s is per (training) process, and neither the
    table nor the note may call it per GPU."""
    runs = []
    for mode in ("e2e", "sequential"):
        d = tmp_path / "runs" / mode
        runs.append(RunResult(mode, str(d), make_profile(
            monkeypatch, str(d / "profile.json"), mode, gpu=False,
            meta_extra={"flops_per_step": [6.4e9] * (4 if mode == "sequential" else 1)})))
    rep = write_report(runs, str(tmp_path / "report"))
    assert rep["tables"]["arithmetic"]["rows"][0]["cells"]["achieved_tflops"] is not None
    md = open(tmp_path / "report" / "report.md").read()
    assert "| achieved TFLOP/s per process (CPU) |" in md
    assert "per GPU" not in md and "per pair, per process (CPU)." in md


def test_ddp_mean_power_and_window_energy_say_one_gpu(monkeypatch, tmp_path):
    """Under torchrun the profile is rank 0's: its mean power, power trace and window energies
    are one GPU's (energy per pair is scaled to the job): labels and notes say so; a
    single-process report keeps its labels."""
    import profiling.report as report_mod

    titles = []
    save = report_mod._save
    monkeypatch.setattr(report_mod, "_save", lambda fig, path: (
        titles.extend(ax.get_title(loc="left") for ax in fig.axes), save(fig, path)))
    for world in (1, 2):
        runs = []
        for mode in ("e2e", "sequential"):
            d = tmp_path / f"w{world}" / mode
            runs.append(RunResult(mode, str(d), make_profile(
                monkeypatch, str(d / "profile.json"), mode, meta_extra={"world_size": world})))
        titles.clear()
        rep = write_report(runs, str(tmp_path / f"report{world}"))
        md = open(tmp_path / f"report{world}" / "report.md").read()
        header = next(ln for ln in md.splitlines() if ln.startswith("| run | peak allocated"))
        windows = [ln for ln in md.splitlines() if ln.startswith("| window | count | mean")]
        ddp_note = [n for n in rep["notes"] if "torchrun" in n]
        if world == 1:
            assert "| mean GPU power (W) |" in header and "rank 0" not in md and not ddp_note
            assert all("| energy (J) |" in ln for ln in windows) and "e2e" in titles
        else:
            assert "| mean GPU power, rank 0's GPU only (W) |" in header
            assert len(windows) == 2 and all(
                "| energy, rank 0's GPU only (J) |" in ln for ln in windows)
            assert len(ddp_note) == 1 and "mean power, the power trace and the per-window " \
                "energies are rank 0's GPU only" in ddp_note[0]
            assert "e2e (rank 0's GPU only, of 2 processes)" in titles
            assert [r["world_size"] for r in rep["runs"]] == [2, 2]


def test_md_table_keeps_partly_measured_columns():
    from profiling.report import _md_table
    cols = [("a", "A (GiB)", "{:.2f}", False), ("b", "B (J)", "{:.2f}", False),
            ("c", "C (W)", "{:.0f}", False)]
    table = {"columns": [{"key": k, "label": h, "format": f} for k, h, f, _ in cols], "rows": [
        {"label": "e2e", "cells": {"a": 1.0, "b": None, "c": None},
         "na": {"b": "no NVML", "c": "CPU run"}},
        {"label": "sim", "cells": {"a": 0.5, "b": 2.0, "c": None},
         "na": {"c": "CPU run"}}]}
    notes = []
    md = _md_table(table, notes)
    head = md.splitlines()[0]
    assert "A (GiB)" in head and "B (J)" in head and "C (W)" not in head
    assert "| e2e | 1.00 | n/a (no NVML) |" in md and "| sim | 0.50 | 2.00 |" in md
    assert md.splitlines()[-1] == "Not in this table: C (W): n/a (CPU run)."
    assert sorted(notes) == ["CPU run", "no NVML"]
    # a column n/a everywhere, for different reasons: left out too, every reason named
    table["rows"][1]["cells"]["b"] = None
    table["rows"][1]["na"]["b"] = "not timed"
    md = _md_table(table, [])
    assert "B (J)" not in md.splitlines()[0]
    assert md.splitlines()[-1] == ("Not in this table: B (J): n/a (no NVML) or n/a (not timed); "
                                   "C (W): n/a (CPU run).")
    table["rows"] = [table["rows"][0]]
    table["rows"][0]["cells"]["a"] = None
    table["rows"][0]["na"]["a"] = "CPU run"
    assert _md_table(table, []).startswith("Nothing measured here (")


def test_no_e2e_and_failed_runs(monkeypatch, tmp_path):
    runs = _runs(monkeypatch, tmp_path, modes=("simultaneous", "sequential"))
    runs.append(RunResult("e2e", str(tmp_path / "runs" / "e2e"), None, status="oom",
                          mode="e2e", exit_code=3, error="out of memory: tried 20 GiB"))
    rep = write_report(runs, str(tmp_path / "report"))
    assert rep["baseline"] == "e2e"
    for row in rep["tables"]["summary"]["rows"]:
        assert row["cells"]["peak_allocated_gib_vs_e2e"] is None
    md = open(tmp_path / "report" / "report.md").read()
    assert "**e2e: oom** (exit code 3)" in md and "n/a (OOM)" in md
    rep2 = write_report(runs[:2], str(tmp_path / "report2"))
    assert rep2["baseline"] is None
    row = rep2["tables"]["summary"]["rows"][0]
    assert row["cells"]["throughput_img_s_vs_e2e"] is None
    assert "no e2e run" in row["na"]["throughput_img_s_vs_e2e"]


def test_baseline_is_unfused_e2e(monkeypatch, tmp_path):
    runs = []
    for fused in (True, False):
        d = tmp_path / f"e2e-{fused}"
        p = make_profile(monkeypatch, str(d / "profile.json"), "e2e", fused=fused,
                         slow=0.8 if fused else 1.0)
        runs.append(RunResult(f"e2e ({'fused' if fused else 'unfused'})", str(d), p))
    rep = write_report(runs, str(tmp_path / "r"))
    assert rep["baseline"] == "e2e (unfused)"
    assert rep["header"]["settings_per_run"]["fused"] == [True, False]
    assert check_ratios(rep) > 0


def test_report_cli(monkeypatch, tmp_path, capsys):
    runs = _runs(monkeypatch, tmp_path, modes=("e2e", "sequential"))
    out = tmp_path / "cli"
    assert cli.main(["report", runs[0].run_dir, runs[1].run_dir, "--out", str(out)]) == 0
    rep = json.load(open(out / "report.json"))
    assert [r["label"] for r in rep["runs"]] == ["e2e", "sequential"]  # from profile meta
    assert rep["command"].startswith("python -m profiling report")
    assert cli.main(["report", runs[0].run_dir]) == 0  # one dir: report goes into it
    assert os.path.isfile(os.path.join(runs[0].run_dir, "report.md"))
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    assert "no profile.json" in capsys.readouterr().err
    (tmp_path / "cmp" / "runs" / "e2e").mkdir(parents=True)  # a compare output, not a run dir
    assert cli.main(["report", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "compare output" in err and "e2e" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "profile.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a blockwise.profile/1 profile"):
        load_run_dir(str(bad))
    assert cli.main(["report", runs[0].run_dir, runs[1].run_dir]) == 2  # needs --out


# -- compare: command lines and process outcomes -------------------------------------------------
def test_trainer_command():
    seq = trainer_command("sequential", run_dir="/r", arch="resnet18", image_size=32,
                          batch_size=16, steps=3, warmup=2, fused=False, projector="32-32",
                          device="cpu", extra=["--workers", "0"], python="py")
    assert seq[:3] == ["py", "-m", "blockwise.train"]
    s = " ".join(seq)
    for frag in ("--mode sequential", "--steps-per-block 5", "--profile-warmup 2",
                 "--synthetic-size 80", "--no-fused", "--projector 32-32", "--device cpu",
                 "--dataset synthetic", "--probe-epochs 0", "--out /r", "--profile"):
        assert frag in s, frag
    assert "--max-steps" not in s and seq[-2:] == ["--workers", "0"]
    e2e = " ".join(trainer_command("e2e", run_dir="/r", arch="resnet50", image_size=224,
                                   batch_size=256, steps=20, warmup=5, fused=True))
    assert "--max-steps 25" in e2e and "--fused" in e2e.split() and "--steps-per-block" not in e2e
    with pytest.raises(ValueError, match="valid: e2e, simultaneous, sequential"):
        trainer_command("blockwise", run_dir="/r", arch="a", image_size=32, batch_size=8,
                        steps=1, warmup=0, fused=False)
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        trainer_command("e2e", run_dir="/r", arch="a", image_size=32, batch_size=8, steps=0,
                        warmup=0, fused=False)
    assert "--no-profile-phases" in e2e.split() and "--profile-phases" not in e2e.split()
    ph = trainer_command("e2e", run_dir="/r", arch="resnet50", image_size=224, batch_size=256,
                         steps=20, warmup=5, fused=True, phases=True)
    assert "--profile-phases" in ph and "--no-profile-phases" not in ph
    assert parse_modes("e2e, sequential") == ["e2e", "sequential"]
    with pytest.raises(ValueError, match="unknown"):
        parse_modes("e2e,bogus")


@pytest.mark.parametrize("code, status", [
    ("print('out of memory: CUDA out of memory. Tried to allocate 2 GiB'); raise SystemExit(3)",
     "oom"),
    ("print('Traceback: boom'); raise SystemExit(1)", "failed"),
    ("print('done')", "failed"),  # exit 0 but no profile.json
])
def test_run_trainer_classifies_outcomes(tmp_path, code, status):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stale.txt").write_text("from an earlier run")
    res = run_trainer([sys.executable, "-c", code], str(run_dir), str(tmp_path / "run.log"),
                      60.0, "x", "e2e", False)
    assert res.status == status and res.profile is None
    assert not (run_dir / "stale.txt").exists()  # the stale run dir was cleared first
    if status == "oom":
        assert res.exit_code == 3 and "Tried to allocate" in res.error
    else:
        assert res.error
    assert "$ " in open(tmp_path / "run.log").read()


def test_run_trainer_loads_profile(monkeypatch, tmp_path):
    src = tmp_path / "src" / "profile.json"
    make_profile(monkeypatch, str(src), "e2e")
    run_dir = tmp_path / "run"
    code = (f"import shutil, os; os.makedirs({str(run_dir)!r}, exist_ok=True); "
            f"shutil.copy({str(src)!r}, {str(run_dir / 'profile.json')!r})")
    res = run_trainer([sys.executable, "-c", code], str(run_dir), str(tmp_path / "l.log"), 60.0,
                      "e2e", "e2e", False)
    assert res.status == "ok" and res.profile["run"]["images"] > 0


# -- maxbatch --------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 31, 32, 100, 257, 1000, 5000, 100_000])
def test_search_brackets_the_limit(limit):
    calls = []

    def probe(b):
        calls.append(b)
        return b <= limit

    r = search(probe, start=256, max_batch=8192, granularity=32, max_probes=14)
    assert len(calls) == len(set(calls)) <= 14, "no batch probed twice, probes capped"
    lf, sf = r["largest_fitting"], r["smallest_failing"]
    if limit < 32:
        assert lf is None and sf == 32
    elif limit >= 8192:
        assert lf == 8192 and sf is None and r["capped"]
    else:
        assert lf <= limit < sf
        assert r["resolution"] == sf - lf <= 32  # 14 probes are enough here
        assert all(b % 32 == 0 for b in calls)


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 9, 40])
@pytest.mark.parametrize("granularity", [1, 3])
def test_search_never_probes_below_min_batch(limit, granularity):
    """The trainer refuses batch 1 (batch statistics): the search's smallest probe is the
    smallest multiple of the granularity that is at least min_batch=2."""
    calls = []
    r = search(lambda b: calls.append(b) or b <= limit, start=8, max_batch=64,
               granularity=granularity, max_probes=20, min_batch=2)
    smallest = 2 if granularity == 1 else 3
    assert min(calls) >= smallest and all(b % granularity == 0 for b in calls)
    lf, sf = r["largest_fitting"], r["smallest_failing"]
    if limit < smallest:
        assert lf is None and sf == smallest
    else:
        assert lf <= limit < sf and sf - lf == granularity


def test_search_stops_at_max_probes():
    calls = []
    r = search(lambda b: calls.append(b) or b <= 700, start=256, max_batch=8192,
               granularity=32, max_probes=4)
    assert calls == [256, 512, 1024, 768]
    assert (r["largest_fitting"], r["smallest_failing"]) == (512, 768)
    assert r["resolution"] > 32
    with pytest.raises(ValueError, match="granularity"):
        search(lambda b: True, start=8, max_batch=16, granularity=32, max_probes=3)
    with pytest.raises(ValueError, match="at least 2"):
        search(lambda b: True, start=1, max_batch=1, granularity=1, max_probes=3, min_batch=2)


def test_maxbatch_outputs(tmp_path):
    rep = {"command": "python -m profiling maxbatch --out x",
           "settings": {"arch": "resnet50", "image_size": 224, "projector": "8192-8192-8192",
                        "fused": False, "device": "cuda", "start": 256, "max_batch": 4096,
                        "granularity": 64, "max_probes": 4, "steps_per_probe": 2,
                        "extra_trainer_args": []},
           "environment": {"gpu": "Fake H100", "gpu_memory_gib": 79.1, "driver": "1",
                           "torch": "2", "triton": "3"},
           "modes": [
               {"mode": "e2e", "error": None, "largest_fitting": 384, "smallest_failing": 512,
                "resolution": 128, "capped": False,
                "probes": [{"batch": 256, "result": "fits", "peak_allocated_gib": 50.0},
                           {"batch": 512, "result": "oom", "peak_allocated_gib": None},
                           {"batch": 384, "result": "fits", "peak_allocated_gib": 74.0}]},
               {"mode": "sequential", "error": None, "largest_fitting": 1024,
                "smallest_failing": None, "resolution": None, "capped": True,
                "probes": [{"batch": 1024, "result": "fits", "peak_allocated_gib": 60.0}]},
               {"mode": "simultaneous", "error": "exit code 1", "largest_fitting": None,
                "smallest_failing": None, "resolution": None, "capped": False, "probes": []}]}
    write_outputs(rep, str(tmp_path))
    assert _png_ok(str(tmp_path / "memory_vs_batch.png"))
    md = open(tmp_path / "maxbatch.md").read()
    assert "| e2e | 384 | 1.00x | 512 | 128 | 74.00 |" in md
    # the cap fitted: 1024 is a lower bound, and so is its ratio to e2e's exact 384
    assert "| sequential | ≥ 1024 (cap reached) | ≥ 2.67x |" in md
    assert "n/a (probe failed" in md
    assert json.load(open(tmp_path / "maxbatch.json"))["modes"][0]["largest_fitting"] == 384
    assert maxbatch_md(rep) == md


def test_compare_fused_both_with_fake_trainer(monkeypatch, tmp_path):
    """compare's process handling, labels and baseline for --fused both, and a mode that OOMs,
    through a stand-in trainer (fast); the real trainer runs in test_compare_on_cpu."""
    templates = {}
    for mode in ("e2e", "sequential"):
        templates[mode] = str(tmp_path / "t" / mode / "profile.json")
        make_profile(monkeypatch, templates[mode], mode)
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
val = lambda flag: args[args.index(flag) + 1]
mode, out = val("--mode"), val("--out")
if mode == "simultaneous":
    print("out of memory: CUDA out of memory. Tried to allocate 9 GiB")
    sys.exit(3)
p = json.load(open({templates!r}[mode]))
p["meta"]["fused"] = "--fused" in args
p["meta"]["argv"] = args
if p["meta"]["fused"]:  # the fused kernels make it faster
    p["run"]["time_s"] *= 0.8
    p["run"]["throughput_img_s"] /= 0.8
os.makedirs(out, exist_ok=True)
json.dump(p, open(os.path.join(out, "profile.json"), "w"))
""")
    fake.chmod(0o755)
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--modes", "e2e,simultaneous,sequential", "--fused", "both",
                   "--steps", "3", "--warmup", "1", "--python", str(fake), "--out", str(out),
                   "--lr", "0.1"])  # an unknown flag: passed through to the trainer
    assert rc == 1  # simultaneous OOMed
    rep = json.load(open(out / "report.json"))
    labels = [r["label"] for r in rep["runs"]]
    assert labels == ["e2e (unfused)", "e2e (fused)", "simultaneous (unfused)",
                      "simultaneous (fused)", "sequential (unfused)", "sequential (fused)"]
    assert [r["status"] for r in rep["runs"]] == ["ok", "ok", "oom", "oom", "ok", "ok"]
    assert rep["baseline"] == "e2e (unfused)"
    fused_e2e = rep["tables"]["summary"]["rows"][1]["cells"]
    assert fused_e2e["throughput_img_s_vs_e2e"] == pytest.approx(1 / 0.8)
    check_ratios(rep)
    argv = json.load(open(out / "runs" / "e2e-fused" / "profile.json"))["meta"]["argv"]
    assert "--fused" in argv and argv[-2:] == ["--lr", "0.1"]
    assert "--no-fused" in json.load(open(out / "runs" / "e2e-unfused" / "profile.json")
                                     )["meta"]["argv"]
    md = open(out / "report.md").read()
    assert "**simultaneous (fused): oom** (exit code 3)" in md
    assert "--fused both" in rep["command"]


# -- the real thing, on the CPU ------------------------------------------------------------------
TINY = ["--arch", "resnet18", "--image-size", "8", "--batch-size", "4", "--steps", "2",
        "--warmup", "1", "--projector", "16-16", "--device", "cpu"]


@pytest.mark.skipif(not HAS_TRAINER, reason="blockwise.train not there yet")
def test_compare_on_cpu(tmp_path):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--modes", "e2e,simultaneous,sequential", *TINY, "--out", str(out),
                   "--", "--workers", "0"])
    logs = {p: open(out / "runs" / p).read()[-2000:] for p in os.listdir(out / "runs")
            if p.endswith(".log")}
    assert rc == 0, logs
    rep = json.load(open(out / "report.json"))
    assert [r["status"] for r in rep["runs"]] == ["ok"] * 3, logs
    for png in PLOTS:
        assert _png_ok(str(out / png)), png
    assert check_ratios(rep) >= 6
    rows = {r["label"]: r["cells"] for r in rep["tables"]["summary"]["rows"]}
    assert rows["e2e"]["throughput_img_s"] > 0
    assert rows["e2e"]["peak_allocated_gib"] is None  # CPU: n/a, not 0
    # what lives across steps is measured on CPU too (exact tensor bytes); LARS keeps one
    # momentum per trainable parameter, and sequential trains block 1 and its head only
    mem = {r["label"].split(" (")[0]: r["cells"] for r in rep["tables"]["memory"]["rows"]}
    assert mem["e2e"]["optimizer_state_gib"] == pytest.approx(mem["e2e"]["parameters_gib"])
    assert mem["simultaneous"]["parameters_gib"] > mem["e2e"]["parameters_gib"]  # 4 heads
    assert 0 < mem["sequential"]["optimizer_state_gib"] < mem["sequential"]["parameters_gib"]
    assert all(m["rest_at_peak_gib"] is None for m in mem.values())
    # flops are counted on CPU too; sequential's blocks also run the frozen blocks forward
    ar = {r["label"].split(" (")[0]: r["cells"] for r in rep["tables"]["arithmetic"]["rows"]}
    assert all(a["gflop_per_pair"] > 0 and a["achieved_tflops"] > 0 for a in ar.values())
    assert ar["sequential"]["gflop_per_pair"] > ar["e2e"]["gflop_per_pair"]
    seq = next(r for r in rep["runs"] if r["mode"] == "sequential")
    assert len(seq["per_block"]) == 4 and seq["per_image_basis"].startswith("sum over 4")
    for r in rep["runs"]:
        assert r["metrics"]["images"] > 0
        assert r["windows"]["step"]["count"] >= 2
    md = open(out / "report.md").read()
    assert "all 4 blocks, one pass each" in md and "n/a (CPU run)" in md
    # CPU, phases off: no window has a time or a peak; each run's windows are one line, no table
    windows = md.split("## Windows per run")[1]
    assert windows.count("nothing measured per window") == 3 and "| window |" not in windows


def _fake_cuda(monkeypatch, available=True):
    """compare / maxbatch check for CUDA before any run: answer as a GPU machine would (the
    runs are stand-ins)."""
    import profiling.compare

    monkeypatch.setattr(profiling.compare, "cuda_available", lambda: available, raising=False)


FAKE_TRAINER = """#!{python}
# Stands in for `python -m blockwise.train`: OOMs (exit 3) above a per-mode limit, else writes
# the template profile with a peak memory proportional to the batch.
import json, os, sys
args = sys.argv[1:]
assert args[:2] == ["-m", "blockwise.train"], args
val = lambda flag: args[args.index(flag) + 1]
batch, mode, out = int(val("--batch-size")), val("--mode"), val("--out")
limit = {limits}[mode]
if limit is None:
    print("Traceback: something else broke")
    sys.exit(1)
if batch > limit:
    print(f"out of memory: CUDA out of memory. Tried to allocate {{batch}} MiB")
    sys.exit(3)
p = json.load(open({template!r}))
p["run"]["peak_allocated_gib"] = batch / 100.0
p["meta"]["batch_size"] = batch
os.makedirs(out, exist_ok=True)
json.dump(p, open(os.path.join(out, "profile.json"), "w"))
"""


def test_maxbatch_recovers_from_oom_with_fresh_processes(monkeypatch, tmp_path):
    _fake_cuda(monkeypatch)  # the probes are a stand-in trainer
    template = tmp_path / "template" / "profile.json"
    make_profile(monkeypatch, str(template), "e2e")
    fake = tmp_path / "fake_python"
    limits = {"e2e": 300, "sequential": 1000, "simultaneous": None}
    fake.write_text(FAKE_TRAINER.format(python=sys.executable, limits=limits,
                                        template=str(template)))
    fake.chmod(0o755)
    out = tmp_path / "mb"
    rc = cli.main(["maxbatch", "--modes", "e2e,sequential,simultaneous", "--start", "256",
                   "--granularity", "32", "--max-probes", "8", "--max-batch", "4096",
                   "--device", "cuda", "--python", str(fake), "--out", str(out),
                   "--", "--workers", "0"])
    assert rc == 1  # simultaneous failed for another reason than OOM
    rep = json.load(open(out / "maxbatch.json"))
    by_mode = {m["mode"]: m for m in rep["modes"]}
    for mode in ("e2e", "sequential"):
        m = by_mode[mode]
        assert m["error"] is None
        assert m["largest_fitting"] <= limits[mode] < m["smallest_failing"], m
        assert m["resolution"] == 32
        assert any(p["result"] == "oom" for p in m["probes"])
        fitting = next(p for p in m["probes"] if p["batch"] == m["largest_fitting"])
        assert fitting["peak_allocated_gib"] == pytest.approx(m["largest_fitting"] / 100.0)
    assert by_mode["e2e"]["largest_fitting"] == 288 and by_mode["sequential"]["largest_fitting"] == 992
    assert "exit code 1" in by_mode["simultaneous"]["error"]
    assert rep["environment"]["gpu"] is None or isinstance(rep["environment"]["gpu"], str)
    md = open(out / "maxbatch.md").read()
    assert "| e2e | 288 | 1.00x | 320 | 32 |" in md and "| sequential | 992 | 3.44x |" in md
    assert "n/a (probe failed" in md
    assert _png_ok(str(out / "memory_vs_batch.png"))
    log = open(out / "probes" / "e2e-b512.log").read()
    assert "--workers 0" in log and "--max-steps 2" in log  # pass-through, 2 steps per probe


def test_maxbatch_environment_is_this_runs_not_a_stale_probe(monkeypatch, tmp_path):
    """A second maxbatch into the same --out leaves earlier probe dirs at batches it does not
    probe again: the header's GPU must come from this run's probes, not from one of those."""
    _fake_cuda(monkeypatch)
    template = tmp_path / "template" / "profile.json"
    fresh = make_profile(monkeypatch, str(template), "e2e")
    fresh["environment"]["gpu"] = "This run's GPU"
    json.dump(fresh, open(template, "w"))
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable, limits={"e2e": 300},
                                        template=str(template)))
    fake.chmod(0o755)
    out = tmp_path / "mb"
    stale = json.load(open(template))
    stale["environment"]["gpu"] = "Stale GPU from an earlier run"
    (out / "probes" / "e2e-b1024").mkdir(parents=True)  # sorts before e2e-b256
    json.dump(stale, open(out / "probes" / "e2e-b1024" / "profile.json", "w"))
    assert cli.main(["maxbatch", "--modes", "e2e", "--start", "256", "--granularity", "32",
                     "--max-probes", "2", "--device", "cuda", "--python", str(fake),
                     "--out", str(out)]) == 0
    rep = json.load(open(out / "maxbatch.json"))
    assert [p["batch"] for p in rep["modes"][0]["probes"]] == [256, 512]
    assert rep["environment"]["gpu"] == "This run's GPU"
    assert "Stale GPU" not in open(out / "maxbatch.md").read()


def test_maxbatch_markdown_when_probes_run_out():
    """Probes spent before an OOM (or before the smallest batch): the table must not present
    the result as bracketed, nor claim that nothing fits."""
    def entry(mode, limit, start):
        r = search(lambda b: b <= limit, start=start, max_batch=4096, granularity=32,
                   max_probes=3, min_batch=2)
        return {"mode": mode, "error": None, **r,
                "probes": [{"batch": int(b), "result": "fits" if ok else "oom",
                            "peak_allocated_gib": 1.0 if ok else None}
                           for b, ok in r["fits"].items()]}
    rep = {"command": "x", "environment": {},
           "settings": {"arch": "resnet50", "image_size": 224, "projector": None, "fused": False,
                        "device": "cuda", "start": 256, "max_batch": 4096, "granularity": 32,
                        "max_probes": 3, "steps_per_probe": 2, "extra_trainer_args": []},
           "modes": [entry("e2e", 100, 256), entry("simultaneous", 40, 1024),
                     entry("sequential", 5000, 256), entry("nothing", 10, 64)]}
    m = {e["mode"]: e for e in rep["modes"]}
    assert (m["simultaneous"]["largest_fitting"], m["simultaneous"]["smallest_failing"]) == \
        (None, 256)  # 1024, 512, 256 all OOM: 32..224 never probed
    assert m["sequential"]["smallest_failing"] is None and not m["sequential"]["capped"]
    assert (m["nothing"]["largest_fitting"], m["nothing"]["smallest_failing"]) == (None, 32)
    rows = {line.split("|")[1].strip(): line for line in maxbatch_md(rep).splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    assert "nothing fits" not in rows["simultaneous"] and "ran out" in rows["simultaneous"]
    assert "| sequential | ≥ 1024 (probes ran out before an OOM) | ≥ 16.00x |" \
        in rows["sequential"]
    assert "nothing fits, not even the smallest probe" in rows["nothing"]
    assert "| e2e | 64 | 1.00x | 128 | 64 |" in rows["e2e"]  # bracketed: no note


def _mode(mode, lf, sf, capped=False, error=None):
    return {"mode": mode, "error": error, "largest_fitting": lf, "smallest_failing": sf,
            "resolution": None if lf is None or sf is None else sf - lf, "capped": capped,
            "probes": [{"batch": b, "result": "fits", "peak_allocated_gib": 1.0}
                       for b in (lf,) if b is not None]}


@pytest.mark.parametrize("e2e, other, cell, value, bound", [
    # (largest fitting, smallest failing, capped) of e2e and of the other mode
    ((256, 288, False), (512, 544, False), "2.00x", 2.0, "exact"),
    ((256, 288, False), (1024, None, True), "≥ 4.00x", 4.0, "at least"),      # cap reached
    ((256, 288, False), (1024, None, False), "≥ 4.00x", 4.0, "at least"),     # probes ran out
    ((512, None, False), (256, 288, False), "≤ 0.50x", 0.5, "at most"),
    ((512, None, True), (1024, None, False), "n/a (both limits are lower bounds)", None, None),
    ((None, 32, False), (1024, None, False), "n/a (no e2e result)", None, None),
])
def test_maxbatch_ratio_of_a_lower_bound_is_a_bound(e2e, other, cell, value, bound):
    """A largest batch with no OOM above it is only a lower bound: the ratio to e2e is '≥'
    over an exact e2e limit, '≤' under a lower-bound e2e limit, n/a between two lower bounds."""
    from profiling.maxbatch import ratio_cell, vs_e2e

    base, m = _mode("e2e", *e2e), _mode("sequential", *other)
    assert ratio_cell(m, base) == cell
    got, kind, why = vs_e2e(m, base)
    assert (got, kind) == (value, bound) and (why is None) == (value is not None)
    assert ratio_cell(base, base) == ("1.00x" if e2e[0] else "n/a (no e2e result)")
    rep = {"command": "x", "environment": {}, "modes": [base, m],
           "settings": {"arch": "resnet50", "image_size": 224, "projector": None,
                        "fused": False, "device": "cuda", "start": 256, "max_batch": 1024,
                        "granularity": 32, "max_probes": 3, "steps_per_probe": 2,
                        "extra_trainer_args": []}}
    row = next(ln for ln in maxbatch_md(rep).splitlines() if ln.startswith("| sequential |"))
    assert row.split("|")[3].strip() == cell
    assert row.split("|")[2].strip().startswith("≥ ") == (other[1] is None)


def test_maxbatch_console_and_json_mark_lower_bounds(monkeypatch, tmp_path, capsys):
    """The command's own summary and maxbatch.json say which limits and ratios are bounds: here
    sequential fits up to the cap (a lower bound), e2e OOMs above 288 (exact)."""
    _fake_cuda(monkeypatch)
    template = tmp_path / "template" / "profile.json"
    make_profile(monkeypatch, str(template), "e2e")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable,
                                        limits={"e2e": 300, "sequential": 10_000},
                                        template=str(template)))
    fake.chmod(0o755)
    out = tmp_path / "mb"
    assert cli.main(["maxbatch", "--modes", "e2e,sequential", "--start", "256",
                     "--granularity", "32", "--max-probes", "8", "--max-batch", "1024",
                     "--device", "cuda", "--python", str(fake), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "  e2e: 288 (1.00x)" in printed
    assert "  sequential: ≥ 1024 (cap reached) (≥ 3.56x)" in printed
    by_mode = {m["mode"]: m for m in json.load(open(out / "maxbatch.json"))["modes"]}
    assert by_mode["e2e"]["lower_bound"] is False and by_mode["sequential"]["lower_bound"] is True
    assert by_mode["sequential"]["vs_e2e"] == pytest.approx(1024 / 288)
    assert by_mode["sequential"]["vs_e2e_bound"] == "at least"
    assert (by_mode["e2e"]["vs_e2e"], by_mode["e2e"]["vs_e2e_bound"]) == (1.0, "exact")
    assert "| sequential | ≥ 1024 (cap reached) | ≥ 3.56x |" in open(out / "maxbatch.md").read()


def test_maxbatch_steps_below_one_names_the_flag(tmp_path, capsys):
    rc = cli.main(["maxbatch", "--modes", "e2e", "--steps", "0", "--device", "cuda",
                   "--python", sys.executable, "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--steps must be an integer >= 1" in err and "--warmup" not in err, err
    assert not (tmp_path / "m").exists()  # refused before any probe ran


def test_maxbatch_refuses_cpu(tmp_path, capsys):
    rc = cli.main(["maxbatch", "--modes", "e2e", "--device", "cpu", "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()  # refused before any probe ran


def _untime(profile: dict) -> dict:
    """As a run without --profile-phases writes it: every window memory-only (the measured
    segment carries time and energy)."""
    profile["meta"]["profile_phases"] = False
    for w in profile["windows"].values():
        w.update(timed=False, time_s_total=None, time_s_mean=None, energy_j=None,
                 sampled_energy_j=None, mean_power_w=None, short_windows=0)
    return profile


def test_untimed_windows_are_na_not_timed(monkeypatch, tmp_path):
    runs = _runs(monkeypatch, tmp_path, modes=("e2e", "simultaneous"))
    for r in runs:
        _untime(r.profile)
    rep = write_report(runs, str(tmp_path / "rep"), command="test")
    md = open(tmp_path / "rep" / "report.md").read()
    assert "per-phase timing off" in md and "per-phase timing on" not in md.split("## Summary")[0]
    sim = next(r for r in rep["runs"] if r["mode"] == "simultaneous")
    assert sim["timing"].startswith("per-phase timing off")
    assert sim["metrics"]["throughput_img_s"] > 0  # the measured segment is timed
    for b in sim["per_block"]:
        assert b["peak_allocated_gib"] > 0  # memory still measured
        assert b["time_per_image_ms"] is None and b["energy_per_image_j"] is None
    assert all(v is None for v in sim["phases_ms_per_image"].values())
    assert "n/a (not timed)" in md
    # the windows tables hold only what was measured: count and peak memory, no time column
    windows = md.split("## Windows per run")[1].split("## Not measured")[0]
    assert windows.count("| window | count | peak allocated (GiB) |") == 2
    assert "mean (ms)" not in windows and "energy (J)" not in windows
    rows = [l for l in windows.splitlines() if l.startswith("| block1/forward |")]
    assert len(rows) == 2 and all(float(l.split("|")[3]) > 0 for l in rows)
    check_ratios(rep)


def test_timing_on_is_labelled(monkeypatch, tmp_path):
    runs = _runs(monkeypatch, tmp_path, modes=("e2e",), meta_extra={"profile_phases": True})
    rep = write_report(runs, str(tmp_path / "rep"), command="test")
    assert rep["header"]["timing"] == ("per-phase timing on: throughput includes one device "
                                       "sync per window")
    md = open(tmp_path / "rep" / "report.md").read()
    assert "per-phase timing on: throughput includes one device sync per window" in md
    assert "n/a (not timed)" not in md


def test_compare_baseline_without_memory_options(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--modes", "e2e,simultaneous", *TINY, "--out", str(out),
                   "--baseline-without", "activation-checkpointing", "--",
                   "--workers", "0", "--activation-checkpointing"])
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    labels = [r["label"] for r in rep["runs"]]
    assert labels == ["e2e (without --activation-checkpointing)", "e2e", "simultaneous"]
    assert rep["baseline"] == labels[0]
    configs = {r["label"]: json.load(open(os.path.join(r["run_dir"], "config.json")))
               for r in rep["runs"]}
    flags = {k: c.get("config", c)["activation_checkpointing"] for k, c in configs.items()}
    assert flags == {labels[0]: False, "e2e": True, "simultaneous": True}
    assert check_ratios(rep) > 0
    # beside the plain baseline, every run against e2e with the same options, from its own numbers
    assert rep["baseline_without"] == ["activation-checkpointing"]
    same = rep["tables"]["same_options"]
    assert [row["label"] for row in same["rows"]] == ["e2e", "simultaneous"]
    e2e_opts = rep["runs"][1]["metrics"]
    assert same["baseline"]["peak_allocated_gib"] == e2e_opts["peak_allocated_gib"]
    sim = rep["runs"][2]["metrics"]
    got = same["rows"][1]["cells"]["throughput_img_s_vs_e2e"]
    assert got == pytest.approx(sim["throughput_img_s"] / e2e_opts["throughput_img_s"])
    assert same["rows"][0]["cells"]["throughput_img_s_vs_e2e"] == pytest.approx(1.0)
    md = open(out / "report.md").read()
    assert "## Against e2e with the same options" in md
    assert "x e2e (same options)" in md
    # scripts/issue_bars.py reads that table from a real report (its own tests use a fixture)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    import issue_bars
    [line] = issue_bars._same_options_lines(rep, "[t]")
    ratio = sim["throughput_img_s"] / e2e_opts["throughput_img_s"]  # (no peak memory on CPU)
    assert line == ("BAR [t] (not a bar) simultaneous against e2e with the same options: "
                    f"throughput {ratio:.3f}x")
    # a flag that is not among the trainer flags: a clear error, nothing run
    bad = tmp_path / "bad"
    assert cli.main(["compare", "--modes", "e2e", *TINY, "--out", str(bad),
                     "--baseline-without", "split-views", "--", "--workers", "0"]) == 2
    assert "not among the trainer flags --split-views" in capsys.readouterr().err
    assert not bad.exists()


def test_baseline_flags_drops_switches_and_flags_with_values():
    from profiling.compare import baseline_flags
    extra = ["--activation-checkpointing", "--checkpoint-blocks", "1,2", "--split-views",
             "--noise-std", "0.25"]
    assert baseline_flags("activation-checkpointing,split-views,checkpoint-blocks", extra) == [
        "--noise-std", "0.25"]
    assert baseline_flags("checkpoint-blocks", ["--checkpoint-blocks=1", "--split-views"]) == [
        "--split-views"]
    # a switch followed by another flag keeps that flag
    assert baseline_flags("split-views", ["--split-views", "--expander", "0"]) == [
        "--expander", "0"]
    with pytest.raises(ValueError, match="not among the trainer flags --pool"):
        baseline_flags("pool", extra)


def test_md_table_ratio_of_a_missing_value_is_a_bare_na():
    from profiling.report import _md_table
    table = {"columns": [{"key": "t", "label": "time (ms)", "format": "{:.1f}"},
                         {"key": "t_vs_e2e", "label": "x e2e", "format": "{:.2f}x",
                          "ratio_of": "t"}],
             "rows": [{"label": "a", "cells": {"t": 2.0, "t_vs_e2e": None},
                       "na": {"t_vs_e2e": "baseline not timed"}},
                      {"label": "b", "cells": {"t": None, "t_vs_e2e": None},
                       "na": {"t": "not timed", "t_vs_e2e": "not timed"}}]}
    notes: list = []
    md = _md_table(table, notes)
    # the value's reason once; a ratio whose own value is there keeps its own reason
    assert "| b | n/a (not timed) | n/a |" in md
    assert "| a | 2.0 | n/a (" in md
    assert notes == ["baseline not timed", "not timed"]


@pytest.mark.parametrize("samples", [False, True])
def test_short_measured_run_never_reports_counter_zero(monkeypatch, tmp_path, samples):
    """A measured stretch shorter than the counter's 100 ms update reads 0 J from the counter:
    the report takes the power-sample integral when there is one, else n/a with the reason."""
    from fake_nvml import FakeClock, FakeCudaMemory, FakeGPU, FakeNVML

    from profiling.energy import EnergyMeter
    from profiling.memory import MemoryMeter
    from profiling.profiler import Profiler

    clock = FakeClock(1000.05)  # mid-way between two counter updates
    fake = FakeNVML([FakeGPU(clock, 300.0)])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    em = EnergyMeter([0], clock=clock, sample_interval_s=1.0 if samples else None, cpu=False,
                     sync=False)
    prof = Profiler("cpu", energy_meter=em, memory_meter=MemoryMeter(
        "cuda", backend=FakeCudaMemory(), nvml=False))
    with prof.measure():
        for _ in range(2):
            with prof.window("step", timed=False):
                if samples:
                    em.sample()
                clock.advance(0.03)
                if samples:
                    em.sample()
            prof.add_images(8)
    d = tmp_path / "run"
    prof.save(str(d / "profile.json"), meta={"mode": "e2e"})
    em.close()
    seg = json.load(open(d / "profile.json"))["run"]["segments"][0]
    assert seg["short"] and seg["energy_j"] == 0.0  # what the counter read: nothing
    rep = write_report([load_run_dir(str(d))], str(tmp_path / "rep"))
    cells = rep["tables"]["summary"]["rows"][0]["cells"]
    na = rep["tables"]["summary"]["rows"][0]["na"]
    if samples:  # 300 W for 60 ms over 16 images
        assert cells["energy_per_image_j"] == pytest.approx(300 * 0.06 / 16, rel=1e-6)
        assert cells["mean_power_w"] == pytest.approx(300.0, rel=1e-6)
        assert "power samples" in rep["runs"][0]["metrics"]["energy_method"]
    else:
        assert cells["energy_per_image_j"] is None and cells["mean_power_w"] is None
        assert "100 ms" in na["energy_per_image_j"]
        md = open(tmp_path / "rep" / "report.md").read()
        assert "0.000" not in md.split("## Summary")[1].split("##")[0]


# -- compare / maxbatch command lines: refusals, notices, help (no trainer process) ---------------
def _fake_launcher(monkeypatch, tmp_path, kernels_used=None):
    """compare's run_trainer replaced by one that writes a stand-in run directory at once:
    profile.json from a template of the mode, and (``kernels_used`` not None) a config.json as
    the trainer writes it on CPU. Returns the list of the commands it was given."""
    import profiling.compare

    templates = {}
    calls = []

    def fake(cmd, run_dir, log_path, timeout_s, label, mode, fused):
        calls.append(cmd)
        if mode not in templates:
            templates[mode] = make_profile(monkeypatch, str(tmp_path / "tpl" / mode /
                                                            "profile.json"), mode, gpu=False)
        os.makedirs(run_dir, exist_ok=True)
        with open(log_path, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        p = json.loads(json.dumps(templates[mode]))
        p["meta"].update(fused=bool(fused), device="cpu")
        json.dump(p, open(os.path.join(run_dir, "profile.json"), "w"))
        if kernels_used is not None:
            json.dump({"config": {"device": "cpu", "fused": bool(fused)},
                       "fused_kernels_used": kernels_used and bool(fused),
                       "loss_uses_kernel": kernels_used and bool(fused)},
                      open(os.path.join(run_dir, "config.json"), "w"))
        return RunResult(label, run_dir, p, mode=mode, fused=fused, exit_code=0, wall_s=0.01,
                         command=cmd)

    monkeypatch.setattr(profiling.compare, "run_trainer", fake)
    return calls


def test_compare_refuses_an_out_holding_a_report_unless_overwrite(monkeypatch, tmp_path, capsys):
    calls = _fake_launcher(monkeypatch, tmp_path)
    out = tmp_path / "cmp"
    base = ["compare", "--modes", "e2e,simultaneous", "--device", "cpu", "--out", str(out)]
    assert cli.main(base) == 0
    first = (out / "report.json").read_text()
    (out / "runs" / "stale-run").mkdir()  # e.g. left by an earlier --fused both
    n = len(calls)
    capsys.readouterr()
    assert cli.main(base) == 2  # refused: nothing run, nothing replaced
    err = capsys.readouterr().err
    assert "already holds a compare report (report.json, report.md, runs/)" in err, err
    assert "another --out" in err and "--overwrite" in err
    assert len(calls) == n and (out / "report.json").read_text() == first
    assert (out / "runs" / "stale-run").is_dir()
    for name in ("report.md", "runs"):  # any one of them is a report
        only = tmp_path / f"only-{name}"
        (only / name).mkdir(parents=True) if name == "runs" else \
            (only.mkdir(), (only / name).write_text("x"))
        assert cli.main(["compare", "--modes", "e2e", "--device", "cpu", "--out",
                         str(only)]) == 2
        assert f"({name}{'/' if name == 'runs' else ''})" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert cli.main(base + ["--overwrite"]) == 0  # replaces the report, and only it
    assert len(calls) == n + 2
    assert not (out / "runs" / "stale-run").exists() and (out / "notes.txt").exists()
    assert "--overwrite" in json.load(open(out / "report.json"))["command"]
    # an --out that is a file: exit 2, one line
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["compare", "--device", "cpu", "--out", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet34"], "unknown --arch 'resnet34'; valid: resnet18, resnet50"),
    (["--device", "gpu"], "unknown --device 'gpu'; valid: auto, cuda, cpu"),
    (["--device", "cuda"], "--device cuda, but CUDA is not available here; valid: cpu, auto"),
    (["--projector", "64-x"], "--projector '64-x': expected widths"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32)"),
    (["--image-size", "4"], "--image-size must be an integer >= 8"),
])
def test_compare_checks_settings_before_any_run(monkeypatch, tmp_path, capsys, flags, message):
    calls = _fake_launcher(monkeypatch, tmp_path)
    _fake_cuda(monkeypatch, available=False)
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--modes", "e2e", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert calls == [] and not out.exists()  # nothing started, nothing written


@pytest.mark.skipif(not HAS_TRAINER, reason="blockwise not there")
def test_compare_valid_names_are_the_trainers():
    """compare checks --arch / --device / --modes against copies (profiling never imports
    blockwise): they must stay the trainer's own."""
    from blockwise import config, models
    from profiling import compare

    assert set(compare.ARCHS) == set(models.ARCHS)
    assert tuple(compare.DEVICES) == tuple(config.DEVICES)
    assert tuple(compare.MODES) == tuple(config.MODES)


@pytest.mark.parametrize("device, has_cuda, note", [
    ("cpu", True, "note: --device cpu: the trainer runs use the CPU"),
    (None, False, "note: no CUDA device here: the trainer runs use the CPU"),
    (None, True, None),
])
def test_compare_says_when_it_runs_on_cpu(monkeypatch, tmp_path, capsys, device, has_cuda, note):
    _fake_launcher(monkeypatch, tmp_path)
    _fake_cuda(monkeypatch, available=has_cuda)
    args = ["compare", "--modes", "e2e", "--out", str(tmp_path / "cmp")]
    assert cli.main(args + (["--device", device] if device else [])) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    if note is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(note), lines
        assert "memory and energy will be n/a" in lines[0]
        assert "ResNet-50 at 224 px, batch 256" in lines[0] and "slow on a CPU" in lines[0]
    if has_cuda:
        return
    small = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--overwrite"]
    assert cli.main(args + small) == 0  # already the suggested settings: no suggestion
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert len(lines) == 1 and "memory and energy will be n/a" in lines[0]
    assert "slow on a CPU" not in lines[0], lines[0]


def test_compare_report_says_whether_the_triton_kernels_ran(monkeypatch, tmp_path, capsys):
    """--fused on a machine without CUDA: the trainer falls back to the PyTorch references
    (config.json fused_kernels_used false); the report must not label the runs fused."""
    _fake_launcher(monkeypatch, tmp_path, kernels_used=False)
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--modes", "e2e,simultaneous", "--fused", "on", "--device", "cpu",
                     "--out", str(out)]) == 0
    said = "requested; Triton kernels not used (no CUDA): PyTorch references measured"
    assert f"note: --fused on: {said}" in capsys.readouterr().out
    rep = json.load(open(out / "report.json"))
    assert rep["header"]["settings"]["fused"] == said
    assert rep["header"]["fused_kernels"] == {"requested": "on", "summary": said, "used": []}
    assert [(r["fused_kernels_used"], r["loss_uses_kernel"]) for r in rep["runs"]] == \
        [(False, False)] * 2
    md = open(out / "report.md").read()
    assert f"fused {said};" in md and "fused True" not in md
    # both: the unfused runs are "off", the fused ones say what ran
    out2 = tmp_path / "both"
    assert cli.main(["compare", "--modes", "e2e", "--fused", "both", "--device", "cpu",
                     "--out", str(out2)]) == 0
    h = json.load(open(out2 / "report.json"))["header"]
    assert h["settings_per_run"]["fused"] == ["off", said]
    assert "fused: off, " + said in open(out2 / "report.md").read()
    # on a GPU the kernels ran: the report says so
    _fake_launcher(monkeypatch, tmp_path, kernels_used=True)
    out3 = tmp_path / "gpu"
    assert cli.main(["compare", "--modes", "e2e", "--fused", "--device", "cpu",
                     "--out", str(out3)]) == 0
    rep = json.load(open(out3 / "report.json"))
    assert rep["header"]["settings"]["fused"] == "requested; Triton kernels used"
    assert rep["runs"][0]["fused_kernels_used"] is True


FAILING_TRAINER = """#!{python}
import sys
print("loading ...")
print("error: --device cuda, but CUDA is not available here; valid: cpu, auto", file=sys.stderr)
sys.exit(2)
"""


def test_maxbatch_probe_failure_gives_reason_and_log(monkeypatch, tmp_path, capsys):
    """A probe that fails (not OOM): the console line names the reason and the log; the
    markdown keeps the whole reason (in a note) and never says 'none failed'."""
    _fake_cuda(monkeypatch)
    fake = tmp_path / "fake_python"
    fake.write_text(FAILING_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / ("a-rather-long-directory-name-" * 3) / "mb"
    assert cli.main(["maxbatch", "--modes", "e2e", "--device", "cuda", "--python", str(fake),
                     "--out", str(out)]) == 1
    log = str(out / "probes" / "e2e-b256.log")
    reason = "exit code 2: error: --device cuda, but CUDA is not available here; valid: cpu, auto"
    console = capsys.readouterr().out
    assert f"e2e batch 256: failed (0 s): {reason}; log {log}" in console, console
    rep = json.load(open(out / "maxbatch.json"))
    assert rep["modes"][0]["error"] == f"e2e at batch 256 failed (not OOM): {reason}; log {log}"
    assert rep["modes"][0]["probes"][0]["log"] == log
    md = open(out / "maxbatch.md").read()
    assert "none failed" not in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| e2e |"))
    assert "n/a (probe failed, not OOM: note 1)" in row and "no OOM seen" in row
    assert f"1. e2e at batch 256 failed (not OOM): {reason}; log {log}" in md


def test_maxbatch_checks_settings_before_any_probe(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "fake_python"
    fake.write_text(FAILING_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "mb"
    _fake_cuda(monkeypatch, available=False)
    for device in ("cuda", "auto", None):
        assert cli.main(["maxbatch", "--modes", "e2e", "--python", str(fake), "--out", str(out)]
                        + (["--device", device] if device else [])) == 2
        err = capsys.readouterr().err
        assert "needs a CUDA device; none is available here" in err, err
    _fake_cuda(monkeypatch)
    for flags, message in ((["--device", "gpu"], "unknown --device 'gpu'; valid: auto, cuda"),
                           (["--arch", "resnet34"], "valid: resnet18, resnet50"),
                           (["--granularity", "0"], "granularity must be a positive integer")):
        assert cli.main(["maxbatch", "--modes", "e2e", "--python", str(fake), "--out", str(out),
                         *flags]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # refused before any probe ran


def test_compare_and_maxbatch_help_show_defaults():
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, __import__("argparse")._SubParsersAction))
    for name in ("compare", "maxbatch"):
        p = sub.choices[name]
        text = " ".join(p.format_help().split())  # (argparse wraps lines)
        assert "(default: e2e,simultaneous,sequential)" in text
        assert "(default: resnet50)" in text and "(default: 224)" in text, text
        undocumented = [a.option_strings for a in p._actions if a.option_strings and not a.help]
        assert undocumented == [], (name, undocumented)
    assert "(default: 256)" in sub.choices["compare"].format_help()
    assert "--overwrite" in sub.choices["compare"].format_help()
