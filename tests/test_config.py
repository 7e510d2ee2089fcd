"""Every option of every config group composes with Hydra's Compose API and instantiates."""

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from orchestrator.scenario import GROUPS, build_scenario, instantiate_group

from conftest import CONF


def options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def test_groups_exist():
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "workload" and option == "trace":
        trace = tmp_path / "t.jsonl"
        trace.write_text('{"t_ns": 0, "event": "vm_create", "vm": 1, "vcpus": 1}\n')
        overrides.append(f"workload.path={trace}")
    if group == "strategy" and option == "hyperv_flush_hypercall":
        overrides.append("host=x64")  # H exists only nested on Hyper-V
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    obj = instantiate_group(cfg, group)
    made = obj.func if isinstance(obj, functools.partial) else type(obj)  # the engine group is a factory
    assert made.__module__.split(".")[0] in ("hvmodel", "orchestrator")
    scenario = build_scenario(cfg)
    assert scenario.topo.nr_cpus >= 1


def test_host_shapes():
    """The host sizes DESIGN.md promises, with RT-isolated and housekeeping CPUs on every node."""
    from hydra.utils import instantiate

    seen = {}
    for option in options("host"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            topo = instantiate(compose("config", overrides=[f"host={option}"]).host)
        rt, node = topo.rt_mask(), topo.node_of()
        for n in range(topo.numa_nodes):
            assert rt[node == n].any() and (~rt[node == n]).any(), (option, n)
        seen[topo.nr_cpus] = topo.env
    assert {64, 384, 1920, 8192} <= set(seen)
    assert seen[64] == "hyperv" and seen[8192] == "bare_metal"


def test_a_host_with_smt_on_some_cores():
    """host.smt_cores: only the named cores have SMT siblings, numbered after the first
    threads in core order (as Linux enumerates such a host); a sibling shares its core's node
    and housekeeping/RT role, and both engines replay a workload on it identically."""
    from hvmodel.engine import TIMING_KEYS, simulate
    from hvmodel.errors import ConfigError
    from hvmodel.fast.engine import FastEngine
    from hvmodel.strategies.active_roots import ActiveRoots

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["host.nr_cpus=20", "host.numa_nodes=2", "host.smt_cores='0,1,8,9'", "workload.duration_s=0.3"])
    scenario = build_scenario(cfg)
    topo = scenario.topo
    assert topo.cores == 16 and topo.cores_per_node == 8
    assert topo.node_of().tolist() == [0] * 8 + [1] * 8 + [0, 0, 1, 1]
    assert topo.rt_mask().tolist() == [False] + [True] * 7 + [False] + [True] * 7 + [False, True, False, True]
    trace = scenario.make_trace()
    ref, fast = (
        {k: v for k, v in simulate(trace, topo, ActiveRoots(), engine=e)[1].items() if k not in TIMING_KEYS} for e in (None, FastEngine)
    )
    assert ref == fast and ref["events"] > 100
    for bad, msg in (("host.smt_cores='0-3,19'", "'19' is outside 0-14"), ("host.smt_cores=x", "bad cpulist element")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=["host.nr_cpus=20", bad])
        with pytest.raises(ConfigError, match=f"host.smt_cores: .*{msg}"):
            build_scenario(cfg)
