"""Shard plan, ShardRunner (a plain class, made a Ray actor at the call site), merge.

A shard owns whole NUMA nodes. Each shard replays the *whole* trace: VM-level state (roots,
refcounts, vCPU caches, requests, strategy masks) is a deterministic function of the trace,
so every shard computes it identically; per-pCPU state (TLB contents, counters, noise) lives
only in the shard that owns the pCPU. Merging adds up per-pCPU arrays and checks that all shards
agree on the VM-level counters, so N shards give exactly the 1-shard result (tests prove it).

The trace is generated inside each actor from the (small) scenario, which goes through the
object store once; nothing per event crosses process boundaries. The emulator is deterministic
and every shard must see the same trace, so there is no per-shard random seed.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field

from hvmodel.errors import ConfigError
from hvmodel.metrics import merge
from hvmodel.trace import TraceError
from orchestrator.scenario import Scenario


def shard_plan(numa_nodes: int, shards: int) -> list[list[int]]:
    """Split nodes 0..numa_nodes-1 into at most `shards` contiguous, balanced groups."""
    shards = max(1, min(shards, numa_nodes))
    base, extra = divmod(numa_nodes, shards)
    plan, node = [], 0
    for i in range(shards):
        n = base + (i < extra)
        plan.append(list(range(node, node + n)))
        node += n
    return plan


class ShardRunner:
    """Runs the complete emulator for one shard, in steps so the driver can show progress."""

    def __init__(self, scenario: Scenario, nodes: list[int]):
        self.engine = scenario.make_engine(nodes)
        self.trace = scenario.make_trace()
        self.chunks = iter(self.trace)
        self.replay_s = self.gen_s = 0.0  # replaying the trace; making (or reading) it

    def advance(self, budget_s: float = 1.0) -> dict:
        """Replay chunks for about `budget_s` seconds; returns progress."""
        t0 = time.perf_counter()
        done = False
        while time.perf_counter() - t0 < budget_s:
            t1 = time.perf_counter()
            chunk = next(self.chunks, None)
            t2 = time.perf_counter()
            self.gen_s += t2 - t1
            if chunk is None:
                done = True
                break
            self.engine.replay(chunk, self.trace)
            self.replay_s += time.perf_counter() - t2
        return {"events": self.engine.events, "sim_ns": self.engine.sim_ns, "done": done}

    def result(self) -> dict:
        out = self.engine.result()
        out["duration_ns"] = self.trace.duration_ns if self.trace.duration_ns is not None else self.engine.sim_ns
        out.update(replay_s=self.replay_s, gen_s=self.gen_s, node_id=_ray_node_id(), engine=self.engine.engine)
        return out

    def run(self) -> dict:
        while not self.advance(3600.0)["done"]:
            pass
        return self.result()


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not inside Ray
        return None


# --- clusters ---------------------------------------------------------------------------------
@dataclass
class LocalRay:
    """A local Ray instance sized to this machine, started once per process."""

    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 2**20
    cpus_per_shard: float = 1
    max_retries: int = 2

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.pop("RAY_ADDRESS", None)  # local means local, even inside a Ray job
        ray.init(
            address="local",  # a new instance, even if another cluster runs on this machine
            num_cpus=self.num_cpus or os.cpu_count(),
            object_store_memory=self.object_store_memory,
            include_dashboard=False,
            logging_level="warning",
        )


@dataclass
class RayCluster:
    """An existing cluster: ray.init(address=...); resource arguments are not allowed there."""

    address: str = "auto"
    cpus_per_shard: float = 1
    max_retries: int = 2

    def ensure(self) -> None:
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=self.address, logging_level="warning")


class ShardFailed(RuntimeError):
    pass


# --- progress -----------------------------------------------------------------------------
@dataclass
class Progress:
    """Shards done, simulated seconds, events/s: a live line on a terminal, plain lines in logs."""

    shards: int
    duration_ns: int | None
    stream: object = sys.stderr
    every_s: float = 5.0
    state: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def update(self, shard: int, info: dict, force: bool = False) -> None:
        self.state[shard] = info
        now = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)()
        if not force and now - self.last < (0.5 if tty else self.every_s):
            return
        self.last = now
        done = sum(1 for s in self.state.values() if s["done"])
        events = sum(s["events"] for s in self.state.values())
        sim = min((s["sim_ns"] for s in self.state.values() if not s["done"]), default=self.duration_ns or 0)
        rate = events / max(now - self.t0, 1e-9)
        total = f"/{self.duration_ns / 1e9:.2f}" if self.duration_ns else ""
        line = f"[hvbench] shards {done}/{self.shards} done | sim {sim / 1e9:.2f}{total} s | {events:,} events | {rate:,.0f} events/s"
        self.stream.write(("\r" + line) if tty else line + "\n")
        if tty and force:
            self.stream.write("\n")
        self.stream.flush()


# --- the driver side ----------------------------------------------------------------------------
def run_shards(scenario: Scenario, cluster, shards: int, progress: Progress | None = None) -> dict:
    """Run the scenario on `shards` Ray actors and merge their results."""
    import ray

    cluster.ensure()
    plan = shard_plan(scenario.topo.numa_nodes, shards)
    ref = ray.put(scenario)
    actor_cls = ray.remote(num_cpus=cluster.cpus_per_shard, max_restarts=0)(ShardRunner)
    job = uuid.uuid4().hex[:8]
    attempts = [0] * len(plan)

    def start(i: int):  # named, so that operators (and tests) can find a shard's actor
        name = f"hvbench-{job}-shard{i}-try{attempts[i]}"
        return actor_cls.options(name=name, scheduling_strategy="SPREAD").remote(ref, plan[i])

    actors = [start(i) for i in range(len(plan))]
    try:
        results = _gather(actors, plan, start, attempts, cluster.max_retries, progress)
    finally:  # done, failed or interrupted: no actor outlives the job
        for a in actors:
            ray.kill(a)
    merged = merge(results, scenario.max_examples)
    merged["duration_ns"] = results[0]["duration_ns"]
    merged["engine"] = results[0]["engine"]
    merged["shards"] = [
        {"nodes": plan[i], "node_id": r["node_id"], "replay_s": r["replay_s"], "gen_s": r["gen_s"]} for i, r in enumerate(results)
    ]
    return merged


def _gather(actors: list, plan: list[list[int]], start, attempts: list[int], max_retries: int, progress: Progress | None) -> list[dict]:
    """Drive the actors step by step until every shard has its result; rerun lost shards."""
    import ray

    pending = {a.advance.remote(): i for i, a in enumerate(actors)}
    results: list[dict | None] = [None] * len(plan)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            info = ray.get(ready[0])
            if info["done"]:
                results[i] = ray.get(actors[i].result.remote())
                ray.kill(actors[i])  # frees its CPU for shards still waiting to be placed
            else:
                pending[actors[i].advance.remote()] = i
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, TraceError | ConfigError):  # the user's trace or config: say so plainly
                raise e.cause from None
            raise ShardFailed(f"shard {i} (NUMA nodes {plan[i]}) raised {type(e.cause).__name__}: {e.cause}") from e
        except ray.exceptions.RayActorError as e:
            attempts[i] += 1
            if attempts[i] > max_retries:
                raise ShardFailed(f"shard {i} (NUMA nodes {plan[i]}) failed {attempts[i]} times: {e}") from e
            print(f"[hvbench] shard {i} lost its actor ({type(e).__name__}); retry {attempts[i]}/{max_retries}", file=sys.stderr)
            actors[i] = start(i)
            pending[actors[i].advance.remote()] = i
            info = {"events": 0, "sim_ns": 0, "done": False}
        if progress is not None:
            progress.update(i, info, force=not pending)
    return results
