"""scripts/gpu_session.sh, the one-call GPU measurement script, dry-run on the CPU.

A device call is scarce (30 minutes a session, sometimes one call): a part broken by a CLI
change must fail here, not there. The script's own CPU dry-run settings (its header) run one
compare part end to end; every part name it accepts has a branch; a typo in PARTS costs nothing.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _run(tmp_path, parts, timeout=600):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               ARCH="resnet18", IMG="16", BATCH="8", PROJ="32-32", DEVICE="cpu", STEPS="2",
               WARMUP="1", EPOCHS="1", PARTS=parts)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_valid_part_has_a_branch():
    text = SCRIPT.read_text()
    valid = re.search(r'VALID="([^"]*)"', text).group(1).split()
    branches = set(re.findall(r"^\s{8}([a-z0-9_]+)\)\s*$", text, re.M))
    assert valid and set(valid) == branches, (set(valid) ^ branches)


def test_unknown_part_fails_before_anything_runs(tmp_path):
    p = _run(tmp_path, "compare_default compare_defualt", timeout=60)
    assert p.returncode == 2
    assert "unknown part 'compare_defualt'" in p.stderr
    assert not (tmp_path / "work").exists()


def test_cpu_dry_run_of_a_compare_part(tmp_path):
    p = _run(tmp_path, "compare_noexp")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "-- compare_noexp: exit 0" in summary, summary
    assert (tmp_path / "work" / "compare_noexp" / "report.md").exists()
    # issue_bars.py read the report and said why it is not the bar's run
    assert "BAR [compare_noexp] n/a: not the bar's settings" in summary
    assert (tmp_path / "out" / "session.tar.gz").stat().st_size > 0


def test_compare_guards_cover_fresh_process_startup():
    """Each compare run is a fresh trainer process: 30-47 s wall each on the H100 in the fifth
    session (3 runs in 135 s at 10 steps; 20 steps add ~5 s a run). A guard under 50 s a run
    stops the part before compare writes its report, and nothing of it comes back."""
    text = SCRIPT.read_text()
    found = re.findall(r'guard (compare_\w+) (\d+) "\$\{COMPARE\[@\]\}"(.*?);;', text, re.S)
    assert len(found) == 8, found
    for name, guard, rest in found:
        runs = 3 + ("--baseline-without" in rest)  # the modes, and plain e2e first
        assert int(guard) >= 50 * runs, (name, guard, runs)


def test_compare_parts_replace_an_earlier_report_in_work():
    """compare refuses an --out that holds a report unless --overwrite: a part run again into
    a $WORK that survived on a warm machine, or that SEED filled, must replace it, not exit 2."""
    text = SCRIPT.read_text()
    compare = re.search(r"^COMPARE=\((.*?)\)$", text, re.M | re.S).group(1).split()
    assert "--overwrite" in compare, compare


def test_independent_reads_compare_noexp_and_maxbatch_runs_per_mode(tmp_path):
    """The planned first call runs compare_noexp, not compare_default: a later call's
    independent check must read it rather than skip issue 5's bar. maxbatch writes its report
    only at its end: one process per mode, so a guard that stops one mode keeps the others."""
    work = tmp_path / "work" / "compare_noexp"
    work.mkdir(parents=True)
    (work / "report.json").write_text("{}")
    p = _run(tmp_path, "independent maxbatch", timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "== independent (guard" in summary and "independent: skipped" not in summary, summary
    for m in ("e2e", "simultaneous", "sequential"):
        assert f"== maxbatch_{m} (guard" in summary, summary  # (CPU: exit 2, needs CUDA)
    assert p.returncode == 0


# (scripts/gpu_profile_smi.py is a module without a command line: gpu_profile_independent.py
# imports it)
SCRIPTS = ["scripts/gpu_profile_independent.py", "scripts/gpu_profile_energy.py",
           "scripts/issue_bars.py", "scripts/learning_summary.py",
           "tests/benchmarks/sweep_sqrt_pool.py"]


def test_gpu_scripts_import_and_parse_their_arguments():
    """The Python parts of a device call at least import and print their usage on the CPU."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for script in SCRIPTS:
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "usage" in p.stdout.lower(), (script, p.stderr[-2000:])
