"""The closed loop (workload.closed_loop=true, hvmodel/closed_loop.py): flush cost feeds back
into the trace. Off, every trace is the open loop's; on, a costly strategy slows the VMs more
than a cheap one, and the run's counters are those of an open-loop replay of the trace it made,
on both engines; it refuses more than one shard."""

import dataclasses
import hashlib
import subprocess

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_generator_version import DIGESTS, HOSTS, WORKLOADS
from test_sharding import assert_identical

from hvmodel import closed_loop
from hvmodel.cost import CostModel
from hvmodel.engine import Engine
from hvmodel.errors import ConfigError
from hvmodel.fast.engine import FastEngine
from hvmodel.metrics import summarize
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.trace import Trace, load, save_binary
from hvmodel.workloads.rt_mixed import RtMixed
from orchestrator.scenario import build_scenario
from orchestrator.sharding import run_in_process

from conftest import CONF, HVBENCH

KATA = ["host=x64", "workload=nested_kata", "cost=hyperv_nested", "workload.duration_s=0.6"]
CLOSED_KEYS = {"closed_loop_delay_us", "closed_loop_extra_migrations", "vm_boots", "vm_boot_ms_mean"}


def scenario(*overrides: str, closed: bool = True):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"workload.closed_loop={str(closed).lower()}"])
    return build_scenario(cfg)


def summary(sc) -> dict:
    result = run_in_process(sc, 1) if sc.workload.closed_loop else sc.make_engine().run(open_trace(sc))
    return summarize(result, sc.topo.rt_mask(), sc.workload.duration_s)


def open_trace(sc) -> Trace:
    """The open-loop trace, from the reference generator (the compiled one makes the same
    bytes, tests/test_workloads_compiled.py, but compiles afresh after any edit of hvmodel/)."""
    return sc.workload.trace(sc.topo, sc.seed, reference=True)


@pytest.mark.parametrize("workload,host,seed", [("overcommit", "x16", 0), ("rt_mixed", "t32", 1)])
def test_open_loop_reference_generator_keeps_its_pinned_bytes(workload, host, seed):
    """closed_loop=false (the default): the reference generator, which carries the loop's
    hooks, still makes the pinned traces (the compiled one is tests/test_generator_version.py)."""
    h = hashlib.sha256()
    for chunk in WORKLOADS[workload]().trace(HOSTS[host], seed, reference=True):
        h.update(chunk.tobytes())
    assert h.hexdigest() == DIGESTS[workload, host, seed]


def test_a_closed_loop_workload_has_no_trace_of_its_own():
    with pytest.raises(ValueError, match="closed_loop"):
        RtMixed(duration_s=0.1, closed_loop=True).trace(HOSTS["x16"], 0)


def test_with_no_cost_the_closed_loop_is_the_open_loop():
    """Nothing charged, nothing fed back: the lockstep makes the open loop's trace byte for byte."""
    sc = scenario(*KATA)
    sc.cost = CostModel(**dict.fromkeys(dataclasses.asdict(sc.cost), 0.0))
    closed = sc.make_trace().to_array()
    assert len(closed) > 1000 and np.array_equal(closed, open_trace(scenario(*KATA, closed=False)).to_array())


def test_several_streams_run_in_the_merge_order():
    """rt_mixed on four nodes is five streams: run in (time, stream) order, at no cost, they
    make the merged open-loop trace."""
    workload, topo = WORKLOADS["rt_mixed"](), HOSTS["t32"]
    open_ = workload.trace(topo, 1, reference=True).to_array()
    workload.closed_loop = True
    nothing = CostModel(**dict.fromkeys(dataclasses.asdict(CostModel()), 0.0))
    closed = closed_loop.trace(workload, topo, 1, lambda: FastEngine(topo, PerRootCpumask(), nothing)).to_array()
    assert len(closed) > 1000 and np.array_equal(closed, open_)


def test_a_costly_strategy_is_slowed_more_than_a_cheap_one():
    """Nested Kata with Hyper-V costs: A (INVEPT all-context at every migration, 2 ms each)
    delays its vCPUs' HLTs and boots several times more than H (the flush hypercall), so its
    trace has fewer events in the same time than H's, and H's fewer than the open loop's."""
    a, h = summary(scenario(*KATA, "strategy=upstream")), summary(scenario(*KATA, "strategy=hyperv_flush_hypercall"))
    a_open = summary(scenario(*KATA, "strategy=upstream", closed=False))
    assert a.keys() >= CLOSED_KEYS and not CLOSED_KEYS & a_open.keys()
    assert a["closed_loop_delay_us"] > 3 * h["closed_loop_delay_us"] > 0
    assert a["events"] < h["events"] < a_open["events"]
    assert a["invept_global_per_s"] < a_open["invept_global_per_s"]  # longer stints, fewer migrations
    assert a["vm_boots"] > 100 and a["vm_boot_ms_mean"] > h["vm_boot_ms_mean"] > 300.0


def test_a_busy_host_migrates_more():
    """Overcommit with spare pCPUs: under A's flush load, wake-ups leave their idle last pCPU."""
    base = ["host=x64", "workload=overcommit", "workload.cpuset=all", "cost=hyperv_nested", "workload.duration_s=1.0"]
    a, h = summary(scenario(*base, "strategy=upstream")), summary(scenario(*base, "strategy=hyperv_flush_hypercall"))
    assert a["closed_loop_extra_migrations"] > 3 * max(h["closed_loop_extra_migrations"], 1)


@pytest.mark.parametrize("strategy", ["upstream", "per_root_cpumask_clear"])
def test_closed_loop_is_exact_on_both_engines(strategy, tmp_path):
    """The loop's engine gives the counters of an open-loop replay of the trace the loop made;
    both engines make the same trace; the job (run_in_process) and `trace.save` see it too."""
    sc = scenario(*KATA, f"strategy={strategy}", "workload.duration_s=0.4")
    traces = {}
    for engine in (FastEngine, Engine):
        sc.engine = engine
        loop = sc.make_loop(sc.make_engine())
        traces[engine] = np.concatenate(list(loop.trace))
        closed = loop.engine.result(sc.workload.duration_ns)
        replay = sc.make_engine().run(Trace.from_array(traces[engine], sc.workload.duration_ns))
        assert_identical(closed, replay)
        assert_identical(run_in_process(sc, 1), closed)
    assert np.array_equal(traces[FastEngine], traces[Engine])
    path = tmp_path / "closed.trace"
    save_binary(sc.make_trace(), path)
    saved = load(path)
    assert saved.meta["closed_loop"] and saved.meta["strategy"] == strategy
    assert np.array_equal(saved.to_array(), traces[Engine])


def test_more_than_one_shard_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="^workload.closed_loop: "):
        scenario(*KATA, "shards=2")
    sc = scenario("host=x384", "workload=overcommit", "workload.duration_s=0.1")  # 2 NUMA nodes
    with pytest.raises(ConfigError, match="^workload.closed_loop: "):
        run_in_process(sc, 2)


@pytest.mark.slow
def test_the_cli_says_so_in_one_line(tmp_path):
    cmd = [HVBENCH, "workload.closed_loop=true", "shards=2", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("hvbench: error: workload.closed_loop: ")
    assert not (tmp_path / "mlflow.db").exists()
