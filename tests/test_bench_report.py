"""``python -m profiling bench``: pytest-benchmark JSON rendered as tables with ratios."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import conftest
from profiling import bench
from profiling.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BT = os.path.join(ROOT, "docs", "reports", "h100_bt_bench.json")


def _table(text: str, group: str):
    """{provider: [cells]} of the table under '## group'."""
    lines = text.splitlines()
    i = lines.index(f"## {group}")
    rows = {}
    for line in lines[i + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| provider"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_h100_file_ratios_recomputed():
    data = bench.load(H100_BT)
    text = bench.render(data, H100_BT, baseline="torch_compile")
    stats = {(b["extra_info"]["n"], b["extra_info"]["provider"]): b for b in data["benchmarks"]}
    for n in (256, 1024, 2048):
        rows = _table(text, f"barlow_twins fwd+bwd bf16 N={n} D=8192")
        assert set(rows) == {"fused_auto", "fused_gram", "torch", "torch_compile"}
        base = stats[(n, "torch_compile")]
        for prov, cells in rows.items():
            b = stats[(n, prov)]
            speed = base["stats"]["median"] / b["stats"]["median"]
            peak = b["extra_info"]["peak_extra_mib"] / base["extra_info"]["peak_extra_mib"]
            assert float(cells[2]) == pytest.approx(speed, rel=0.006)
            assert float(cells[3]) == pytest.approx(b["extra_info"]["peak_extra_mib"], abs=0.06)
            assert float(cells[4]) == pytest.approx(peak, rel=0.006)
            assert cells[0].startswith(bench._ms(b["stats"]["median"] * 1e3))
            assert cells[1] == str(b["stats"]["rounds"])
        assert rows["torch_compile"][2] == "1.00" and rows["torch_compile"][4] == "1.00"


def test_missing_figures_are_na_not_zero(tmp_path):
    data = bench.load(H100_BT)
    for b in data["benchmarks"]:
        if b["extra_info"]["n"] == 1024:
            b["extra_info"].pop("peak_extra_mib")
            b["extra_info"].pop("floor_ms")
    data["benchmarks"] = [b for b in data["benchmarks"]
                          if not (b["extra_info"]["n"] == 2048
                                  and b["extra_info"]["provider"] == "torch_compile")]
    text = bench.render(data, "x.json", baseline="torch_compile")
    rows = _table(text, "barlow_twins fwd+bwd bf16 N=1024 D=8192")
    assert rows["fused_auto"][3] == "n/a (not recorded)"
    assert rows["fused_auto"][5] == "n/a (no floor recorded)"
    rows = _table(text, "barlow_twins fwd+bwd bf16 N=2048 D=8192")
    assert rows["fused_auto"][2] == "n/a (no torch_compile here)"
    assert " 0.00 " not in text and "| 0 |" not in text
    # without a baseline there are no ratio columns
    rows = _table(bench.render(data, "x.json"), "barlow_twins fwd+bwd bf16 N=256 D=8192")
    assert len(rows["fused_auto"]) == 4


def test_bad_input_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="valid: fused_auto, fused_gram, torch, torch_compile"):
        bench.render(bench.load(H100_BT), H100_BT, baseline="compiled")
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(ValueError, match="is not JSON"):
        bench.load(str(junk))
    junk.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="no 'benchmarks' list"):
        bench.load(str(junk))
    for bad in ([1], [{"name": "t", "stats": [0.1]}], [{"name": "t", "extra_info": "x"}]):
        junk.write_text(json.dumps({"benchmarks": bad}))
        with pytest.raises(ValueError, match=r"benchmarks\[0\] is not a benchmark record"):
            bench.load(str(junk))
        assert main(["bench", str(junk)]) == 2
    assert "not a benchmark record" in capsys.readouterr().err
    # a path through a file (NotADirectoryError): a message, not a traceback
    assert main(["bench", H100_BT, "--out", str(junk / "bt.md")]) == 2
    assert "error:" in capsys.readouterr().err
    untimed = tmp_path / "untimed.json"
    untimed.write_text(json.dumps({"benchmarks": [{"name": "t", "group": None, "stats": None}]}))
    with pytest.raises(ValueError, match="no timed benchmark"):
        bench.render(bench.load(str(untimed)), str(untimed))
    assert main(["bench", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", H100_BT, "--baseline", "nope"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", H100_BT, "--unknown-flag"])
    assert e.value.code == 2


def test_cli_writes_out_atomically(tmp_path, capsys):
    out = tmp_path / "bt.md"
    assert main(["bench", H100_BT, "--baseline", "torch_compile", "--out", str(out),
                 "--title", "BT loss, H100"]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert printed.startswith("# BT loss, H100")
    assert [p for p in os.listdir(tmp_path) if p != "bt.md"] == []  # no temporary left behind


def test_machine_info_hook_names_versions():
    info = {}
    conftest.pytest_benchmark_update_machine_info(None, info)
    import torch
    import triton
    assert info["torch"] == torch.__version__ and info["triton"] == triton.__version__
    assert ("cuda_device" in info) == torch.cuda.is_available()


def test_real_pytest_benchmark_file(tmp_path):
    """A file written by pytest-benchmark itself (a CPU benchmark in a scratch directory)."""
    (tmp_path / "test_b.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("provider", ["slow", "fast"])
        def test_b(benchmark, provider):
            benchmark.group = "sum of a range"
            benchmark.extra_info.update(provider=provider, peak_extra_mib=1.0 + (provider == "slow"))
            n = 20000 if provider == "slow" else 2000
            benchmark.pedantic(lambda: sum(range(n)), rounds=5, iterations=1)
    """))
    path = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(tmp_path / "test_b.py"), "--benchmark-only",
                        f"--benchmark-json={path}", "--rootdir", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    data = bench.load(str(path))
    rows = _table(bench.render(data, str(path), baseline="slow"), "sum of a range")
    med = {b["extra_info"]["provider"]: b["stats"]["median"] for b in data["benchmarks"]}
    assert set(rows) == {"slow", "fast"}
    assert float(rows["fast"][2]) == pytest.approx(med["slow"] / med["fast"], rel=0.006)
    assert rows["slow"][2] == "1.00" and rows["fast"][4] == "0.500"
    assert rows["fast"][5] == "n/a (no floor recorded)"


def _bench(group, provider, median_s, **extra):
    return {"group": group, "name": f"t[{provider}]", "params": {"x": 1}, "param": provider,
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 10},
            "extra_info": dict(provider=provider, **extra)}


def test_train_step_fields_energy_and_whole_peak():
    """Training-step benchmarks record the whole peak in GiB and energy per pair."""
    g = "train step"
    data = {"benchmarks": [
        _bench(g, "e2e", 0.100, peak_allocated_gib=20.0, energy_per_image_j=2.0),
        _bench(g, "simultaneous", 0.250, peak_allocated_gib=10.0, energy_per_image_j=5.0),
        _bench(g, "sequential-block1", 0.050, peak_allocated_gib=5.0, energy_per_image_j=None)]}
    rows = _table(bench.render(data, "ts.json", baseline="e2e"), g)
    # provider, median, rounds, x faster, peak MiB, peak ratio, x floor, J/pair, J ratio
    assert rows["simultaneous"][2] == "0.400" and rows["sequential-block1"][2] == "2.00"
    assert rows["simultaneous"][3] == "10240.0" and rows["simultaneous"][4] == "0.500"
    assert rows["simultaneous"][6] == "5.00" and rows["simultaneous"][7] == "2.50"
    assert rows["sequential-block1"][6] == "n/a (not measured)"
    assert rows["sequential-block1"][7] == "n/a (not measured)"
    # no energy anywhere in a group: no energy columns
    for b in data["benchmarks"]:
        b["extra_info"].pop("energy_per_image_j")
    rows = _table(bench.render(data, "ts.json", baseline="e2e"), g)
    assert len(rows["e2e"]) == 6


def test_cpu_train_step_file_says_why_peak_is_missing():
    """A CPU run of the train-step benchmark: no GPU, and the peak's reason, not a bare n/a."""
    g = "train step (CPU)"
    why = "CPU run: peak memory is measured on CUDA only"
    data = {"machine_info": {"device": "cpu", "torch": "2.x"}, "benchmarks": [
        _bench(g, "e2e", 0.8, peak_allocated_gib=None, peak_unavailable=why),
        _bench(g, "simultaneous", 0.4, peak_allocated_gib=None, peak_unavailable=why)]}
    md = bench.render(data, "ts.json", baseline="e2e")
    assert "device: no GPU (CPU run)" in md
    rows = _table(md, g)
    assert rows["simultaneous"][2] == "2.00"
    assert rows["simultaneous"][3] == f"n/a ({why})" == rows["simultaneous"][4]
    # no J/pair column here, so the legend does not describe one
    assert "J/pair" not in md and "no benchmark in this file measured energy" in md
