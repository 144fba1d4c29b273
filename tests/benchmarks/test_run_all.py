"""``benchmarks/run_all.py``: runs what exists, reports a missing or failing benchmark clearly,
and writes one JSON report with the machine described."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import run_all  # noqa: E402


def test_missing_failing_and_ok(tmp_path, monkeypatch, capsys):
    ok = tmp_path / "ok_bench.py"
    ok.write_text("import sys; print('fine', sys.argv[1:])\n")
    bad = tmp_path / "bad_bench.py"
    bad.write_text("raise SystemExit('broken on purpose')\n")
    monkeypatch.setattr(run_all, "BENCHMARKS", {
        "ok": (str(ok), [], ["--quick"]),
        "gone": (str(tmp_path / "not_there.py"), [], []),
        "bad": (str(bad), [], []),
    })
    rc = run_all.main(["--quick", "--results-dir", str(tmp_path / "res")])
    assert rc == 1  # a benchmark that exists failed
    report = json.loads((tmp_path / "res" / "run_all_quick.json").read_text())
    b = report["benchmarks"]
    assert b["ok"]["status"] == "ok" and "fine ['--quick']" in b["ok"]["output_tail"]
    assert b["gone"]["status"] == "missing" and "not_there.py not found" in b["gone"]["reason"]
    assert b["bad"]["status"] == "failed" and "broken on purpose" in b["bad"]["error_tail"]
    assert report["machine"]["cpu_count"] >= 1 and "backend" in report["machine"]
    out = capsys.readouterr().out
    assert "[gone] MISSING" in out and "[bad] FAILED" in out


def test_only_missing_is_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "BENCHMARKS", {"gone": (str(tmp_path / "nope.py"), [], [])})
    assert run_all.main(["--quick", "--results-dir", str(tmp_path)]) == 0


def test_real_quick_run_ops_and_torch_comparison_without_torch(tmp_path):
    # an interpreter without torch: the comparison must say so instead of failing
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\n"
                        "exit 1\n")
    no_torch.chmod(0o755)
    rc = run_all.main(["--quick", "--only", "ops_overhead", "torch_comparison",
                       "--torch-python", str(no_torch), "--results-dir", str(tmp_path)])
    report = json.loads((tmp_path / "run_all_quick.json").read_text())
    ops = report["benchmarks"]["ops_overhead"]
    assert rc == 0 and ops["status"] == "ok" and "ratio unit-scaled / plain" in ops["output_tail"]
    tc = report["benchmarks"]["torch_comparison"]
    assert tc["status"] == "ok" and "torch comparison not run" in tc["output_tail"]
    assert "cannot import torch and unit_scaling" in tc["output_tail"]
