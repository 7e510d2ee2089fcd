"""Counter-examples for a job: the job's trace up to its first stale use, shrunk by
hvmodel.shrink, told event by event, checked against every strategy of conf/strategy, and
written as a replayable text trace. Used by `hvbench-shrink` and by every hvbench job whose
strategy shows a stale use (`shrink_s`)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hvmodel import shrink
from hvmodel.trace import EVENT_DTYPE, event_to_json
from orchestrator.report import write_atomic
from orchestrator.scenario import CONF_DIR

MAX_FULL_PREFIX = 5_000_000  # events: beyond this, only the stale use's own VMs are searched


def all_strategies() -> dict:
    """conf/strategy, by name: each YAML instantiated afresh per use (strategies keep state)."""
    return {p.stem: _factory(OmegaConf.load(p)) for p in sorted((Path(CONF_DIR) / "strategy").glob("*.yaml"))}


def _factory(cfg):
    return lambda: instantiate(cfg)


def trace_prefix(scenario, example: dict, only_its_vms: bool) -> np.ndarray:
    """The job's trace up to the first stale use; with `only_its_vms`, only the events of the
    two VMs it names (the VM that read the stale entry, and the VM that cached it)."""
    vms = [example["vm"], example["cached_vm"]]
    parts = []
    for chunk in scenario.make_trace():
        part = chunk[chunk["time_ns"] <= example["t_ns"]]
        parts.append(part[np.isin(part["vm"], vms)] if only_its_vms else part)
        if len(part) < len(chunk):
            break
    return np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)


def find(scenario, example: dict, budget_s: float, source_events: int) -> tuple[shrink.Counterexample, str] | None:
    """Shrink the job's first stale use (`example`, from the job's result; the job replayed
    `source_events`) into a counter-example and its walk-through text. The stale use's own VMs
    are tried first; the whole prefix only if they alone do not show it and it is not too large."""
    t0 = time.monotonic()
    make = lambda: copy.deepcopy(scenario.strategy)
    search = lambda events: shrink.shrink(events, scenario.topo, make, scenario.engine, example["kind"], budget_s, source_events)
    ce = search(trace_prefix(scenario, example, only_its_vms=True))
    if ce is None:
        full = trace_prefix(scenario, example, only_its_vms=False)
        ce = search(full) if len(full) <= MAX_FULL_PREFIX else None
    if ce is None:
        return None
    return ce, walkthrough_text(ce, scenario, make, time.monotonic() - t0)


def replay_command(ce: shrink.Counterexample, path: str, strategy: str) -> str:
    t = ce.topo
    host = f"host.nr_cpus={t.nr_cpus} host.numa_nodes=1 host.sockets=1 host.smt=1 host.housekeeping_per_node=1 host.env={t.env}"
    pages = f"host.page_reuse={t.page_reuse} host.rcu_grace_ns={t.rcu_grace_ns}"
    return f"hvbench workload=trace workload.path={path} {host} {pages} host.name={t.name} strategy={strategy}"


def walkthrough_text(ce: shrink.Counterexample, scenario, make, seconds: float) -> str:
    name = scenario.strategy.name
    verdicts = shrink.verdicts(ce.events, ce.topo, all_strategies(), scenario.engine)
    stale = sorted(k for k, v in verdicts.items() if sum(v.values()))
    clean = sorted(k for k, v in verdicts.items() if not sum(v.values()))
    t = ce.topo
    lines = [
        f"hvbench-shrink: {name} lets a guest use a stale translation (hazard {ce.kind}) in {len(ce.events)} events",
        f"(shrunk from {ce.source_events:,} events of {scenario.workload.name} on {scenario.topo.name}, seed {scenario.seed}; "
        f"{ce.replays} replays, {seconds:.1f} s{'' if ce.complete else '; the time budget ended the search: shorter may exist'})",
        f"host: {t.nr_cpus} CPUs, {t.env}, one NUMA node, no SMT; pCPU 0 is the housekeeping CPU",
        "",
        *shrink.walkthrough(ce.events, ce.topo, make),
        "",
        f"stale on this trace: {', '.join(stale) or 'none'}",
        f"clean on this trace: {', '.join(clean) or 'none'}",
    ]
    return "\n".join(lines) + "\n"


def write(ce: shrink.Counterexample, text: str, path: Path, strategy: str) -> Path:
    """The trace (text form, the walk-through's first lines as its header) and the walk-through
    beside it (`.txt`); both written whole or not at all. Returns the walk-through's path."""
    header = "".join(f"# {line}\n" for line in text.splitlines()[:3])
    header += f"# replay: {replay_command(ce, path.name, strategy)}\n"
    write_atomic(path, header + "".join(json.dumps(event_to_json(rec)) + "\n" for rec in ce.events))
    notes = path.with_suffix(".txt")
    write_atomic(notes, text + f"\nreplay: {replay_command(ce, path.name, strategy)}\n")
    return notes
