"""The benchmark scripts keep working: each answers --help as a script and as a module; train_memory runs quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text())


@pytest.mark.parametrize("form", ["script", "module"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_bench_script_answers_help(script: str, form: str) -> None:
    """README runs them both ways: `python bench/X.py` (bench/ first on sys.path) and `python -m bench.X`."""
    target = [str(ROOT / "bench" / f"{script}.py")] if form == "script" else ["-m", f"bench.{script}"]
    done = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_train_memory_runs_as_a_script_beside_bench_registry(tmp_path: Path, tiny_base: Path) -> None:
    """`python bench/train_memory.py` puts bench/ on sys.path, where bench/registry.py would shadow the package."""
    out = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "bench" / "train_memory.py"), "--quick", "--base", str(tiny_base),
               "--methods", "full,lora", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["settings"] == {"steps": 3, "batch_size": 2, "seq_len": 64}
    assert [r["method"] for r in results["results"]] == ["full", "lora"]
    assert "peak / full" in done.stdout


def test_registry_bench_runs_tiny_as_a_script(tmp_path: Path) -> None:
    """`python bench/registry.py --quick`: the scale table at two sizes with each ratio, and the push table."""
    out = tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "bench" / "registry.py"), "--quick", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert set(figures["scale"]) == {"10", "20"}
    assert set(figures["scale"]["20"]) == {
        "first_push_s", "first_push_mb", "clone_s", "pull_one_s", "log_first_s", "log_s", "list_s", "status_s"
    }  # fmt: skip
    assert "| 20 / 10 |" in done.stdout
    assert figures["versions_first_push"] == 2
