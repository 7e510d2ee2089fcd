"""Shard plan, ShardRunner (a plain class, made a Ray actor at the call site), merge.

A shard owns whole NUMA nodes: the TLBs, counters and noise of their pCPUs. How it shares the
VM-level work with the other shards depends on the trace (hvmodel.split):

* split: every VM stays on one node, so each shard replays only the events of its own nodes'
  VMs. A strategy that broadcasts to every online pCPU (on_each_cpu, B) makes the one effect
  that crosses shards: then the driver steps all shards through the trace a window of
  simulated time at a time, each one first replaying its VMs at VM level only to find its
  broadcasts and then replaying them for real with the other shards' broadcasts delivered at
  their positions;
* replicated: VMs span nodes (unpinned vCPUs), so every shard replays every event. VM-level
  state is a deterministic function of the trace, so every shard computes it identically, and
  only the per-pCPU work is split.

Either way the merged result equals the 1-shard result, bit for bit (tests/test_sharding.py).
A closed-loop job (workload.closed_loop=true, hvmodel/closed_loop.py) is one shard: its
generator runs in lockstep with that shard's engine.
The trace is generated inside each actor from the (small) scenario, which goes through the
object store once; nothing per event crosses process boundaries but the broadcasts.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from hvmodel.closed_loop import ClosedLoop
from hvmodel.errors import ConfigError
from hvmodel.metrics import merge
from hvmodel.trace import Trace, TraceError
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
    """Runs the emulator for one shard, in steps so the driver can show progress: advance() for
    shards that need nothing from each other, ahead() + replay_window() for split shards with
    broadcasts (each window's broadcasts go through the driver between the two).

    A split shard's events come as (chunk, order keys, positions in its trace) triples; the keys
    place its events among every other shard's (hvmodel.split)."""

    WINDOW_NS = 1_000_000_000  # simulated time the driver steps split shards with broadcasts by

    def __init__(self, scenario: Scenario, nodes: list[int], split: bool = False):
        self.split = split
        self.engine = scenario.make_engine(nodes, local_nodes=nodes if split else None)
        self.loop: ClosedLoop | None = None  # closed loop: it replays the events as it makes them
        if scenario.workload.closed_loop:  # run_shards / run_in_process checked it is the only shard
            self.loop = scenario.make_loop(self.engine)
            self.trace = self.loop.trace
            self.chunks = ((c, None, None) for c in self.trace)
        elif split:
            self.chunks, self.trace = scenario.local_chunks(nodes)
        else:
            self.trace = scenario.make_trace()
            self.chunks = ((c, None, None) for c in self.trace)
        # finds this shard's broadcasts a window ahead: VM level only, no pCPU of its own
        self.scout = scenario.make_engine([], local_nodes=nodes) if split and scenario.strategy.on_each_cpu else None
        self.pending: tuple | None = None  # the part of a chunk beyond the window
        self.exhausted = False  # the trace has no more chunks
        self.window: list[tuple] = []
        self.mask_series: list[tuple[int, int, int]] = []  # (order key, excursion, change)
        self.replay_s = self.gen_s = 0.0  # replaying the trace; making (or reading) it

    def _next(self):
        t0 = time.perf_counter()
        part = next(self.chunks, None)
        self.gen_s += time.perf_counter() - t0
        return part

    def _replay(self, chunk: np.ndarray, keys: np.ndarray | None, at: np.ndarray | None) -> None:
        if self.loop is not None:  # the loop replayed it already
            return
        t0 = time.perf_counter()
        base = self.engine.events
        self.engine.replay(chunk, self.trace if at is None else _Where(self.trace, at, base))
        if self.split:
            self.mask_series += [(int(keys[i - base]), exc, chg) for i, exc, chg in self.engine.take_mask_series()]
        self.replay_s += time.perf_counter() - t0

    def advance(self, budget_s: float = 1.0) -> dict:
        """Replay chunks for about `budget_s` seconds; returns progress."""
        t0 = time.perf_counter()
        done = False
        while time.perf_counter() - t0 < budget_s:
            part = self._next()
            if part is None:
                done = True
                break
            self._replay(*part)
        return self._progress(done)

    def _progress(self, done: bool) -> dict:
        return {"events": self.engine.events, "sim_ns": self.engine.sim_ns, "done": done}

    def ahead(self, t_end: int) -> list[tuple[int, int, int, int]]:
        """Take this shard's events before t_end and replay them at VM level; return the
        broadcasts they make, as (order key, t_ns, src pCPU, hpa)."""
        t0 = time.perf_counter()
        self.window, out = [], []
        while not self.exhausted:
            part = self.pending or self._next()
            if part is None:
                self.exhausted = True
                break
            chunk, keys, at = part
            cut = int(np.searchsorted(chunk["time_ns"], t_end))
            self.pending = (chunk[cut:], keys[cut:], at[cut:]) if cut < len(chunk) else None
            if cut:
                base = self.scout.events
                self.scout.replay(chunk[:cut], _Where(self.trace, at, base))
                out += [(int(keys[i - base]), int(chunk["time_ns"][i - base]), src, hpa) for i, src, hpa in self.scout.take_outbox()]
                self.window.append((chunk[:cut], keys[:cut], at[:cut]))
            if self.pending is not None:
                break
        self.replay_s += time.perf_counter() - t0
        return out

    def replay_window(self, foreign: list[tuple[int, int, int, int]]) -> dict:
        """Replay the window taken by ahead(), with the other shards' broadcasts of that window
        (sorted by order key) delivered at their positions: each event's broadcasts together,
        between this shard's events before and after it; returns progress."""
        t0 = time.perf_counter()
        groups = [list(g) for _, g in itertools.groupby(foreign, key=lambda f: f[0])]  # one foreign event each
        g = 0
        for chunk, keys, at in self.window:
            start = 0
            while g < len(groups) and groups[g][0][0] < keys[-1]:
                cut = int(np.searchsorted(keys, groups[g][0][0]))
                if cut > start:
                    self._replay(chunk[start:cut], keys[start:cut], at[start:cut])
                    start = cut
                self._deliver_foreign(groups[g])
                g += 1
            self._replay(chunk[start:], keys[start:], at[start:])
        for group in groups[g:]:
            self._deliver_foreign(group)
        self.window = []
        self.replay_s += time.perf_counter() - t0
        return self._progress(self.exhausted and self.pending is None)

    def _deliver_foreign(self, group: list[tuple[int, int, int, int]]) -> None:
        self.engine.remote_on_each_cpu(group[0][1], [(src, hpa) for _, _, src, hpa in group])

    def result(self) -> dict:
        end = self.trace.duration_ns if self.trace.duration_ns is not None else self.engine.sim_ns
        out = self.engine.result(end)
        out["duration_ns"] = end
        replay_s, gen_s = self.replay_s, self.gen_s
        if self.loop is not None:  # the loop's engine time was spent inside "generation"
            out["closed_loop"] = self.loop.stats()
            replay_s, gen_s = self.loop.replay_s, gen_s - self.loop.replay_s
        out.update(replay_s=replay_s, gen_s=gen_s, node_id=_ray_node_id(), engine=self.engine.engine)
        out["mask_series"] = self.mask_series
        return out

    def run(self) -> dict:
        while not self.advance(3600.0)["done"]:
            pass
        return self.result()


class _Where:
    """trace.where() for a shard's chunk of events: local event i is at[i - base] in its trace."""

    def __init__(self, trace: Trace, at: np.ndarray, base: int):
        self.trace, self.at, self.base = trace, at, base

    def where(self, i: int) -> str:
        return self.trace.where(int(self.at[i - self.base]))


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not inside Ray
        return None


# The shard actors' environment on a cluster's nodes: one BLAS thread (see orchestrator/__init__.py).
# A local instance inherits it from this process instead: a runtime_env would cost every actor
# about 0.5 s, since Ray's pre-started workers do not have it.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1"}


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
            ray.init(address=self.address, logging_level="warning", runtime_env={"env_vars": WORKER_ENV})


class ShardFailed(RuntimeError):
    pass


# --- progress -----------------------------------------------------------------------------
@dataclass
class Progress:
    """Shards done, simulated seconds, events/s and an ETA: a live line on a terminal (when
    one job runs), plain lines otherwise."""

    shards: int
    duration_ns: int | None
    label: str = ""
    stream: object = sys.stderr
    every_s: float = 5.0
    state: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def update(self, shard: int, info: dict, force: bool = False) -> None:
        self.state[shard] = info
        now = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)() and not JOBS_IN_PARALLEL.is_set()
        if not force and now - self.last < (0.5 if tty else self.every_s):
            return
        self.last = now
        done = sum(1 for s in self.state.values() if s["done"])
        events = sum(s["events"] for s in self.state.values())
        reached = max((s["sim_ns"] for s in self.state.values()), default=0)
        sim = min((s["sim_ns"] for s in self.state.values() if not s["done"]), default=self.duration_ns or reached)
        elapsed = max(now - self.t0, 1e-9)
        line = f"[hvbench] {self.label + ': ' if self.label else ''}shards {done}/{self.shards} done | sim {sim / 1e9:.2f}"
        if self.duration_ns:
            left = elapsed * (self.duration_ns - sim) / sim if 0 < sim < self.duration_ns else 0.0
            line += f"/{self.duration_ns / 1e9:.2f} s | {events:,} events | {events / elapsed:,.0f} events/s | ETA {left:.0f} s"
        else:
            line += f" s | {events:,} events | {events / elapsed:,.0f} events/s"
        self.stream.write(("\r" + line) if tty else line + "\n")
        if tty and force:
            self.stream.write("\n")
        self.stream.flush()


# Set by the concurrent launcher: progress goes line by line, and Ctrl-C (which only the main
# thread sees) stops every job's driver loop.
JOBS_IN_PARALLEL = threading.Event()
CANCEL = threading.Event()


def _wait(refs: list, num_returns: int) -> list:
    """ray.wait that notices CANCEL: a job interrupted while it waits for its shards."""
    import ray

    while True:
        ready, _ = ray.wait(refs, num_returns=num_returns, timeout=0.5)
        if len(ready) >= num_returns:
            return ready
        if CANCEL.is_set():
            raise KeyboardInterrupt


# --- the driver side ----------------------------------------------------------------------------
def run_shards(scenario: Scenario, cluster, shards: int, progress: Progress | None = None) -> dict:
    """Run the scenario on `shards` Ray actors and merge their results."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    plan = shard_plan(scenario.topo.numa_nodes, shards)
    check_closed_loop(scenario, plan)
    cluster.ensure()
    needed, total = len(plan) * cluster.cpus_per_shard, ray.cluster_resources().get("CPU", 0)
    if needed > total:  # the shards run together (a window's broadcasts go from each to every other)
        per = f"cluster.cpus_per_shard={cluster.cpus_per_shard:g}"
        raise ConfigError("shards", f"{len(plan)} shards x {per} need {needed:g} CPUs at once; the Ray cluster has {total:g}")
    split = len(plan) > 1 and scenario.node_local()
    ref = ray.put(scenario)
    actor_cls = ray.remote(num_cpus=cluster.cpus_per_shard, max_restarts=0)(ShardRunner)
    job = uuid.uuid4().hex[:8]
    attempts = [0] * len(plan)
    # all of a job's shards start together or not at all (jobs of a sweep queue here for CPUs)
    group = placement_group([{"CPU": cluster.cpus_per_shard}] * len(plan), strategy="SPREAD")

    def start(i: int):  # named, so that operators (and tests) can find a shard's actor
        name = f"hvbench-{job}-shard{i}-try{attempts[i]}"
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        return actor_cls.options(name=name, scheduling_strategy=where).remote(ref, plan[i], split)

    actors = []
    try:
        _wait([group.ready()], 1)
        actors = [start(i) for i in range(len(plan))]
        if split and scenario.strategy.on_each_cpu:
            results = _step_windows(actors, plan, start, attempts, cluster.max_retries, progress)
        else:
            results = _gather(actors, plan, start, attempts, cluster.max_retries, progress)
    finally:  # done, failed or interrupted: no actor outlives the job, nor its CPUs
        for a in actors:
            ray.kill(a)
        remove_placement_group(group)
    merged = merge(results, scenario.max_examples, split=split)
    merged["duration_ns"] = results[0]["duration_ns"]
    merged["engine"] = results[0]["engine"]
    merged["shards"] = [
        {"nodes": plan[i], "node_id": r["node_id"], "replay_s": r["replay_s"], "gen_s": r["gen_s"], "split": split}
        for i, r in enumerate(results)
    ]
    return merged


def _shard_error(i: int, plan: list[list[int]], e: Exception) -> Exception:
    """What to raise for a shard's task that raised: the user's trace or config, said plainly."""
    cause = getattr(e, "cause", e)
    if isinstance(cause, TraceError | ConfigError):
        return cause
    return ShardFailed(f"shard {i} (NUMA nodes {plan[i]}) raised {type(cause).__name__}: {cause}")


def _gather(actors: list, plan: list[list[int]], start, attempts: list[int], max_retries: int, progress: Progress | None) -> list[dict]:
    """Drive the actors step by step until every shard has its result; rerun lost shards."""
    import ray

    pending = {a.advance.remote(): i for i, a in enumerate(actors)}
    results: list[dict | None] = [None] * len(plan)
    while pending:
        ready = _wait(list(pending), 1)
        i = pending.pop(ready[0])
        try:
            info = ray.get(ready[0])
            if info["done"]:
                results[i] = ray.get(actors[i].result.remote())
                ray.kill(actors[i])  # frees its CPU for shards still waiting to be placed
            else:
                pending[actors[i].advance.remote()] = i
        except ray.exceptions.RayTaskError as e:
            raise _shard_error(i, plan, e) from e
        except ray.exceptions.RayActorError as e:
            _count_loss(i, plan, attempts, max_retries, e)
            actors[i] = start(i)
            pending[actors[i].advance.remote()] = i
            info = {"events": 0, "sim_ns": 0, "done": False}
        if progress is not None:
            progress.update(i, info, force=not pending)
    return results


def _step_windows(actors: list, plan: list[list[int]], start, attempts: list[int], max_retries: int, progress) -> list[dict]:
    """Split shards with broadcasts: step all of them through the trace together, a window of
    simulated time at a time, passing each window's broadcasts to the other shards. A lost
    actor restarts every shard from the beginning (their windows depend on each other)."""
    import ray

    def call(method: str, args: list) -> list:
        refs = [getattr(a, method).remote(*x) for a, x in zip(actors, args)]
        try:
            _wait(refs, len(refs))
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            i = next(i for i, r in enumerate(refs) if _failed(r))
            raise _shard_error(i, plan, e) from e

    while True:
        try:
            return step_windows(call, len(actors), progress)
        except ray.exceptions.RayActorError as e:
            lost = next(i for i, a in enumerate(actors) if not _alive(a))
            _count_loss(lost, plan, attempts, max_retries, e)
            for i, a in enumerate(actors):
                ray.kill(a)
                attempts[i] = attempts[lost]
                actors[i] = start(i)


def step_windows(call, n: int, progress=None) -> list[dict]:
    """The protocol of split shards with broadcasts: `call(method, args)` calls a ShardRunner
    method on each of the n shards (args[i] for shard i) and returns their results."""
    t_end, done = 0, False
    while not done:
        t_end += ShardRunner.WINDOW_NS
        out = call("ahead", [(t_end,)] * n)
        foreign = [sorted(b for j, o in enumerate(out) if j != i for b in o) for i in range(n)]
        infos = call("replay_window", [(f,) for f in foreign])
        done = all(info["done"] for info in infos)
        for i, info in enumerate(infos):
            if progress is not None:
                progress.update(i, info, force=done and i == n - 1)
    return call("result", [()] * n)


def run_in_process(scenario: Scenario, shards: int) -> dict:
    """run_shards without Ray: every shard in this process, one after another (tests)."""
    plan = shard_plan(scenario.topo.numa_nodes, shards)
    check_closed_loop(scenario, plan)
    split = len(plan) > 1 and scenario.node_local()
    runners = [ShardRunner(scenario, nodes, split) for nodes in plan]
    if split and scenario.strategy.on_each_cpu:
        results = step_windows(lambda method, args: [getattr(r, method)(*a) for r, a in zip(runners, args)], len(runners))
    else:
        results = [r.run() for r in runners]
    return merge(results, scenario.max_examples, split=split)


def check_closed_loop(scenario: Scenario, plan: list[list[int]]) -> None:
    """A closed-loop job is one shard owning every NUMA node: its generator asks the engine
    about every pCPU (orchestrator.scenario.build_scenario refuses shards > 1 already)."""
    if scenario.workload.closed_loop and (len(plan) > 1 or plan[0] != list(range(scenario.topo.numa_nodes))):
        raise ConfigError("workload.closed_loop", f"runs in one shard (generator and engine in lockstep); got {len(plan)} shards")


def _failed(ref) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True


def _alive(actor) -> bool:
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
        return True
    except Exception:
        return False


def _count_loss(i: int, plan: list[list[int]], attempts: list[int], max_retries: int, e: Exception) -> None:
    attempts[i] += 1
    if attempts[i] > max_retries:
        raise ShardFailed(f"shard {i} (NUMA nodes {plan[i]}) failed {attempts[i]} times: {e}") from e
    print(f"[hvbench] shard {i} lost its actor ({type(e).__name__}); retry {attempts[i]}/{max_retries}", file=sys.stderr)
