"""The closed loop (workload.closed_loop=true): flush cost feeds back into the trace.

The open loop (DESIGN.md §3) generates the trace first and replays it after, so the cost of a
strategy is accounted, never felt. Here the reference generator's streams and one engine run in
lockstep: every event a stream emits goes into the engine before the stream next asks it
anything, and the streams ask two things (docs/model.md, "The closed loop"):

* `take_debt(vm, vcpu)`: the flush time (cost.CostModel: INVEPTs, IPIs received and the VM exits
  they force, VMCLEARs, hypercalls, refills: every µs of `flush_overhead_us`) charged to the
  pCPU a vCPU was loaded on, while it was loaded there, since it last asked. The stream pushes
  the end of the vCPU's run stint (or, for vCPU 0 while its VM boots, the boot) back by as
  much (workloads.base.VmFleet.stint_slipped, boot_slipped);
* `load(t)`: the host's flush load, the share of all pCPUs' time charged to flush work in the
  last scheduler tick (TICK_NS) before t; overcommit's wake-up then keeps a vCPU on its idle
  last pCPU less often (workloads.overcommit.SharedCpuset.affinity).

Exactness: the streams read only what the engine computed from the events emitted before the
question, so the run's counters are those of an open-loop replay of the trace it produced, on
either engine (both engines give the same counters on every prefix, so the same trace);
tests/test_closed_loop.py checks both. One shard only: the streams need every pCPU's counters.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Callable, Iterator

import numpy as np

from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, Ev, Trace
from hvmodel.workloads.base import MS, HostCpus, VmFleet, Workload

TICK_NS = 4 * MS  # the window of load(): one scheduler tick at CONFIG_HZ=250 (a modelling choice)


class ClosedLoop:
    """One closed-loop run of `workload` on `topo` for `seed`, driving `engine` (Engine or
    FastEngine, fresh): iterate `trace` once; the engine has then replayed every event, and
    `stats()` says what the loop changed."""

    def __init__(self, workload: Workload, topo: Topology, seed: int, engine, meta: dict | None = None):
        self.workload, self.engine, self.n_cpus = copy.deepcopy(workload), engine, topo.nr_cpus
        self.streams: list[VmFleet] = self.workload.streams(HostCpus(topo), seed, list(range(topo.numa_nodes)))
        for stream in self.streams:
            stream.loop = self
        self.buf: list[tuple] = []  # the running callback's events (its stream's Sim.buf)
        self.fed = 0  # how many of them the engine has
        self.overhead: np.ndarray | None = None  # engine.flush_overhead_us() since the last replay
        # per pCPU: the vCPU loaded there (vm id, index) and its flush_overhead_us when last accounted
        self.owner: list[tuple[int, int] | None] = [None] * topo.nr_cpus
        self.seen = np.zeros(topo.nr_cpus)
        self.cpu_of: dict[tuple[int, int], int] = {}
        self.debt_us: dict[tuple[int, int], float] = {}  # charged, not yet taken
        self.next_tick, self.tick_total, self.tick_load = TICK_NS, 0.0, 0.0
        # what the loop changed (stats())
        self.delay_ns = self.extra_migrations = self.boots = self.boot_ns = 0
        self.replay_s = 0.0  # time spent in the engine
        self.trace = Trace(self._once(), workload.duration_ns, trace_meta(workload, topo, seed, meta))

    # --- the lockstep ---------------------------------------------------------------------
    def _once(self) -> Callable[[], Iterator[np.ndarray]]:
        used = []

        def chunks() -> Iterator[np.ndarray]:
            if used:
                raise RuntimeError("a ClosedLoop's trace can be iterated once (its engine has replayed it): use closed_loop.trace()")
            used.append(True)
            return self.chunks()

        return chunks

    def chunks(self) -> Iterator[np.ndarray]:
        """Run the streams' callbacks in (time, stream) order, the order in which
        workloads.base.reference_chunks merges their events (every event is emitted at its
        callback's time), feeding the engine as they go; chunks of `chunk_events`."""
        for stream in self.streams:
            stream.start()
        out: list[tuple] = []
        while (stream := self._next_stream()) is not None:
            t, _, fn, args = heapq.heappop(stream.sim.heap)
            self.buf, self.fed = stream.sim.buf, 0
            fn(t, *args)
            self.sync()
            out += self.buf
            self.buf.clear()
            while len(out) >= self.workload.chunk_events:
                yield np.array(out[: self.workload.chunk_events], EVENT_DTYPE)
                del out[: self.workload.chunk_events]
        if out:
            yield np.array(out, EVENT_DTYPE)

    def _next_stream(self) -> VmFleet | None:
        due = [(s.sim.heap[0][0], k) for k, s in enumerate(self.streams) if s.sim.heap]
        return self.streams[min(due)[1]] if due else None

    def sync(self) -> None:
        """Replay the running callback's events not yet replayed. The vCPU accounts need the
        pCPU's overhead just before each vcpu_load and just after each vcpu_put, the tick just
        before the first event of a new tick, so the events go in in pieces cut there."""
        rows, start = self.buf, self.fed
        for j in range(self.fed, len(rows)):
            t, kind, vm, i, cpu = rows[j][:5]
            if t >= self.next_tick or kind == Ev.VCPU_LOAD:
                self._replay(rows[start:j])
                start = j
                if t >= self.next_tick:
                    self._tick(t)
                if kind == Ev.VCPU_LOAD:
                    self._loaded((vm, i), cpu)
            if kind == Ev.VCPU_PUT:
                self._replay(rows[start : j + 1])
                start = j + 1
                self._put((vm, i))
        self._replay(rows[start:])
        self.fed = len(rows)

    def _replay(self, rows: list[tuple]) -> None:
        if rows:
            t0 = time.perf_counter()
            self.engine.replay(np.array(rows, EVENT_DTYPE), self.trace)
            self.replay_s += time.perf_counter() - t0
            self.overhead = None

    def _overhead(self) -> np.ndarray:
        if self.overhead is None:
            t0 = time.perf_counter()
            self.overhead = self.engine.flush_overhead_us()
            self.replay_s += time.perf_counter() - t0
        return self.overhead

    # --- vCPU accounts ----------------------------------------------------------------------
    def _account(self, cpu: int) -> None:
        """The flush time charged to `cpu` since it was last accounted is its vCPU's (none:
        an idle pCPU's, which delays nobody)."""
        now = float(self._overhead()[cpu])
        owner = self.owner[cpu]
        if owner is not None:
            self.debt_us[owner] = self.debt_us.get(owner, 0.0) + now - self.seen[cpu]
        self.seen[cpu] = now

    def _loaded(self, key: tuple[int, int], cpu: int) -> None:
        self._account(cpu)
        self.owner[cpu], self.cpu_of[key] = key, cpu

    def _put(self, key: tuple[int, int]) -> None:
        cpu = self.cpu_of.pop(key)
        self._account(cpu)
        self.owner[cpu] = None

    def take_debt(self, vm: int, vcpu: int) -> int:
        """The flush time charged to vCPU `vcpu` of VM `vm` since it last asked, in whole ns."""
        self.sync()
        key = (vm, vcpu)
        if key in self.cpu_of:
            self._account(self.cpu_of[key])
        delay = int(self.debt_us.pop(key, 0.0) * 1000)
        self.delay_ns += delay
        return delay

    # --- the host's flush load --------------------------------------------------------------
    def _tick(self, t: int) -> None:
        """A tick boundary passed and every event replayed is before it: the load of the tick
        that just ended (0 if t is further on: the ticks between had no events)."""
        total = float(self._overhead().sum())
        tick = t // TICK_NS
        fresh = tick * TICK_NS == self.next_tick
        self.tick_load = min(1.0, (total - self.tick_total) / (TICK_NS / 1000 * self.n_cpus)) if fresh else 0.0
        self.tick_total, self.next_tick = total, (tick + 1) * TICK_NS

    def load(self, t: int) -> float:
        """The share of all pCPUs' time charged to flush work in the tick before t's."""
        self.sync()
        if t >= self.next_tick:
            self._tick(t)
        return self.tick_load

    # --- what the loop changed --------------------------------------------------------------
    def booted(self, boot_ns: int) -> None:
        self.boots += 1
        self.boot_ns += boot_ns

    def stats(self) -> dict:
        """For metrics.summarize: the delay the loop applied, the wake-ups it moved off an idle
        last pCPU, the boots that completed and their total length."""
        return {"delay_ns": self.delay_ns, "extra_migrations": self.extra_migrations, "boots": self.boots, "boot_ns": self.boot_ns}


def trace(workload: Workload, topo: Topology, seed: int, make_engine: Callable[[], object], meta: dict | None = None) -> Trace:
    """The closed-loop trace, replayable: each iteration runs the loop afresh against a new
    engine from `make_engine()` (the same trace every time: the run is deterministic)."""

    def chunks() -> Iterator[np.ndarray]:
        return ClosedLoop(workload, topo, seed, make_engine(), meta).chunks()

    return Trace(chunks, workload.duration_ns, trace_meta(workload, topo, seed, meta))


def trace_meta(workload: Workload, topo: Topology, seed: int, extra: dict | None) -> dict:
    """Workload.trace's metadata, marked closed-loop, with `extra` (what else the trace depends
    on: the strategy and the cost model)."""
    return {**workload.trace_meta(topo, seed), "closed_loop": True, **(extra or {})}
