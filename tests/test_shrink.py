"""Minimal counter-examples (hvmodel.shrink, hvbench-shrink, and the counter-example every UNSAFE
job logs): short, still stale under the strategy, deterministic, replayable, and honest about
which strategies stay clean on them."""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hvmodel.engine import simulate
from hvmodel.fast.engine import FastEngine
from hvmodel.shrink import ddmin, renumber, shrink, walkthrough
from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.per_root_cpumask_clear import PerRootCpumaskClear
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import Trace, TraceError, load_text
from orchestrator import counterexample
from orchestrator.main import run
from orchestrator.scenario import build_scenario

from conftest import HVBENCH, compose_cfg

SHRINK = str(Path(sys.executable).parent / "hvbench-shrink")


@pytest.fixture(scope="module")
def overcommit_e(tmp_path_factory):
    """The default overcommit job under E, shrunk twice from scratch."""
    cfg = compose_cfg(["strategy=per_root_cpumask", "workload=overcommit"], tmp_path_factory.mktemp("job"))
    scenario = build_scenario(cfg)
    result = scenario.engine(scenario.topo, copy.deepcopy(scenario.strategy)).run(scenario.make_trace())
    runs = [counterexample.find(scenario, result["examples"][0], 60, result["vm"]["events"]) for _ in range(2)]
    return scenario, runs


def stale(events, topo, strategy) -> int:
    return simulate(Trace.from_array(events), topo, strategy)[1]["stale_tlb_uses"]


def test_overcommit_counterexample_is_short_and_tells_strategies_apart(overcommit_e):
    scenario, [(ce, text), _] = overcommit_e
    assert ce.complete and len(ce.events) <= 20 and ce.source_events > 5_000
    assert ce.kind == "h4"
    assert stale(ce.events, ce.topo, PerRootCpumask()) > 0  # the reference agrees with the fast search
    for clean in (PerRootCpumaskClear, RootGeneration, ActiveRoots, Upstream):
        assert stale(ce.events, ce.topo, clean()) == 0, clean.name
    stale_line = next(line for line in text.splitlines() if line.startswith("stale on this trace:"))
    assert "per_root_cpumask" in stale_line.split(": ")[1].split(", ")
    clean_line = next(line for line in text.splitlines() if line.startswith("clean on this trace:"))
    assert {"per_root_cpumask_clear", "root_generation", "active_roots", "upstream"} <= set(clean_line.split(": ")[1].split(", "))


def test_shrinking_is_deterministic(overcommit_e):
    _, [(a, text_a), (b, text_b)] = overcommit_e
    assert np.array_equal(a.events, b.events) and a.topo == b.topo
    assert text_a.splitlines()[3:] == text_b.splitlines()[3:]  # the header has the time taken


def test_counterexample_is_one_minimal(overcommit_e):
    """Removing any single event loses the stale use of that kind (or makes the trace invalid)."""
    _, [(ce, _), _] = overcommit_e
    for i in range(len(ce.events)):
        with contextlib.suppress(TraceError):  # not a valid trace without it
            r, _ = simulate(Trace.from_array(np.delete(ce.events, i)), ce.topo, PerRootCpumask())
            assert r["stale_by_kind"][ce.kind] == 0, i


def test_walkthrough_names_the_missed_flush(overcommit_e):
    """The last line is the stale use: which pCPU, which root and epochs, and when that pCPU
    last flushed the root relative to the zap."""
    _, [(ce, text), _] = overcommit_e
    steps = walkthrough(ce.events, ce.topo, PerRootCpumask)
    assert len(steps) == len(ce.events) and steps[-1] in text
    assert "STALE (h4)" in steps[-1] and "last flushed" in steps[-1] and "zapped at event" in steps[-1]
    assert any("zap" in s and "the remote flush cannot reach" in s for s in steps)


def test_ddmin_finds_a_one_minimal_subset():
    """The test holds iff 3 and 7 are both present: ddmin keeps exactly those two."""
    got = ddmin(np.arange(20), lambda c: 3 in c and 7 in c)
    assert got.tolist() == [3, 7]


def test_renumber_keeps_the_verdict_on_a_hand_trace():
    """tests/traces/h4_remote_flush.jsonl moved to pCPUs 5, 9, 11 of a bigger host and VM 42
    renumbers back to pCPUs 0.. and VM 1, still stale under E."""
    from hvmodel.host import Topology

    events = load_text(Path(__file__).parent / "traces" / "h4_remote_flush.jsonl").to_array()
    moved = events.copy()
    moved["vm"] = 42
    moved["pcpu"] = np.where(events["pcpu"] >= 0, np.array([0, 5, 9, 11])[np.maximum(events["pcpu"], 0)], -1)
    big = Topology(nr_cpus=16, smt=1, housekeeping_per_node=1, name="t16")
    assert stale(moved, big, PerRootCpumask()) == 1
    small, topo = renumber(moved, big)
    assert set(small["vm"].tolist()) == {1} and topo.nr_cpus == 4
    assert stale(small, topo, PerRootCpumask()) == 1
    assert shrink(moved, big, PerRootCpumask, FastEngine).events.size <= len(events)


def test_no_stale_use_means_nothing_to_shrink():
    events = load_text(Path(__file__).parent / "traces" / "h4_remote_flush.jsonl").to_array()
    from hvmodel.host import Topology

    assert shrink(events, Topology(nr_cpus=4, smt=1, housekeeping_per_node=1), Upstream) is None


def test_cli_writes_a_replayable_counterexample(tmp_path):
    """hvbench-shrink writes the trace and its walk-through; the replay command in the trace's
    header runs it in hvbench, which finds the stale use again."""
    out = subprocess.run(
        [SHRINK, "strategy=per_root_cpumask", "workload=overcommit", "-o", str(tmp_path / "ce.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ce.txt").read_text().startswith("hvbench-shrink: per_root_cpumask lets a guest use a stale translation")
    header = [line for line in (tmp_path / "ce.jsonl").read_text().splitlines() if line.startswith("# replay: ")]
    cmd = shlex.split(header[0].removeprefix("# replay: "))
    assert cmd[0] == "hvbench"
    replay = subprocess.run(
        [HVBENCH, *cmd[1:], "tracking.tracking_uri=sqlite:///" + str(tmp_path / "m.db"), "shrink_s=0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr
    assert "UNSAFE: per_root_cpumask" in replay.stdout


@pytest.mark.parametrize(
    "args, code, line",
    [
        (["strategy=nope"], 2, "hvbench-shrink: error: strategy=nope: unknown strategy; allowed: "),
        (["shrink_s=-1"], 2, "hvbench-shrink: error: shrink_s: must be a number of seconds >= 0"),
        (["strategy=upstream", "workload=overcommit", "workload.duration_s=0.2"], 1, "hvbench-shrink: upstream shows no stale"),
    ],
)
def test_cli_bad_input_and_nothing_to_shrink(tmp_path, args, code, line):
    out = subprocess.run([SHRINK, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == code
    assert (out.stderr + out.stdout).strip().splitlines()[-1].startswith(line)
    assert not list(tmp_path.iterdir())  # nothing written


def test_unsafe_job_logs_its_counterexample(tmp_path, tracking_uri, ray_session):
    """An UNSAFE job's MLflow run has counterexample.jsonl/.txt and counterexample_events; a
    safe job has neither; hvbench-report shows the length and where it is."""
    for strategy in ("per_root_cpumask", "per_root_cpumask_clear"):
        cfg = compose_cfg(
            [f"strategy={strategy}", "workload=overcommit", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=ce"],
            tmp_path / strategy,
        )
        run(cfg)
    client = MlflowClient(tracking_uri)
    runs = {r.data.tags["strategy"]: r for r in client.search_runs([client.get_experiment_by_name("ce").experiment_id])}
    unsafe, safe = runs["per_root_cpumask"], runs["per_root_cpumask_clear"]
    assert 0 < unsafe.data.metrics["counterexample_events"] <= 20 and "counterexample_events" not in safe.data.metrics
    files = {a.path for a in client.list_artifacts(unsafe.info.run_id, "run")}
    assert {"run/counterexample.jsonl", "run/counterexample.txt"} <= files
    assert not {"run/counterexample.jsonl"} & {a.path for a in client.list_artifacts(safe.info.run_id, "run")}
    summary = json.loads((tmp_path / "per_root_cpumask" / "summary.json").read_text())
    assert summary["counterexample_events"] == unsafe.data.metrics["counterexample_events"]
    report = subprocess.run(
        [str(Path(sys.executable).parent / "hvbench-report"), "ce", "--tracking-uri", tracking_uri, "--plot", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    n = int(unsafe.data.metrics["counterexample_events"])
    assert (
        f"counter-example, per_root_cpumask on x16/overcommit: {n} events, runs:/{unsafe.info.run_id}/run/counterexample.jsonl"
        in report.stdout
    )
