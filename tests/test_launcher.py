"""`hvbench -m`: the jobs of a sweep run at the same time on Ray, as many as its CPUs hold, each
logging its MLflow run from the hvbench process; Ctrl-C ends every running job KILLED, starts
no queued one, and leaves no Ray process behind."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import SWEEP_TAG

from conftest import HVBENCH

STRATEGIES = "strategy=upstream,active_roots,per_root_cpumask,root_generation"


def runs(tmp_path: Path, parents: bool = False) -> list:
    """The jobs' runs (or, with parents, the sweeps' parent runs)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in found if (SWEEP_TAG in r.data.tags) == parents]


def running_runs(db: Path) -> int:
    """RUNNING runs, read without MLflow: a client opening a store that hvbench is still
    creating would run MLflow's schema migrations against it at the same time."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or being migrated
        return 0


def descendants(pid: int) -> set[int]:
    """pid's live descendants (Ray's daemons and workers descend from the driver)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()}


@pytest.mark.slow
def test_sweep_jobs_run_at_the_same_time_and_log_from_the_driver(tmp_path):
    proc = subprocess.Popen(
        [HVBENCH, "-m", STRATEGIES, "host=x384", "workload.duration_s=1", "cluster.num_cpus=2", f"hydra.sweep.dir={tmp_path / 's'}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    found = runs(tmp_path)
    assert sorted(r.data.tags["strategy"] for r in found) == sorted(STRATEGIES.split("=")[1].split(","))
    assert {r.info.status for r in found} == {"FINISHED"}
    assert {r.data.tags["driver_pid"] for r in found} == {str(proc.pid)}, "every run is logged by the hvbench process"
    spans = sorted((r.info.start_time, r.info.end_time) for r in found)
    overlapping = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlapping >= 2, f"jobs ran one after another: {spans}"
    assert "ETA" in err


@pytest.mark.slow
def test_ctrl_c_kills_running_jobs_starts_no_queued_one_leaves_no_ray(tmp_path):
    proc = subprocess.Popen(
        [HVBENCH, "-m", STRATEGIES, "host=x8192", "workload.duration_s=60", "cluster.num_cpus=2", f"hydra.sweep.dir={tmp_path / 's'}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background commands with SIGINT ignored (POSIX),
        # and Python then keeps it ignored: give hvbench the default, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 180
    while running_runs(tmp_path / "mlflow.db") < 3:  # the sweep's parent run and two jobs
        assert time.monotonic() < deadline and proc.poll() is None, "the jobs did not start"
        time.sleep(1)
    time.sleep(3)  # the jobs are replaying on their shard actors now
    ray_processes = descendants(proc.pid)
    assert ray_processes, "the local Ray instance runs under the driver"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    found = runs(tmp_path)
    assert {r.info.status for r in found} == {"KILLED"}, [(r.data.tags["strategy"], r.info.status) for r in found]
    assert len(found) == 2, "two jobs ran on the two CPUs; the queued two never started"
    assert all(r.data.tags["error"] == "interrupted" for r in found)
    assert [r.info.status for r in runs(tmp_path, parents=True)] == ["KILLED"], "the sweep's parent run ends with its jobs"
    time.sleep(2)
    assert not alive(ray_processes), "Ray processes outlived the sweep"
