"""A real two-node Ray cluster (ray.cluster_utils.Cluster) and a real MLflow tracking server.

Both run as separate processes, as they would in production: the cluster in a helper process,
the sweep as the `hvbench` console script connecting to it, and results read back through
MLflow's REST client."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hvmodel.engine import TIMING_KEYS
from orchestrator.tracking import SWEEP_TAG

from conftest import HVBENCH, REPO, REPORT

CLUSTER = """
import sys
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="warning")
cluster.wait_for_nodes()
print(cluster.address, len(ray.nodes()), flush=True)
sys.stdin.read()
ray.shutdown()
cluster.shutdown()
"""
SWEEP = [
    "-m",
    "strategy=upstream,per_root_cpumask",
    "host=x384",
    "workload=overcommit",
    "workload.cpuset=all",
    "workload.duration_s=0.3",
    "shards=2",
]


def runs_by_strategy(tracking_uri: str) -> dict:
    client = MlflowClient(tracking_uri)
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("hvbench-")]
    return {r.data.tags["strategy"]: r for r in client.search_runs([exp.experiment_id]) if SWEEP_TAG not in r.data.tags}


def hvbench(args, cwd, env=None):
    out = subprocess.run([HVBENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.cluster
def test_sharded_sweep_on_two_node_cluster_equals_local(tmp_path):
    helper = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        address, nodes = helper.stdout.readline().split()
        assert int(nodes) == 2
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        (tmp_path / "cluster").mkdir()
        hvbench([*SWEEP, "cluster=ray", f"cluster.address={address}", "hydra.sweep.dir=sweep"], tmp_path / "cluster", env)
    finally:
        helper.stdin.close()
        helper.wait(timeout=120)
    (tmp_path / "local").mkdir()
    hvbench([*SWEEP, "hydra.sweep.dir=sweep"], tmp_path / "local", env)

    on_cluster = runs_by_strategy(f"sqlite:///{tmp_path / 'cluster' / 'mlflow.db'}")
    local = runs_by_strategy(f"sqlite:///{tmp_path / 'local' / 'mlflow.db'}")
    assert on_cluster.keys() == local.keys() == {"upstream", "per_root_cpumask"}
    for strategy, run in on_cluster.items():
        assert len(set(run.data.tags["ray_nodes"].split(","))) == 2, "the two shards ran on different nodes"
        assert run.data.metrics["shards"] == 2
        timing = {*TIMING_KEYS, "job_wall_s"}
        got = {k: v for k, v in run.data.metrics.items() if k not in timing}
        want = {k: v for k, v in local[strategy].data.metrics.items() if k not in timing}
        assert got == want


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(uri + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not start")
    yield uri
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_sweep_logged_to_mlflow_server_and_report(tmp_path, mlflow_server):
    """Log a sweep over HTTP, read it back through the REST client, compare it with
    hvbench-report (whose verdicts must follow the logged stale-use metric)."""
    sweep = ["-m", "strategy=upstream,per_root_cpumask,active_roots", "workload=overcommit", "workload.duration_s=0.5"]
    hvbench([*sweep, "tracking=server", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=server-sweep"], tmp_path)
    client = MlflowClient(mlflow_server)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("server-sweep").experiment_id]) if SWEEP_TAG not in r.data.tags]
    assert sorted(r.data.tags["strategy"] for r in runs) == ["active_roots", "per_root_cpumask", "upstream"]
    for r in runs:
        assert r.info.status == "FINISHED"
        local = client.download_artifacts(r.info.run_id, "run/summary.json", str(tmp_path))
        summary = json.loads(Path(local).read_text())
        assert summary["stale_tlb_uses"] == r.data.metrics["stale_tlb_uses"]

    report = [REPORT, "server-sweep", "--tracking-uri", mlflow_server, "--plot", str(tmp_path / "cmp.png")]
    out = subprocess.run(report, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    verdicts, rates = out.stdout.split("How realistic the traces were")
    rows = {line.split()[2]: line.split() for line in verdicts.splitlines() if line.startswith("x16")}
    assert {line.split()[2] for line in rates.splitlines() if line.startswith("x16")} == rows.keys()
    assert rows.keys() == {"upstream", "per_root_cpumask", "active_roots"}
    for r in runs:
        verdict = rows[r.data.tags["strategy"]][3]
        assert verdict == ("UNSAFE" if r.data.metrics["stale_tlb_uses"] else "safe")
    assert (tmp_path / "cmp.png").stat().st_size > 10_000


@pytest.mark.parametrize("create_store", [False, True])
def test_report_errors_are_one_line(tmp_path, create_store):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    if create_store:
        MlflowClient(uri).create_experiment("other")
    out = subprocess.run([REPORT, "nope", "--tracking-uri", uri], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    want = "no experiment 'nope'; allowed: other" if create_store else f"no MLflow store at {tmp_path / 'm.db'}"
    assert lines[-1].startswith("hvbench-report: error: " + want)
    assert sum(line.startswith("hvbench-report") for line in lines) == 1


def test_report_markdown_table_sorts_safe_first_and_keeps_every_column():
    from orchestrator.report import COMPARE_COLUMNS, compare_table

    rows = [
        {"host": "x16", "workload": "overcommit", "strategy": "per_root_cpumask", "stale_tlb_uses": 3, "counterexample_events": 14},
        {"host": "x16", "workload": "overcommit", "strategy": "upstream", "stale_tlb_uses": 0, "ipi_rt_per_s": 9.0},
    ]
    lines = compare_table(rows, markdown=True).splitlines()
    assert lines[0].startswith("| host | workload | strategy | verdict | counter-ex. events | stale uses |")
    assert lines[1] == "|" + " --- |" * (5 + len(COMPARE_COLUMNS))
    assert [line.split(" | ")[2:5] for line in lines[2:]] == [["upstream", "safe", "-"], ["per_root_cpumask", "UNSAFE", "14"]]


def test_report_rates_table_puts_real_hosts_beside_the_trace():
    from orchestrator.report import rates_line, rates_table

    row = {"host": "x16", "workload": "overcommit", "strategy": "upstream", "exits_per_vcpu_s": 2500.4, "halts_per_vcpu_s": 600.0}
    row |= {"preemptions_per_vcpu_s": 12.0, "pcpu_changes_per_vcpu_s": 39.04, "guest_mode_pct": 2.04, "steal_pct": 3.0}
    lines = rates_table([row], markdown=True).splitlines()
    assert lines[0] == "| host | workload | strategy | exits/s | halts/s | preempted/s | pCPU changes/s | guest mode % | steal % |"
    assert lines[2] == "| x16 | overcommit | upstream | 2500 | 600 | 12.0 | 39.0 | 2.0 | 3.0 |"
    assert lines[3].startswith("| real hosts |  |  | 1.7-3.5k | 560-670 pinned RT |")
    assert "guest mode 2.0 %, steal 3.0 %" in rates_line(row)
