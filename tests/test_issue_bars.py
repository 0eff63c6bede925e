"""scripts/issue_bars.py: verdict lines for the issues' GPU bars, from report and benchmark files."""
import copy
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import issue_bars  # noqa: E402
from profiling import bench  # noqa: E402

H100_BT = os.path.join(ROOT, "docs", "reports", "h100_bt_bench.json")


def test_bt_bars_from_the_h100_file():
    data = bench.load(H100_BT)
    lines = issue_bars.bt_bars(data, H100_BT)
    med = {(b["extra_info"]["n"], b["extra_info"]["provider"]): b for b in data["benchmarks"]}
    for n, bar in ((256, 10), (2048, 2)):
        ratio = med[(n, "torch_compile")]["stats"]["median"] / med[(n, "fused_auto")]["stats"]["median"]
        line = next(x for x in lines if x.startswith(f"BAR issue 3: N={n} fused_auto {ratio:.2f}x"))
        assert line.endswith("PASS" if ratio >= bar else "MISS")
    mem = [x for x in lines if "peak" in x]
    assert len(mem) == 3 and all(x.endswith("PASS") for x in mem)  # 0.042 / 0.165 / 0.235
    assert issue_bars.bt_floor(data) == []  # that file predates the provider
    # a host floor above a tenth of compile's time says the 10x line is out of reach
    data2 = copy.deepcopy(data)
    floor = copy.deepcopy(med[(256, "torch")])
    floor["extra_info"]["provider"] = "host_floor"
    floor["stats"]["median"] = 0.3e-3
    data2["benchmarks"].append(floor)
    [line] = issue_bars.bt_floor(data2)
    assert "out of reach" in line and "0.300 ms" in line
    assert not any("host floor" in x for x in issue_bars.bt_bars(data2, "x"))


def _report(settings_over=None, gpu="NVIDIA H100 80GB HBM3"):
    settings = dict(issue_bars.ISSUE4_SETTINGS, fused=True)
    settings.update(settings_over or {})
    runs = [dict(label="e2e (without --split-views)", mode="e2e", fused=True),
            dict(label="e2e", mode="e2e", fused=True),
            dict(label="simultaneous", mode="simultaneous", fused=True),
            dict(label="sequential", mode="sequential", fused=False)]
    cells = {"e2e (without --split-views)": (1.0, 1.0), "e2e": (0.6, 0.8),
             "simultaneous": (0.47, 0.5), "sequential": (0.31, 0.4)}
    # the report labels sequential's row with how it sums the blocks (profiling/report.py)
    shown = {"sequential": "sequential (all 4 blocks, one pass each)"}
    rows = [dict(label=shown.get(k, k),
                 cells=dict(peak_allocated_gib_vs_e2e=p, throughput_img_s_vs_e2e=t))
            for k, (p, t) in cells.items()]
    # compare --baseline-without: the same runs but the baseline against e2e with the options
    same = [dict(label=shown.get(k, k),
                 cells=dict(peak_allocated_gib_vs_e2e=p / 0.6, throughput_img_s_vs_e2e=t / 0.8))
            for k, (p, t) in cells.items() if k != "e2e (without --split-views)"]
    return dict(header=dict(settings=settings, gpu=gpu), runs=runs,
                baseline="e2e (without --split-views)",
                tables=dict(summary=dict(rows=rows), same_options=dict(rows=same)))


def test_compare_bars_verdicts():
    lines = issue_bars.compare_bars(_report(), "/x/cmp/report.json")
    text = "\n".join(lines)
    assert "simultaneous peak memory 0.470x e2e (without --split-views) (<= 0.5): PASS" in text
    assert "sequential peak memory 0.310x e2e (without --split-views) (<= 0.3): MISS" in text
    assert "simultaneous throughput 0.500x e2e (without --split-views) (>= 0.95): MISS" in text
    assert lines[0].startswith("BAR [cmp] baseline: e2e (without --split-views)")
    # against e2e with the same options (0.6x memory, 0.8x throughput of plain e2e): read out,
    # not judged
    assert ("BAR [cmp] (not a bar) simultaneous against e2e with the same options: "
            "peak memory 0.783x, throughput 0.625x") in text
    assert "(not a bar) sequential against e2e with the same options: peak memory 0.517x" in text
    # a report without that table (no --baseline-without): no such lines
    rep = _report()
    del rep["tables"]["same_options"]
    assert not any("not a bar" in x for x in issue_bars.compare_bars(rep, "r.json"))
    # a run that was not fused is not judged on the throughput bar
    rep = _report()
    rep["runs"][2]["fused"] = False
    assert any("n/a (the bar is with --fused" in x for x in issue_bars.compare_bars(rep, "r.json"))
    # rows and runs that do not pair up: an error, not a verdict on the wrong row
    rep = _report()
    rep["tables"]["summary"]["rows"].pop()
    with pytest.raises(ValueError, match="3 summary rows for 4 runs"):
        issue_bars.compare_bars(rep, "r.json")
    # missing figure: n/a, not a verdict
    rep = _report()
    rep["tables"]["summary"]["rows"][2]["cells"]["peak_allocated_gib_vs_e2e"] = None
    assert any("simultaneous peak memory: n/a (not measured" in x
               for x in issue_bars.compare_bars(rep, "r.json"))


def test_compare_bars_refuses_other_settings():
    lines = issue_bars.compare_bars(_report({"batch_size": 8}, gpu=None), "r.json")
    assert len(lines) == 2 and "not the bar's settings" in lines[1]
    assert "batch_size 8 (bar: 256)" in lines[1] and "no GPU" in lines[1]
    assert not any(x.endswith(("PASS", "MISS")) for x in lines)


def test_bars_are_on_an_h100_only():
    """A device call may be given an H200 when no H100 is free: its figures are not the bars'."""
    lines = issue_bars.compare_bars(_report(gpu="NVIDIA H200"), "r.json")
    assert "GPU NVIDIA H200 (bar: an H100)" in lines[1]
    assert not any(x.endswith(("PASS", "MISS")) for x in lines)
    data = bench.load(H100_BT)
    data["machine_info"]["cuda_device"] = "NVIDIA H200"
    [line] = issue_bars.bt_bars(data, "bt.json")
    assert "n/a (measured on NVIDIA H200; the bar is on an H100)" in line
    data["machine_info"]["cuda_device"] = "NVIDIA H100 80GB HBM3"
    assert sum(x.endswith(("PASS", "MISS")) for x in issue_bars.bt_bars(data, "bt.json")) == 5


def test_memory_bars_need_a_plain_e2e_baseline():
    """A report whose baseline e2e ran with a memory option (compare without --baseline-without,
    or compare_store's --no-expander-recompute) is not judged against the bars."""
    for flags in (["--split-views"], ["--activation-checkpointing", "--checkpoint-blocks=1"],
                  ["--no-expander-recompute"]):
        rep = _report()
        rep["runs"][0]["command"] = ["python", "-m", "blockwise.train", "--mode", "e2e"] + flags
        lines = issue_bars.compare_bars(rep, "r.json")
        assert "is not plain e2e (it ran with" in lines[1] and flags[0] in lines[1], lines
        assert not any(x.endswith(("PASS", "MISS")) for x in lines)
    rep = _report()
    rep["runs"][0]["command"] = ["python", "-m", "blockwise.train", "--mode", "e2e", "--fused"]
    assert any(x.endswith("PASS") for x in issue_bars.compare_bars(rep, "r.json"))


def test_cli(tmp_path, capsys):
    path = tmp_path / "cmp" / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_report()))
    assert issue_bars.main(["--compare", str(path), "--bt-bench", H100_BT]) == 0
    out = capsys.readouterr().out
    assert out.count("BAR issue 3") == 5 and out.count("BAR [cmp] issue 4") == 3
    # the graphed op's lines come too when the file has it
    data = bench.load(H100_BT)
    for b in [b for b in data["benchmarks"] if b["extra_info"]["provider"] == "fused_gram"]:
        b["extra_info"]["provider"] = "fused_graph"
    g = tmp_path / "bt.json"
    g.write_text(json.dumps(data))
    assert issue_bars.main(["--bt-bench", str(g)]) == 0
    out = capsys.readouterr().out
    assert out.count("fused_graph") == 5 and out.count("fused_auto") == 5
    # with compile's graphed mode in the file, the like-for-like ratio is printed (not a bar)
    for b in [b for b in data["benchmarks"] if b["extra_info"]["provider"] == "torch"]:
        b["extra_info"]["provider"] = "torch_compile_graphs"
    g.write_text(json.dumps(data))
    assert issue_bars.main(["--bt-bench", str(g)]) == 0
    like = [x for x in capsys.readouterr().out.splitlines() if "torch_compile_graphs" in x]
    assert len(like) == 3 and all(x.endswith("not a bar)") for x in like)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert issue_bars.main(["--compare", str(bad)]) == 2
    bad.write_text("{}")
    assert issue_bars.main(["--compare", str(bad)]) == 2
    assert "not a compare report.json" in capsys.readouterr().err
