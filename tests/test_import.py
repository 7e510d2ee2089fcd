"""hvbench-import: trace-cmd report / perf script text into an hvbench trace (hvmodel/trace_import.py).

The samples in tests/traces/import/ are one recording in three layouts: `trace-cmd report -N`
(the kernel's TP_printk text, no latency column), recent trace-cmd's default (libtraceevent plugins,
latency column, -t nanoseconds, `version =` header) and `perf script -F comm,pid,tid,cpu,time,
event,trace`. Host: 4 CPUs. VM 1 (pid 1000): vCPU 0 (thread 1001) pinned on CPU 1, running in
guest mode when the recording starts; vCPU 1 (thread 1002) unpinned, on CPU 2, preempted (R+) and
moved to CPU 3 by an idle balance (sched_migrate_task, then sched_switch in). VM 2 (pid 2000):
vCPU 0 (thread 2001) on CPU 3 until it halts (HLT exit, then switched out in S). VM 1's vCPU 1
zaps two shadow pages after an EPT violation (one batch), and its vCPU 0 makes a Hyper-V flush
hypercall (VMCALL exit, kvm_hv_flush_tlb). A kworker and a sched_wakeup are not vCPU activity.
CPU 0 never runs a vCPU thread, so both vm_creates go there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hvmodel.engine import simulate
from hvmodel.fast.engine import FastEngine
from hvmodel.host import Topology
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import EVENT_NAMES, event_to_json, load
from hvmodel.trace_import import Thread, TraceImportError, group_vms, import_trace
from orchestrator.trace_import import main

SAMPLES = Path(__file__).parent / "traces" / "import"
TRACE_CMD = SAMPLES / "two_vms.trace-cmd.txt"
LAYOUTS = ("two_vms.trace-cmd.txt", "two_vms.trace-cmd-plugins.txt", "two_vms.perf.txt")

# derived by hand from the sample, line by line (t in ns from the first line)
EXPECTED = [
    (0, "vm_create", 1, {"pcpu": 0, "vcpus": 2}),  # the VM's first use; CPU 0 runs no vCPU thread
    (0, "vcpu_load", 1, {"vcpu": 0, "pcpu": 1}),  # running on CPU 1 when the recording started...
    (0, "vm_entry", 1, {"vcpu": 0}),  # ... in guest mode: its first own event is kvm_exit
    (0, "vm_exit", 1, {"vcpu": 0, "exit_reason": 1}),  # EXTERNAL_INTERRUPT
    (2000, "vm_entry", 1, {"vcpu": 0}),
    (10000, "vcpu_load", 1, {"vcpu": 1, "pcpu": 2}),  # sched_switch swapper/2 ==> CPU 1/KVM
    (12000, "vm_entry", 1, {"vcpu": 1}),
    (20000, "vm_create", 2, {"pcpu": 0, "vcpus": 1}),  # a second CPU 0/KVM thread: a second VM
    (20000, "vcpu_load", 2, {"vcpu": 0, "pcpu": 3}),
    (22000, "vm_entry", 2, {"vcpu": 0}),
    (30000, "vm_exit", 1, {"vcpu": 1, "exit_reason": 48}),  # EPT_VIOLATION
    (31000, "zap", 1, {"pcpu": 2, "eptp12": 0}),  # two kvm_mmu_prepare_zap_page lines, one batch
    (35000, "vm_entry", 1, {"vcpu": 1}),
    (40000, "vm_exit", 2, {"vcpu": 0, "exit_reason": 12}),  # HLT
    (41000, "vcpu_put", 2, {"vcpu": 0, "reason": "halt"}),  # prev_state=S after HLT
    (50000, "vm_exit", 1, {"vcpu": 1, "exit_reason": 1}),
    (51000, "vcpu_put", 1, {"vcpu": 1, "reason": "preempted"}),  # prev_state=R+
    (53000, "vcpu_load", 1, {"vcpu": 1, "pcpu": 3}),  # after sched_migrate_task 2 -> 3
    (55000, "vm_entry", 1, {"vcpu": 1}),
    (60000, "vm_exit", 1, {"vcpu": 0, "exit_reason": 18}),  # VMCALL
    (61000, "guest_tlb_flush", 1, {"vcpu": 0}),  # kvm_hv_flush_tlb
    (62000, "vm_entry", 1, {"vcpu": 0}),
]


def as_json(trace) -> list[dict]:
    return [event_to_json(rec) for rec in trace.to_array()]


def expected_json() -> list[dict]:
    out = []
    for t, event, vm, fields in EXPECTED:
        obj = {"t_ns": t, "event": event, "vm": vm, **fields}
        if event == "vm_create":
            obj.update(tdp_level=4, node=0)
        out.append(obj)
    return out


def write(tmp_path: Path, text: str, name: str = "t.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def kinds(trace) -> list[str]:
    return [EVENT_NAMES[int(k)] for k in trace.to_array()["kind"]]


# --- the sample, in every layout ------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYOUTS)
def test_sample_maps_to_the_hand_derived_events(name):
    trace, report = import_trace(SAMPLES / name)
    assert as_json(trace) == expected_json()
    assert trace.duration_ns == 62000
    assert report.nr_cpus == 4
    assert [(vm.id, vm.vcpus, [(th.tid, th.vcpu) for th in vm.threads]) for vm in report.vms] == [
        (1, 2, [(1001, 0), (1002, 1)]),
        (2, 1, [(2001, 0)]),
    ]
    assert report.skipped == {"sched_switch between threads that are not vCPUs": 1, "tracepoint sched_wakeup (not mapped)": 1}
    assert not report.fixups
    assert report.put_reasons == {"halt": 1, "preempted": 1}
    assert report.initial == ["CPU 1: vm 1 vcpu 0 (in guest mode)"]


def test_layouts_detected_and_grouped_their_own_way():
    """trace-cmd prints no process id, so its VMs come from the thread-id heuristic; perf's
    pid/tid column gives them directly. Both find the same two VMs."""
    reports = {name: import_trace(SAMPLES / name)[1] for name in LAYOUTS}
    assert [r.fmt for r in reports.values()] == ["trace-cmd", "trace-cmd", "perf"]
    assert [vm.tgid for vm in reports["two_vms.perf.txt"].vms] == [1000, 2000]
    assert [vm.tgid for vm in reports["two_vms.trace-cmd.txt"].vms] == [None, None]
    assert reports["two_vms.trace-cmd.txt"].sized_by == "the cpus= header"
    assert reports["two_vms.perf.txt"].sized_by == "highest CPU seen: 3"


def test_process_id_columns_group_the_vms(tmp_path):
    """perf without -F pid (tid only) falls back to the thread-id rule; the tracefs record-tgid
    column "(tgid)" (or "(-------)" when unknown) groups by process, as perf's pid/tid does."""
    perf = re.sub(r" (\d+)/(\d+) ", r" \2 ", (SAMPLES / "two_vms.perf.txt").read_text())
    tgid = {"1001": "1000", "1002": "1000", "2001": "2000"}
    tracefs = re.sub(r"-(\d+)(\s+)\[", lambda m: f"-{m[1]}{m[2]}({tgid.get(m[1], '-------')}) [", TRACE_CMD.read_text())
    for text, tgids in ((perf, [None, None]), (tracefs, [1000, 2000])):
        trace, report = import_trace(write(tmp_path, text))
        assert as_json(trace) == expected_json()
        assert [vm.tgid for vm in report.vms] == tgids


@pytest.mark.parametrize("engine", [None, FastEngine])
def test_imported_trace_replays_with_hand_derived_counters(engine):
    """4 vcpu_loads, one pCPU change (VM 1's vCPU 1, CPU 2 -> 3), 1 halt, 1 preemption. Exits:
    VM 1 vCPU 0 has 2 of its own plus 1 from the zap's flush IPI (the only vCPU of VM 1 in guest
    mode then); vCPU 1 has 2, VM 2's vCPU 0 has 1. VMCLEAR IPIs: three first loads away from CPU 0,
    where vm_create loaded every VMCS, and the move from CPU 2; none lands in guest mode."""
    trace, _ = import_trace(TRACE_CMD)
    topo = Topology(nr_cpus=4, smt=1, housekeeping_per_node=1, name="t4")
    result, s = simulate(trace, topo, Upstream(), engine=engine)
    pc = result["per_cpu"]
    assert kinds(trace).count("vcpu_load") == 4
    assert (s["pcpu_changes"], int(pc["halts"].sum()), int(pc["preemptions"].sum())) == (1, 1, 1)
    assert pc["vm_exits"].tolist() == [0, 3, 2, 1]
    assert (s["vmexits_from_ipi"], s["ipi_flush"], s["remote_flushes"]) == (1, 1, 1)
    assert pc["ipi_vmclear"].tolist() == [3, 0, 1, 0]
    assert (s["migrations"], s["vmcs_first_loads"]) == (7, 3)  # 3 VMCS loads at creation, 4 vcpu_loads
    assert s["stale_tlb_uses"] == 0 and s["events"] == 22


# --- the CLI ------------------------------------------------------------------------------------------
def test_cli_writes_the_binary_trace_and_reports(tmp_path, capsys):
    out = tmp_path / "host.hvt"
    assert main([str(TRACE_CMD), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert as_json(load(out)) == expected_json()
    assert not (tmp_path / "host.hvt.part").exists()
    assert "  vm 1: pid not in the trace, 2 vCPUs: CPU 0/KVM-1001 -> vcpu 0, CPU 1/KVM-1002 -> vcpu 1" in text
    assert "events written: 22 (vm_entry 7, vm_exit 5, vcpu_load 4, vcpu_put 2, vm_create 2, guest_tlb_flush 1, zap 1)" in text
    assert "       1  tracepoint sched_wakeup (not mapped)" in text
    assert "fix-ups: 0 (none)" in text
    assert f"replay: hvbench workload=trace workload.path={out} host.nr_cpus=4 host.smt=1" in text


@pytest.mark.parametrize("how", [["--host", "x16"], ["host=x16"], ["--cpus", "16"]])
def test_cli_host_size(tmp_path, capsys, how):
    out = tmp_path / "x.hvt"
    assert main([str(TRACE_CMD), "-o", str(out), *how]) == 0
    text = capsys.readouterr().out
    assert json.loads(out.read_bytes().split(b"\n")[1])["meta"]["nr_cpus"] == 16
    assert text.splitlines()[1] == ("host: 16 CPUs (--cpus)" if how[0] == "--cpus" else "host: 16 CPUs (host x16)")
    assert text.rstrip().endswith("host=x16" if "x16" in how[-1] else "host.nr_cpus=16 host.smt=1")


def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


ERRORS = {
    "missing": (lambda p: [str(p / "nope.txt")], "no such file: "),
    "directory": (lambda p: [str(p)], "is a directory"),
    "binary": (lambda p: [str(garbage(p))], "is not text (a NUL byte at offset 0)"),
    "trace.dat": (lambda p: [str(write(p, "\x17\x08\x44tracing6\n", "trace.dat"))], "is a trace-cmd trace.dat: convert it first"),
    "prose": (lambda p: [str(write(p, "hello\nworld\n"))], "no trace-cmd report or perf script event line"),
    "no vCPU": (
        lambda p: [str(write(p, "  bash-7 [000] 1.000000: sched_wakeup: comm=x pid=8 prio=120 target_cpu=000\n"))],
        "no vCPU thread",
    ),
    "wrong format": (lambda p: [str(SAMPLES / "two_vms.perf.txt"), "--format", "trace-cmd"], "it looks like perf output"),
    "host too small": (lambda p: [str(TRACE_CMD), "--cpus", "2"], "the trace uses CPU 3, but --cpus 2 makes a host of 2 CPUs (0-1)"),
    "unknown host": (lambda p: [str(TRACE_CMD), "host=x7"], "host: unknown preset 'x7'; allowed: x16,"),
    "two hosts": (lambda p: [str(TRACE_CMD), "--host", "x16", "--cpus", "4"], "give either a host preset or --cpus"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, case):
    args, message = ERRORS[case]
    out = tmp_path / "out" / "x.hvt"
    (tmp_path / "out").mkdir()
    assert main([*args(tmp_path), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvbench-import: error: ") and message in lines[0], captured.err
    assert list((tmp_path / "out").iterdir()) == []


# --- heuristics and fix-ups -----------------------------------------------------------------------------
def test_grouping_without_tgid_follows_thread_ids():
    """A vCPU index not above the previous thread's starts a new VM; a tgid overrides it."""
    threads = {
        tid: Thread(tid, comm=f"CPU {i}/KVM", first=tid, vcpu=i) for tid, i in [(101, 0), (102, 1), (103, 2), (201, 1), (202, 2), (301, 0)]
    }
    vms, how = group_vms(threads)
    assert [[th.tid for th in vm.threads] for vm in vms] == [[101, 102, 103], [201, 202], [301]]
    assert [vm.vcpus for vm in vms] == [3, 3, 1]  # VM 2's vCPU 0 never ran: it exists, idle
    assert how.startswith("no process id in the trace")
    threads[301].tgid = threads[101].tgid = threads[102].tgid = threads[103].tgid = 100
    vms, how = group_vms(threads)
    # one process: 301 is a second `CPU 0/KVM` thread of that VM (re-created), the same vCPU 0
    assert [[(th.tid, th.vcpu) for th in vm.threads] for vm in vms] == [[(101, 0), (301, 0), (102, 1), (103, 2)], [(201, 1), (202, 2)]]
    assert how.startswith("no process id in the trace")  # 201 and 202 still have none


MAIN_THREAD_ZAP = {
    "trace-cmd": "qemu-system-x86-1000  [000]  5000.000070: kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 1 used_pages 2a\n",
    "perf": "  qemu-system-x86    1000/1000    [000]  5000.000070:  kvmmmu:kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 1 used_pages 2a\n",
}


@pytest.mark.parametrize("fmt", MAIN_THREAD_ZAP)
def test_host_event_of_a_vmm_thread_needs_the_process_id(tmp_path, fmt):
    """kvm_mmu_zap_all_fast (a memslot change) from QEMU's main thread: perf's pid/tid says which VM
    it is, trace-cmd's thread id alone cannot with two VMs, so the line is skipped and reported."""
    sample = SAMPLES / ("two_vms.perf.txt" if fmt == "perf" else "two_vms.trace-cmd.txt")
    lines = sample.read_text().splitlines(keepends=True)
    path = write(tmp_path, "".join(lines[:-2]) + MAIN_THREAD_ZAP[fmt] + "".join(lines[-2:]))
    trace, report = import_trace(path)
    events = as_json(trace)
    if fmt == "perf":
        assert events[-1] == {"t_ns": 70000, "event": "memslot_delete", "vm": 1, "pcpu": 0}
        assert report.used["kvm_mmu_zap_all_fast"] == 1
    else:
        assert events == expected_json()
        assert report.skipped["kvm_mmu_zap_all_fast: thread qemu-system-x86-1000 belongs to no known VM (no tgid, 2 VMs)"] == 1


DROPPED = (
    "cpus=3\n"
    "  CPU 0/KVM-1001  [001]  10.000000: kvm_entry:            vcpu 0, rip 0x1\n"
    "CPU:1 [4 EVENTS DROPPED]\n"
    "  kworker/1:0-40 [001] 10.000010: sched_switch: prev_comm=kworker/1:0 prev_pid=40 prev_prio=120 prev_state=I"
    " ==> next_comm=swapper/1 next_pid=0 next_prio=120\n"
    "  CPU 0/KVM-1001  [002]  10.000020: kvm_exit:             vcpu 0 reason HLT rip 0x1 info1 0x0 info2 0x0 intr_info 0x0 error_code 0x0\n"
)


def test_lost_events_are_fixed_up_and_reported(tmp_path):
    """The ring buffer dropped vCPU 0's switch out on CPU 1 (a kworker runs there next) and its
    switch in on CPU 2 (it exits there): a vcpu_put and a vcpu_load are added."""
    trace, report = import_trace(write(tmp_path, DROPPED))
    assert as_json(trace) == [
        {"t_ns": 0, "event": "vm_create", "vm": 1, "pcpu": 0, "vcpus": 1, "tdp_level": 4, "node": 0},
        {"t_ns": 0, "event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 1},
        {"t_ns": 0, "event": "vm_entry", "vm": 1, "vcpu": 0},
        {"t_ns": 10000, "event": "vcpu_put", "vm": 1, "vcpu": 0},
        {"t_ns": 20000, "event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 2},
        {"t_ns": 20000, "event": "vm_exit", "vm": 1, "vcpu": 0, "exit_reason": 12},
    ]
    assert report.fixups == {
        "vcpu_put added: another task ran on its CPU (its sched_switch out is missing)": 1,
        "vcpu_load added: the vCPU thread ran with no sched_switch in": 1,
    }
    assert report.notes == {"kvm_exit with no kvm_entry since the vCPU was loaded": 1}
    assert report.dropped == {1: 4}
    assert "WARNING: the ring buffer dropped events on CPU 1 (4)" in report.render()
    simulate(trace, Topology(nr_cpus=3, smt=1, housekeeping_per_node=1), Upstream())  # replays


def zap_in_guest_mode(cpus: int) -> str:
    """vCPU 0 enters on the last CPU, then zaps there with no kvm_exit recorded."""
    c = cpus - 1
    return (
        f"cpus={cpus}\n"
        f"  CPU 0/KVM-1001  [{c:03d}]  10.000000: kvm_entry:            vcpu 0, rip 0x1\n"
        f"  CPU 0/KVM-1001  [{c:03d}]  10.000005: kvm_mmu_prepare_zap_page: sp gen 0 gfn 1 l1 8-byte q0 direct wux nxe ad root 0 sync\n"
    )


def test_host_event_moves_to_a_free_cpu(tmp_path):
    """A zap cannot run where a vCPU is in guest mode: it moves to CPU 0, which runs no vCPU."""
    trace, report = import_trace(write(tmp_path, zap_in_guest_mode(2)))
    assert kinds(trace) == ["vm_create", "vcpu_load", "vm_entry", "zap"]
    assert trace.to_array()["pcpu"].tolist() == [0, 1, -1, 0]
    assert report.fixups == {"zap moved to a free host CPU: its own CPU was in guest mode": 1}
    simulate(trace, Topology(nr_cpus=2, smt=1, housekeeping_per_node=1), Upstream())


def test_host_event_with_no_free_cpu_is_skipped(tmp_path):
    trace, report = import_trace(write(tmp_path, zap_in_guest_mode(1)))
    assert kinds(trace) == ["vm_create", "vcpu_load", "vm_entry"]
    assert report.skipped == {"kvm_mmu_prepare_zap_page: every host CPU is in guest mode": 1}


def test_blocked_after_a_non_hlt_exit_is_not_a_halt(tmp_path):
    """S after an I/O exit is the thread waiting outside KVM_RUN, not kvm_vcpu_halt()."""
    text = (
        "  CPU 0/KVM-1001  [001]  1.000000: kvm_entry: vcpu 0, rip 0x1\n"
        "  CPU 0/KVM-1001  [001]  1.000001: kvm_exit: vcpu 0 reason IO_INSTRUCTION rip 0x1 info1 0x0 info2 0x0\n"
        "  CPU 0/KVM-1001  [001]  1.000002: sched_switch: prev_comm=CPU 0/KVM prev_pid=1001 prev_prio=120 prev_state=S"
        " ==> next_comm=swapper/1 next_pid=0 next_prio=120\n"
    )
    trace, report = import_trace(write(tmp_path, text))
    assert as_json(trace)[-2:] == [
        {"t_ns": 1000, "event": "vm_exit", "vm": 1, "vcpu": 0, "exit_reason": 30},
        {"t_ns": 2000, "event": "vcpu_put", "vm": 1, "vcpu": 0},
    ]
    assert report.put_reasons == {"unknown": 1}
    assert report.sized_by == "highest CPU seen: 1" and report.nr_cpus == 2


def test_unreadable_format_argument():
    with pytest.raises(TraceImportError, match="unknown format 'csv'"):
        import_trace(TRACE_CMD, fmt="csv")
    assert np.array_equal(import_trace(TRACE_CMD, fmt="trace-cmd")[0].to_array(), import_trace(TRACE_CMD)[0].to_array())
