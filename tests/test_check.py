"""hvbench-check (hvmodel/check.py, orchestrator/check.py): the bounded exhaustive search.

Host: 2 pCPUs (P0 creates the VM, whose vmcs01 is loaded there), one VM of one vCPU, one
EPTP12. Each expected counter-example below was derived by hand; the search must find one of
exactly that length (breadth first: none shorter exists), of the same hazard kind, and the
reference engine must agree that it is stale.
"""

import json

import numpy as np
import pytest

from hvmodel.check import alphabet, check, creation
from hvmodel.engine import simulate
from hvmodel.fast.engine import FastEngine
from hvmodel.host import Topology
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import EVENT_DTYPE, Ev, Trace
from orchestrator import check as cli

from controls import CurrentRootOnly, NoMigrationFlush, RootMmuOnly

HOST = Topology(nr_cpus=2, smt=1, housekeeping_per_node=1, name="check2")

# load P1, entry (the root R is loaded and flushed on P1), put, load P0, entry, zap on P1 (its
# remote flush kicks P0 only: no VMCS of the VM is on P1, so P1 keeps R's old entries), put,
# load P1: without a migration flush, the entry uses them (h4). The search finds it mirrored.
NO_MIGRATION_FLUSH = 9
# load P0, entry (R on page p, cached on P0), put, load P1, nested_vmenter (a shadow-EPT root
# S), memslot_delete (every root obsolete; R, now unused, is freed: p back to the pool), entry
# (a new guest_mmu root takes p), put, load P0: the migration flush covers root_mmu's current
# root only, and the entry into the new root on p finds R's entries there (h1).
SHADOW_ROOT_FORGOTTEN = 10
# E: a pCPU's bit in a root's mask is set when E flushes the root there on a VMCS move, not at
# the root's first load. So: load P0, entry (R), put, load P1 (move: flush R on P1, bit P1),
# entry, put, load P0 (move: flush on P0, bit P0), entry, zap on P1 (kicks P0 only; P1 keeps
# R's entries: the mask still has P1), put, load P1 (bit set: no flush), entry: h4.
PER_ROOT_CPUMASK = 12


@pytest.mark.parametrize(
    "strategy,length,kind",
    [
        (NoMigrationFlush, NO_MIGRATION_FLUSH, "h4"),
        (CurrentRootOnly, SHADOW_ROOT_FORGOTTEN, "h1"),
        (RootMmuOnly, SHADOW_ROOT_FORGOTTEN, "h1"),
        (PerRootCpumask, PER_ROOT_CPUMASK, "h4"),
    ],
)
def test_finds_the_known_counterexample_at_its_minimal_length(strategy, length, kind):
    r = check(HOST, strategy, [1], depth=12)
    assert r.counterexample is not None and r.complete
    assert (r.depth, len(r.counterexample) - 1, r.kind) == (length, length, kind)
    _, s = simulate(Trace.from_array(r.counterexample), HOST, strategy())  # the reference engine
    assert s["stale_tlb_uses"] == 1 and s[f"stale_tlb_uses_{kind}"] == 1
    _, clean = simulate(Trace.from_array(r.counterexample), HOST, Upstream())
    assert clean["stale_tlb_uses"] == 0


def test_upstream_has_no_stale_use_in_any_sequence_up_to_12_events():
    r = check(HOST, Upstream, [1], depth=12)
    assert r.counterexample is None and r.complete and r.depth == 12
    assert r.states > 10_000 and r.sequences > r.states


def test_the_time_limit_says_how_deep_it_got():
    r = check(HOST, Upstream, [1], depth=30, time_limit_s=0.5)
    assert not r.complete and r.counterexample is None and 0 < r.depth < 30


def _state(events: list[tuple]) -> FastEngine:
    eng = FastEngine(HOST, Upstream())
    trace = np.zeros(len(events), EVENT_DTYPE)
    for k, name in enumerate(("kind", "vm", "vcpu", "pcpu", "arg")):
        trace[name] = [e[k] for e in events]
    trace["time_ns"] = np.arange(len(events))
    eng.state.replay(np.concatenate([creation([1]), trace]))
    return eng.state


def test_states_that_differ_only_in_numbering_are_one_state():
    """Two memslot deletes replace the root twice: the root's slot, serial, page and epoch
    differ from a single delete's, but what any future sees is the same. A zap (epoch++) while
    the vCPU is out of guest mode leaves a pending flush: another state."""
    run = [(Ev.VCPU_LOAD, 1, 0, 1, 0), (Ev.VM_ENTRY, 1, 0, -1, 0), (Ev.VCPU_PUT, 1, 0, -1, 0)]
    delete = [(Ev.MEMSLOT_DELETE, 1, -1, 0, 0), (Ev.VCPU_LOAD, 1, 0, 1, 0), (Ev.VM_ENTRY, 1, 0, -1, 0), (Ev.VCPU_PUT, 1, 0, -1, 0)]
    once, twice = _state(run + delete), _state(run + delete + delete)
    assert once.digest() == twice.digest()
    assert _state(run + delete + [(Ev.ZAP, 1, -1, 0, 0)]).digest() != once.digest()


def test_alphabet_has_every_vcpu_and_host_event():
    letters = alphabet(HOST, [1, 2])
    kinds = set(letters["kind"].tolist())
    assert kinds == set(Ev) - {Ev.VM_CREATE, Ev.VM_DESTROY}
    assert sorted(set(zip(letters["vm"].tolist(), letters["vcpu"].tolist())) - {(1, -1), (2, -1)}) == [(1, 0), (2, 0), (2, 1)]


def test_cli_writes_each_counterexample_and_its_table(tmp_path, capsys):
    assert cli.main(["--strategies", "upstream,ipi_all_on_alloc_elide", "--depth", "9", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("upstream ", "ipi_all_on_alloc_elide "))}
    assert "no stale use in every sequence up to 9 events" in rows["upstream"]
    assert "UNSAFE" in rows["ipi_all_on_alloc_elide"] and "9 events" in rows["ipi_all_on_alloc_elide"]
    lines = (tmp_path / "check-ipi_all_on_alloc_elide.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["event"] == "vm_create"
    assert "the reference engine agrees: yes" in out
    assert not (tmp_path / "check-upstream.jsonl").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "nope"], "--strategies: unknown 'nope'; allowed: "),
        (["--strategies", "hyperv_flush_hypercall"], "--strategies: hyperv_flush_hypercall does not run on bare_metal"),
        (["--vcpus", "3"], "--vcpus: must be in 1..2, got 3"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hvbench-check: error: " + message)


@pytest.mark.parametrize("strategy", [Upstream, PerRootCpumask, NoMigrationFlush])
def test_merged_states_have_the_same_futures(strategy):
    """The key's soundness: states reached by different sequences that the search merges must
    accept the same events and show the same stale uses on every continuation. 200 merged
    pairs from depth 6, each followed by the same 8 random events."""
    import random

    letters = alphabet(HOST, [1])
    records = [tuple(rec.tolist()[1:]) for rec in letters]
    first: dict[bytes, list[int]] = {}
    pairs = []
    frontier = [[]]
    for _ in range(6):
        nxt = []
        for path in frontier:
            for k, stale, _, digest in _replay(strategy, letters[path]).expand(letters):
                if stale:
                    continue
                if digest in first:
                    if first[digest] != [*path, k]:
                        pairs.append((first[digest], [*path, k]))
                else:
                    first[digest] = [*path, k]
                    nxt.append([*path, k])
        frontier = nxt
    rng = random.Random(0)
    assert len(pairs) > 200
    for a, b in rng.sample(pairs, 200):
        x, y = _replay(strategy, letters[a]), _replay(strategy, letters[b])
        for _ in range(8):
            k = rng.randrange(len(records))
            ok_x, ok_y = x.copy().step(*records[k]), y.copy().step(*records[k])
            assert ok_x == ok_y, (a, b, records[k])
            if ok_x:
                x.step(*records[k]), y.step(*records[k])
                assert x.stale_uses()[0] == y.stale_uses()[0] and x.digest() == y.digest(), (a, b)


def _replay(strategy, events: np.ndarray):
    eng = FastEngine(HOST, strategy(), max_examples=1).state
    trace = np.concatenate([creation([1]), events])
    trace["time_ns"] = np.arange(len(trace))
    eng.replay(np.ascontiguousarray(trace))
    return eng
