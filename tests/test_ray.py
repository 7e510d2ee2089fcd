"""The Ray side: sharded runs on real actors equal the in-process result; a shard whose actor
dies is rerun; a shard that keeps dying fails the run with the reason."""

import sys
import threading
import time

import numpy as np
import pytest

from hvmodel.cost import CostModel
from hvmodel.host import Topology
from hvmodel.metrics import NoiseBudget
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.workloads.overcommit import Overcommit
from orchestrator.scenario import Scenario
from orchestrator.sharding import LocalRay, ShardFailed, ShardRunner, run_shards

TOPO = Topology(nr_cpus=32, numa_nodes=4, smt=2, housekeeping_per_node=1, name="t32")


def scenario(duration_s: float) -> Scenario:
    workload = Overcommit(duration_s=duration_s, cpuset="all", vms=12, lifecycle={"zap_per_s": 20, "lifetime_s": 0.5})
    return Scenario(TOPO, workload, PerRootCpumask(), CostModel(), NoiseBudget(), seed=5)


def same(a: dict, b: dict) -> None:
    assert a["vm"] == b["vm"] and a["stale_by_kind"] == b["stale_by_kind"] and a["examples"] == b["examples"]
    assert a["stale_any_kind"] == b["stale_any_kind"]
    for key in b["per_cpu"]:
        assert np.array_equal(a["per_cpu"][key], b["per_cpu"][key]), key


def test_ray_shards_equal_in_process(ray_session):
    s = scenario(1.0)
    expected = ShardRunner(s, [0, 1, 2, 3]).run()
    result = run_shards(s, LocalRay(cpus_per_shard=0.5), 3)  # 3 shards at once on 2 CPUs
    same(result, expected)
    assert [sh["nodes"] for sh in result["shards"]] == [[0, 1], [2], [3]]
    assert result["vm"]["events"] > 1000


def kill_shard_when_running(ray, shard: int, stop: threading.Event) -> None:
    """Kill the first actor of `shard` as soon as it exists (a real actor death)."""
    while not stop.is_set():
        names = [n for n in ray.util.list_named_actors() if n.endswith(f"-shard{shard}-try0")]
        if names:
            ray.kill(ray.get_actor(names[0]))
            return
        time.sleep(0.05)


def run_with_kill(ray, s: Scenario, retries: int):
    out: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_shard_when_running, args=(ray, 1, stop))
    killer.start()
    try:
        out["result"] = run_shards(s, LocalRay(max_retries=retries), 2)
    except ShardFailed as e:
        out["error"] = e
    finally:
        stop.set()
        killer.join()
    return out


def test_dead_shard_is_rerun(ray_session, capsys):
    s = scenario(1.0)
    expected = ShardRunner(s, [0, 1, 2, 3]).run()
    out = run_with_kill(ray_session, s, retries=2)
    same(out["result"], expected)
    assert "shard 1 lost its actor" in capsys.readouterr().err


def test_shard_that_keeps_dying_fails_the_run(ray_session):
    out = run_with_kill(ray_session, scenario(1.0), retries=0)
    assert "result" not in out
    assert str(out["error"]).startswith("shard 1 (NUMA nodes [2, 3]) failed 1 times")


@pytest.mark.skipif(sys.platform != "linux", reason="fork-free Ray workers only tested on Linux")
def test_actors_never_log_to_mlflow():
    """DESIGN.md §7: only the driver talks to MLflow. The shard code must not import it."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "orchestrator" / "sharding.py"
    imports = {
        n.names[0].name.split(".")[0]
        for n in ast.walk(ast.parse(src.read_text()))
        if isinstance(n, ast.Import | ast.ImportFrom) and n.names
    }
    modules = {n.module.split(".")[0] for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
    assert "mlflow" not in imports | modules


def test_failed_shard_marks_the_mlflow_run_failed(ray_session, tmp_path):
    """A shard that keeps dying ends the job with the reason in MLflow, status FAILED."""
    from mlflow.tracking import MlflowClient

    from orchestrator.main import run

    from conftest import compose_cfg

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(
        ["host=x384", "shards=2", "cluster.max_retries=0", "workload.duration_s=4", f"tracking.tracking_uri={uri}"], tmp_path / "out"
    )
    stop = threading.Event()
    killer = threading.Thread(target=kill_shard_when_running, args=(ray_session, 1, stop))
    killer.start()
    try:
        with pytest.raises(ShardFailed):
            run(cfg)
    finally:
        stop.set()
        killer.join()
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("hvbench").experiment_id])
    assert r.info.status == "FAILED"
    assert r.data.tags["error"].startswith("ShardFailed: shard 1 (NUMA nodes [1]) failed 1 times")
