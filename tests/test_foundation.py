"""The vertical slice: Hydra config -> Ray actor -> emulator -> summary.json + MLflow run."""

import json
import subprocess

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hvmodel.engine import TIMING_KEYS
from hvmodel.host import Topology
from hvmodel.trace import Ev
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned
from orchestrator.main import run
from orchestrator.tracking import SWEEP_TAG

from conftest import HVBENCH, REPORT, compose_cfg

QUIET = [
    "workload.lifecycle.zap_per_s=0",
    "workload.lifecycle.boot_memslot_deletes=0",
    "workload.lifecycle.lifetime_s=1000",
    "workload.duration_s=0.5",
]


def trace_migrations(trace) -> tuple[int, int]:
    """(loads on a pCPU new to the vCPU, vCPUs ever loaded), counted from the trace alone."""
    last: dict = {}
    moves = 0
    for chunk in trace:
        loads = chunk[chunk["kind"] == Ev.VCPU_LOAD]
        for vm, vcpu, cpu in zip(loads["vm"].tolist(), loads["vcpu"].tolist(), loads["pcpu"].tolist()):
            if last.get((vm, vcpu)) != cpu:
                moves += 1
            last[(vm, vcpu)] = cpu
    return moves, len(last)


@pytest.mark.parametrize("workload", ["partitioned_pinned", "overcommit"])
def test_slice_in_process(workload, tmp_path, tracking_uri, ray_session):
    """upstream: one INVEPT all-context per trace migration (vm_create's load of each vmcs01 on
    the VMM CPU raises a request that the first entry services with the first load's);
    active_roots: none (no remote flushes in these traces). Every trace migration, a vCPU's
    first load included (vmcs01 leaves the VMM CPU), sends one VMCLEAR IPI; "migrations" also
    counts the creation loads, one per vCPU."""
    summaries = {}
    for strategy in ("upstream", "active_roots"):
        out = tmp_path / strategy
        cfg = compose_cfg([f"workload={workload}", f"strategy={strategy}", f"tracking.tracking_uri={tracking_uri}", *QUIET], out)
        summaries[strategy] = run(cfg)
        assert json.loads((out / "summary.json").read_text()) == pytest.approx(summaries[strategy])
        assert (out / "osnoise_top.txt").read_text().splitlines()[2].split()[:3] == ["CPU", "Period", "Runtime"]
    cls = {"partitioned_pinned": PartitionedPinned, "overcommit": Overcommit}[workload]
    topo = Topology(nr_cpus=16, smt=2, name="x16")
    moves, vcpus = trace_migrations(
        cls(duration_s=0.5, lifecycle={"zap_per_s": 0, "boot_memslot_deletes": 0, "lifetime_s": 1000}).trace(topo, 0)
    )
    up, d = summaries["upstream"], summaries["active_roots"]
    assert up["remote_flushes"] == 0
    assert up["migrations"] == d["migrations"] == moves + vcpus
    assert up["vmcs_first_loads"] == vcpus
    assert up["invept_global"] == moves
    assert d["invept_global"] == 0
    assert up["ipi_vmclear"] == d["ipi_vmclear"] == moves
    assert up["stale_tlb_uses"] == d["stale_tlb_uses"] == 0
    if workload == "partitioned_pinned":
        assert moves == vcpus  # pinned: only the first load of each vCPU moves its VMCS
        assert up["pcpu_changes"] == 0
    else:
        assert moves > 2 * vcpus

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hvbench").experiment_id])
    assert {r.data.tags["strategy"] for r in runs} == {"upstream", "active_roots"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["invept_global"] == summaries[r.data.tags["strategy"]]["invept_global"]
        assert r.data.params["strategy._target_"].startswith("hvmodel.strategies.")


def hvbench(args, cwd, timeout=300):
    return subprocess.run([HVBENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_multirun_one_experiment_two_runs(tmp_path):
    """`hvbench -m strategy=upstream,active_roots`: two jobs, one MLflow experiment, tagged with
    the sweep, children of the sweep's parent run (its overrides as params, its comparison as
    artifacts); each job's summary.json equals its MLflow metrics; hvbench-report reads the
    sweep by its parent run. A host preset with a field overridden is named for it."""
    sweep = tmp_path / "sweep"
    args = ["-m", "strategy=upstream,active_roots", f"hydra.sweep.dir={sweep}", "workload.duration_s=0.5", "host.x2apic_cluster_size=8"]
    out = hvbench(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name.startswith("hvbench-")]
    assert len(exps) == 1
    found = client.search_runs([exps[0].experiment_id])
    (parent,) = [r for r in found if r.data.tags.get(SWEEP_TAG) == "true"]
    runs = [r for r in found if r is not parent]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["overrides"] == " ".join(a for a in args[1:] if not a.startswith("hydra."))
    assert parent.data.metrics["jobs_finished"] == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {f"sweep/comparison.{x}" for x in ("txt", "md", "png")}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert sorted(r.data.tags["strategy"] for r in runs) == ["active_roots", "upstream"]
    assert {r.data.tags["sweep"] for r in runs} == {str(sweep)}
    report = subprocess.run([REPORT, parent.info.run_id, "--plot", ""], cwd=tmp_path, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert f"({parent.info.run_id}): 2 finished runs" in report.stdout
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["host"] == "x16[x2apic_cluster_size=8]"
        assert r.info.run_name == f"{r.data.tags['strategy']}|x16[x2apic_cluster_size=8]|partitioned_pinned[duration_s=0.5]|seed0"
        summary = json.loads((sweep / r.data.tags["job_num"] / "summary.json").read_text())
        assert {k: r.data.metrics[k] for k in summary} == pytest.approx(summary)
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "run")}
        assert {"run/summary.json", "run/per_cpu.csv", "run/osnoise_top.txt", "run/.hydra"} <= artifacts
    up = next(r for r in runs if r.data.tags["strategy"] == "upstream").data.metrics
    d = next(r for r in runs if r.data.tags["strategy"] == "active_roots").data.metrics
    assert up["migrations"] == d["migrations"] > 0 and up["events"] == d["events"]
    assert up["invept_global"] > d["invept_global"]


@pytest.mark.parametrize(
    "args,key",
    [
        (["strategy=nope"], "strategy=nope: unknown strategy; allowed: active_roots,"),
        (["host=x3"], "host=x3: unknown host; allowed:"),
        (["host.nr_cpus=-8"], "host.nr_cpus: must be in 1..8192"),
        (["workload.vm_vcpus=[20]"], "workload.vm_vcpus: a pinned VM of 20 vCPUs does not fit"),
        (["-m", "strategy=upstream,active_roots", "host.numa_nodes=3"], "host.numa_nodes"),
        (["host.cpus=4"], "host.cpus: unknown key; allowed: host.name, host.nr_cpus"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, key, tmp_path):
    out = hvbench(args, tmp_path, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvbench: error: ") and key in lines[0], out.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_failing_job_marks_run_failed(tmp_path):
    """A trace that parses but cannot happen fails inside the actor: one line naming the trace
    line, exit 2, and the MLflow run is FAILED with the reason, not left RUNNING."""
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"t_ns": 0, "event": "vm_create", "vm": 1, "vcpus": 1}\n'
        "# the vCPU was never loaded\n"
        '{"t_ns": 5, "event": "vm_entry", "vm": 1, "vcpu": 0}\n'
    )
    out = hvbench(["workload=trace", f"workload.path={trace}"], tmp_path)
    assert out.returncode == 2
    assert "hvbench: error: line 3 (t_ns=5): vm_entry:" in out.stderr and "not loaded" in out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hvbench").experiment_id])
    assert run.info.status == "FAILED"
    assert "line 3" in run.data.tags["error"]


def test_per_cpu_arrays_are_consistent(tmp_path, tracking_uri, ray_session):
    """summary totals are the sums of the per-pCPU CSV written next to them."""
    out = tmp_path / "job"
    cfg = compose_cfg(["workload=overcommit", "workload.duration_s=0.5", f"tracking.tracking_uri={tracking_uri}"], out)
    summary = run(cfg)
    table = np.genfromtxt(out / "per_cpu.csv", delimiter=",", names=True)
    for key in ("invept_single", "invept_global", "ipi_flush", "ipi_vmclear", "migrations"):
        assert table[key].sum() == summary[key]
    assert table["ipi_flush"][table["rt"] == 1].sum() + table["ipi_vmclear"][table["rt"] == 1].sum() == summary["ipi_rt"]


def test_saved_trace_replays_to_the_same_result(tmp_path, tracking_uri, ray_session):
    """trace.save writes the generated trace (binary); workload=trace replays it identically."""
    saved = tmp_path / "run.hvt"
    first = run(
        compose_cfg(
            ["workload=overcommit", "workload.duration_s=0.4", f"trace.save={saved}", f"tracking.tracking_uri={tracking_uri}"],
            tmp_path / "a",
        )
    )
    again = run(compose_cfg(["workload=trace", f"workload.path={saved}", f"tracking.tracking_uri={tracking_uri}"], tmp_path / "b"))
    timing = {*TIMING_KEYS, "job_wall_s"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert first["events"] > 300


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_in_logs():
    import io

    from orchestrator.sharding import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, tty in ((io.StringIO(), False), (Tty(), True)):
        p = Progress(2, 10_000_000_000, stream=stream, every_s=0.0)
        p.update(0, {"events": 1000, "sim_ns": 2_500_000_000, "done": False}, force=True)
        p.update(1, {"events": 3000, "sim_ns": 10_000_000_000, "done": True}, force=True)
        out = stream.getvalue()
        assert "[hvbench] shards 1/2 done | sim 2.50/10.00 s | 4,000 events |" in out
        assert out.startswith("\r") == tty and ("\n[hvbench]" in out) != tty
