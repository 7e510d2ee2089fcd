"""`hvbench-check`: every valid event sequence up to N events on a tiny host, per strategy:
the shortest stale translation use, or none in every sequence (hvmodel.check).

    hvbench-check                                  # every bare-metal strategy, depth 12
    hvbench-check --strategies upstream,per_root_cpumask --depth 14
    hvbench-check --env hyperv --vcpus 2 --depth 10 -o check/

Strategies are the conf/strategy presets, run side by side on the machine's CPUs. Each
counter-example is written as a text trace (`check-<strategy>.jsonl`, replayable with
`hvbench workload=trace`) and replayed on the reference engine, which must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from hvmodel.check import CheckResult, check
from hvmodel.engine import simulate
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.strategies.base import check_environment
from hvmodel.trace import Trace, event_to_json
from orchestrator.report import format_table, write_atomic
from orchestrator.scenario import CONF_DIR

EXIT_USAGE = 2
PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "strategy").glob("*.yaml"))


def load_strategy(name: str):
    """A conf/strategy preset, as `hvbench strategy=NAME` builds it."""
    return instantiate(OmegaConf.load(Path(CONF_DIR) / "strategy" / f"{name}.yaml"))


def usable(name: str, env: str) -> bool:
    try:
        check_environment(load_strategy(name), env)
        return True
    except ConfigError:  # a strategy for the other environment
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hvbench-check", description="Bounded exhaustive search for stale translation uses.")
    p.add_argument("--strategies", default="all", help=f"comma-separated, or all (default); allowed: {', '.join(PRESETS)}")
    p.add_argument("--depth", type=int, default=12, help="events after the VMs' creation (default: 12)")
    p.add_argument("--pcpus", type=int, default=2, help="host CPUs (default: 2)")
    p.add_argument("--vms", type=int, default=1, help="VMs (default: 1)")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs per VM (default: 1)")
    p.add_argument("--env", default="bare_metal", help="bare_metal (default) or hyperv")
    p.add_argument("--no-nested", action="store_true", help="leave out L2 entries and exits, L1 INVEPTs and EPT12 writes")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per strategy at most (default: 600)")
    p.add_argument("-o", "--output", default=".", help="directory for the counter-examples (default: .)")
    a = p.parse_args(argv)
    try:
        names = _strategies(a.strategies, a.env)
        for key, v, lo, hi in (("--depth", a.depth, 1, 40), ("--pcpus", a.pcpus, 2, 4), ("--vms", a.vms, 1, 2), ("--vcpus", a.vcpus, 1, 2)):
            if not lo <= v <= hi:
                raise ValueError(f"{key}: must be in {lo}..{hi}, got {v}")
        topo = Topology(nr_cpus=a.pcpus, smt=1, housekeeping_per_node=1, env=a.env, name=f"check{a.pcpus}")
    except ValueError as e:
        print(f"hvbench-check: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    vms = [a.vcpus] * a.vms
    what = f"{a.pcpus} pCPUs, {a.vms} VM(s) of {a.vcpus} vCPU(s), {a.env}{', no nested' if a.no_nested else ', one EPTP12'}"
    print(f"[hvbench-check] every valid sequence of up to {a.depth} events: {what}", file=sys.stderr)
    run = partial(_one, topo=topo, vms=vms, depth=a.depth, nested=not a.no_nested, limit=a.time_limit)
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:  # the search releases the GIL
        results = list(pool.map(run, names))
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    print(table(names, results, a.depth))
    for name, r in zip(names, results):
        if r.counterexample is not None:
            path = out / f"check-{name}.jsonl"
            write_atomic(path, "".join(json.dumps(event_to_json(rec)) + "\n" for rec in r.counterexample))
            print(f"\n{name}: {len(r.counterexample) - len(vms)} events after the VMs' creation ({r.kind}), {path}:")
            for rec in r.counterexample:
                print("  " + json.dumps(event_to_json(rec)))
            print(f"  the reference engine agrees: {_reference_agrees(r, topo, name)}")
    return 0


def _strategies(arg: str, env: str) -> list[str]:
    if arg == "all":
        return [n for n in PRESETS if usable(n, env)]
    names = [n.strip() for n in arg.split(",") if n.strip()]
    for n in names:
        if n not in PRESETS:
            raise ValueError(f"--strategies: unknown {n!r}; allowed: {', '.join(PRESETS)}, all")
        if not usable(n, env):
            raise ValueError(f"--strategies: {n} does not run on {env}")
    return names


def _one(name: str, topo: Topology, vms: list[int], depth: int, nested: bool, limit: float) -> CheckResult:
    def progress(d: int, states: int, frontier: int) -> None:
        print(f"[hvbench-check] {name}: depth {d}, {states:,} states, {frontier:,} to expand", file=sys.stderr, flush=True)

    return check(topo, partial(load_strategy, name), vms, depth, nested, limit, progress)


def _reference_agrees(r: CheckResult, topo: Topology, name: str) -> str:
    _, s = simulate(Trace.from_array(r.counterexample), topo, load_strategy(name))
    return "yes" if s["stale_tlb_uses"] and s[f"stale_tlb_uses_{r.kind}"] else f"NO (stale uses {s['stale_tlb_uses']}): report a bug"


def table(names: list[str], results: list[CheckResult], depth: int) -> str:
    head = ("strategy", "verdict", "shortest counter-example", "kind", "states", "sequences", "s")
    rows = []
    for name, r in zip(names, results):
        if r.counterexample is not None:
            verdict, length = "UNSAFE", f"{r.depth} events"
        elif r.complete:
            verdict, length = f"no stale use in every sequence up to {depth} events", "-"
        else:
            verdict, length = f"no stale use up to {r.depth} events (time limit)", "-"
        rows.append((name, verdict, length, r.kind or "-", f"{r.states:,}", f"{r.sequences:,}", f"{r.seconds:.1f}"))
    return format_table(head, rows, left=len(head)).rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
