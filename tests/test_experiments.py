"""experiments/: one primary config per question, run with `hvbench -cn NAME -m`; each composes
with its own sweep, and `make results` regenerates docs/results.md from their MLflow runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.cli import UsageError, register_plugins, validate
from orchestrator.results import EXPERIMENTS

from conftest import HVBENCH, REPO

NAMES = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def plugins():
    register_plugins()


@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_says_its_question_and_builds_every_job(name):
    header = (REPO / "experiments" / f"{name}.yaml").read_text()
    if name != "rt_partition_8192":  # the benchmarks' scale bar, not a question of the thread
        assert "# Question" in header and "# Swept:" in header and "# Settles it:" in header
    assert f"hvbench -cn {name} -m" in header
    assert validate(["-cn", name, "-m"]) > 1


def test_an_experiments_sweep_is_its_own_and_the_command_line_narrows_it():
    assert validate(["-cn", "vitaly_rt_ipis", "-m"]) == 4 * 9  # hosts x bare-metal strategies
    assert validate(["-cn", "vitaly_rt_ipis", "-m", "host=x64"]) == 9
    assert validate(["-cn", "vitaly_rt_ipis", "-m", "host=x64,x384", "strategy=upstream"]) == 2
    assert validate(["-cn", "vitaly_rt_ipis"]) == 1  # without -m: the experiment's base job only
    with pytest.raises(UsageError, match="strategy=nope: unknown strategy"):
        validate(["-cn", "vitaly_rt_ipis", "-m", "strategy=upstream,nope"])


def test_results_cover_every_question():
    assert {e.name for e in EXPERIMENTS} == set(NAMES) - {"rt_partition_8192"}


def test_unknown_experiment_is_one_line_exit_2(tmp_path):
    out = subprocess.run([HVBENCH, "-cn", "nope", "-m"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"hvbench: error: -cn nope: unknown experiment; allowed: {', '.join(NAMES)}"]


@pytest.mark.slow
def test_make_results_quick_regenerates_the_document_from_mlflow(tmp_path):
    """Every experiment's sweep runs (tiny), each becomes an MLflow parent run with children,
    and the document is written from them: every section, its figures, its commands."""
    doc = tmp_path / "results.md"
    cmd = [sys.executable, "-m", "orchestrator.results", "--quick", "--work", str(tmp_path / "work"), "--out", str(doc), "--cpus", "2"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    text = doc.read_text()
    for e in EXPERIMENTS:
        assert f"`hvbench -cn {e.name} -m" in text, e.name
    figures = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert len(figures) >= 7 and all(f"(results/{f})" in text for f in figures)
    assert "| E per_root_cpumask |" in text and "Exhaustive search" in text
    again = subprocess.run([*cmd, "--no-run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert doc.read_text() == text, "--no-run rewrites the same document from the store"
