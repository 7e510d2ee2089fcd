"""Real host traces into hvbench traces: `trace-cmd report` text, or `perf script` text of the same
tracepoints (docs/trace-format.md, "Importing real traces"). The CLI is orchestrator/trace_import.py.

Once the layout is known (the first event line decides), two passes over the file. The first
finds the threads: a thread named `CPU N/KVM` (QEMU's vCPU thread name, qemu_thread_create() in
kvm_start_vcpu_thread()) is vCPU N, its process a VM; it also finds the host size, the first
timestamp and who was running on each CPU when the recording started. The second turns lines
into events while it keeps the replay's preconditions (hvmodel/engine.py, hvmodel/kvm.py) true:
it tracks which vCPU is loaded where and which is in guest mode, and adds the events a real
trace implies but does not show (every one is counted in the report as a fix-up).

Tracepoint formats relied on (TP_printk in the kernel, or the libtraceevent plugin that
trace-cmd and perf load by default):
- kvm_entry, kvm_exit, kvm_hv_flush_tlb, kvm_hv_flush_tlb_ex: arch/x86/kvm/trace.h. Used: the
  line's CPU and thread, `reason NAME` of kvm_exit (VMX_EXIT_REASONS, arch/x86/include/uapi/asm/
  vmx.h; plugin_kvm.c kvm_exit_handler() prints `reason UNKNOWN (N)` for others), and `vcpu N`
  (vcpu->vcpu_id) only for a thread not named `CPU N/KVM`: QEMU's vcpu_id is the APIC ID, which
  need not be the contiguous cpu_index of the thread's name.
- kvm_mmu_prepare_zap_page, kvm_mmu_zap_all_fast: arch/x86/kvm/mmu/mmutrace.h (system
  `kvmmmu`); kvm_mmu_zap_page is the first's name in older kernels.
- sched_switch, sched_migrate_task: include/trace/events/sched.h, and libtraceevent's
  plugins/plugin_sched_switch.c (sched_switch_handler()) for trace-cmd's default sched_switch.

This module must not import hydra, ray, mlflow or omegaconf (tests/test_layering.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvmodel.trace import EVENT_DTYPE, EVENT_NAMES, KVM_MAX_VCPUS, PUT_HALT, PUT_PREEMPTED, PUT_REASONS, Ev, Trace, pack_vm_create

FORMATS = ("auto", "trace-cmd", "perf")
NR_CPUS_MAX = 8192  # hvmodel.host.NR_CPUS_MAX, without importing the host model
PUT_UNKNOWN = 0

# --- line layouts ---------------------------------------------------------------------------
# trace-cmd report, tracecmd/trace-read.c trace_show_data(): "%16s-%-5d [%03d]" (comm-pid [cpu]),
# the latency column (TEP_PRINT_LATENCY, "d..1.", printed by default since trace-cmd's "Add interrupt
# info in output", January 2024), the
# time ("%5lu.%06lu"; 9 decimals with -t), "(+delta)" with --ts-diff, then print_event_name()
# " %s: " padded to 20 columns and the event's text. The kernel's own tracefs `trace` file has
# the same layout, plus "(tgid)" after comm-pid with options/record-tgid.
TRACE_CMD_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\s*\)\s+)?\[(?P<cpu>\d+)\]\s+(?:[^\s:]+\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?:\(\+\d+\)\s+)?(?P<event>\w+):\s*(?P<body>.*)$"
)
# perf script, tools/perf/builtin-script.c perf_sample__fprintf_start(): "%16s " comm, "%7d/%-7d "
# pid/tid (-F pid,tid) or "%7d " tid (the default), "[%03d] " cpu, "%12s: " time (usecs; 9
# decimals with --ns), then process_event() prints the event as "%*s: " "subsystem:event".
PERF_LINE = re.compile(
    r"^\s*(?P<comm>.*?)\s+(?:(?P<tgid>-?\d+)/)?(?P<pid>-?\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+"
    r"(?:\d+\s+)?(?P<sys>\w+):(?P<event>\w+):\s*(?P<body>.*)$"
)
LAYOUTS = {"trace-cmd": TRACE_CMD_LINE, "perf": PERF_LINE}
# trace-cmd report's own lines: "cpus=N" (read_data_info()), "version = N" (--version), "CPU N is
# empty", "CPU:N [M EVENTS DROPPED]" (a ring buffer overran: events of that CPU are missing)
CPUS_HEADER = re.compile(r"^cpus=(\d+)\s*$")
DROPPED = re.compile(r"^CPU:\s*(\d+)\s+\[(?:(\d+)\s+)?EVENTS DROPPED\]")
HEADER = re.compile(r"^(version = \S+|CPU \d+ is empty|cpus=\d+)\s*$")

# --- event bodies ---------------------------------------------------------------------------
# sched_switch TP_printk: "prev_comm=%s prev_pid=%d prev_prio=%d prev_state=%s%s ==> next_comm=%s
# next_pid=%d next_prio=%d" (prev_state "R", "R+" when preempted, "S", "D", ...; comms may hold spaces)
SWITCH_RAW = re.compile(
    r"prev_comm=(?P<prev_comm>.*?) prev_pid=(?P<prev_pid>\d+) prev_prio=-?\d+ prev_state=(?P<prev_state>\S+)"
    r" ==> next_comm=(?P<next_comm>.*?) next_pid=(?P<next_pid>\d+)"
)
# plugin_sched_switch.c sched_switch_handler(): "%s:%d [%d] %c ==> %s:%d [%d]"
SWITCH_PLUGIN = re.compile(
    r"^(?P<prev_comm>.*?):(?P<prev_pid>\d+) \[-?\d+\] (?P<prev_state>\S+) ==> (?P<next_comm>.*?):(?P<next_pid>\d+) \[-?\d+\]"
)
# sched_migrate_task TP_printk: "comm=%s pid=%d prio=%d orig_cpu=%d dest_cpu=%d"
MIGRATE = re.compile(r"comm=(?P<comm>.*?) pid=(?P<pid>\d+) prio=-?\d+ orig_cpu=(?P<orig>\d+) dest_cpu=(?P<dest>\d+)")
# kvm_exit TP_printk "vcpu %u reason %s%s%s rip ..." (older: "reason %s rip ..."); plugin_kvm.c
# kvm_exit_handler() "reason %s rip ..." or "reason UNKNOWN (%llu)"
EXIT_REASON = re.compile(r"reason (?P<name>\S+)(?: \((?P<num>\d+)\))?")
VCPU_FIELD = re.compile(r"^vcpu (\d+)")  # kvm_entry/kvm_exit: "vcpu %u" = vcpu->vcpu_id
VCPU_COMM = re.compile(r"^CPU (\d+)/KVM$")

# VMX basic exit reasons by VMX_EXIT_REASONS name (arch/x86/include/uapi/asm/vmx.h); PENDING_INTERRUPT
# is INTERRUPT_WINDOW's name before Linux 5.5
VMX_EXIT_REASONS = {
    "EXCEPTION_NMI": 0, "EXTERNAL_INTERRUPT": 1, "TRIPLE_FAULT": 2, "INIT_SIGNAL": 3, "SIPI_SIGNAL": 4,
    "INTERRUPT_WINDOW": 7, "PENDING_INTERRUPT": 7, "NMI_WINDOW": 8, "TASK_SWITCH": 9, "CPUID": 10, "HLT": 12,
    "INVD": 13, "INVLPG": 14, "RDPMC": 15, "RDTSC": 16, "VMCALL": 18, "VMCLEAR": 19, "VMLAUNCH": 20, "VMPTRLD": 21,
    "VMPTRST": 22, "VMREAD": 23, "VMRESUME": 24, "VMWRITE": 25, "VMOFF": 26, "VMON": 27, "CR_ACCESS": 28,
    "DR_ACCESS": 29, "IO_INSTRUCTION": 30, "MSR_READ": 31, "MSR_WRITE": 32, "INVALID_STATE": 33, "MSR_LOAD_FAIL": 34,
    "MWAIT_INSTRUCTION": 36, "MONITOR_TRAP_FLAG": 37, "MONITOR_INSTRUCTION": 39, "PAUSE_INSTRUCTION": 40,
    "MCE_DURING_VMENTRY": 41, "TPR_BELOW_THRESHOLD": 43, "APIC_ACCESS": 44, "EOI_INDUCED": 45, "GDTR_IDTR": 46,
    "LDTR_TR": 47, "EPT_VIOLATION": 48, "EPT_MISCONFIG": 49, "INVEPT": 50, "RDTSCP": 51, "PREEMPTION_TIMER": 52,
    "INVVPID": 53, "WBINVD": 54, "XSETBV": 55, "APIC_WRITE": 56, "RDRAND": 57, "INVPCID": 58, "VMFUNC": 59,
    "ENCLS": 60, "RDSEED": 61, "PML_FULL": 62, "XSAVES": 63, "XRSTORS": 64, "UMWAIT": 67, "TPAUSE": 68,
    "BUS_LOCK": 74, "NOTIFY": 75, "TDCALL": 77,
}  # fmt: skip
EXIT_HLT = VMX_EXIT_REASONS["HLT"]

VCPU_EVENTS = ("kvm_entry", "kvm_exit")
ZAP_EVENTS = {"kvm_mmu_prepare_zap_page": Ev.ZAP, "kvm_mmu_zap_page": Ev.ZAP, "kvm_mmu_zap_all_fast": Ev.MEMSLOT_DELETE}
HV_FLUSH_EVENTS = ("kvm_hv_flush_tlb", "kvm_hv_flush_tlb_ex")
BINARY_MAGICS = {
    b"\x17\x08\x44tracing": "a trace-cmd trace.dat: convert it first with `trace-cmd report -i FILE > FILE.txt`",
    b"PERFILE2": "a perf.data file: convert it first with `perf script -i FILE > FILE.txt`",
    b"HVTRACE1\n": "already an hvbench binary trace: replay it with `hvbench workload=trace workload.path=FILE`",
}


class TraceImportError(ValueError):
    """An input the importer cannot read; the message is one line."""


@dataclass
class Line:
    """One event line: the task current on `cpu` (comm, pid = thread id, tgid if printed)."""

    lineno: int
    comm: str
    pid: int
    tgid: int | None
    cpu: int
    ts_ns: int
    event: str
    body: str


@dataclass
class Thread:
    tid: int
    comm: str = ""
    first: int = 0  # line of its first appearance
    vcpu: int | None = None  # vCPU index; None: not a vCPU thread
    named: bool = False  # vCPU by its `CPU N/KVM` comm (else by the `vcpu N` of its kvm_entry/kvm_exit)
    tgid: int | None = None
    vm: int | None = None


@dataclass
class VmInfo:
    id: int
    tgid: int | None
    threads: list[Thread]

    @property
    def vcpus(self) -> int:
        return max(th.vcpu for th in self.threads) + 1


@dataclass
class ImportReport:
    """What the importer mapped, skipped and fixed up; `render()` is the CLI's report."""

    source: str
    fmt: str = ""
    nr_cpus: int = 0
    sized_by: str = ""
    lines: int = 0
    event_lines: int = 0
    grouping: str = ""
    vms: list[VmInfo] = field(default_factory=list)
    initial: list[str] = field(default_factory=list)
    mapped: Counter = field(default_factory=Counter)  # hvbench event kind -> events written
    used: Counter = field(default_factory=Counter)  # tracepoint -> lines mapped
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    fixups: Counter = field(default_factory=Counter)  # what was added or moved -> times
    notes: Counter = field(default_factory=Counter)  # kept as is, but worth knowing
    put_reasons: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # CPU -> events the ring buffer dropped
    not_understood: int = 0
    header_cpus: int | None = None  # trace-cmd's cpus= line

    def render(self) -> str:
        out = [
            f"{self.source}: {self.fmt} text, {self.lines} lines, {self.event_lines} event lines",
            f"host: {self.nr_cpus} CPUs ({self.sized_by})",
            f"VMs: {self.grouping}",
        ]
        out += [
            f"  vm {vm.id}: {_vm_key(vm)}, {vm.vcpus} vCPU{'s' if vm.vcpus > 1 else ''}: " + ", ".join(_thread(th) for th in vm.threads)
            for vm in self.vms
        ]
        if self.initial:
            out.append("running when the recording started: " + "; ".join(self.initial))
        out.append(f"events written: {sum(self.mapped.values())} ({_counts(self.mapped)})")
        out.append(f"vcpu_put reasons: {_counts(self.put_reasons)}")
        out.append(f"lines mapped: {sum(self.used.values())} ({_counts(self.used)})")
        out.append(_section("lines skipped", self.skipped, self.not_understood))
        out.append(_section("fix-ups", self.fixups))
        if self.notes:
            out.append(_section("notes", self.notes))
        if self.dropped:
            out.append("WARNING: the ring buffer dropped events on CPU " + ", ".join(f"{c} ({n})" for c, n in sorted(self.dropped.items())))
        return "\n".join(out)


def _vm_key(vm: VmInfo) -> str:
    return f"pid {vm.tgid}" if vm.tgid is not None else "pid not in the trace"


def _thread(th: Thread) -> str:
    return f"{th.comm or '?'}-{th.tid} -> vcpu {th.vcpu}"


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "none"


def _section(title: str, c: Counter, extra: int = 0) -> str:
    lines = [f"{title}: {sum(c.values()) + extra}" + ("" if c or extra else " (none)")]
    lines += [f"  {n:6d}  {reason}" for reason, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
    if extra:
        lines.append(f"  {extra:6d}  not an event line of this format (ignored)")
    return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------
def _check_text(path: Path) -> None:
    """One-line errors for a missing file, a directory, or binary data."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except FileNotFoundError:
        raise TraceImportError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise TraceImportError(f"{path} is a directory, not a trace") from None
    except OSError as e:
        raise TraceImportError(f"cannot read {path}: {e.strerror}") from None
    for magic, what in BINARY_MAGICS.items():
        if head.startswith(magic):
            raise TraceImportError(f"{path} is {what.replace('FILE', str(path))}")
    nul = head.find(b"\0")
    if nul >= 0:
        raise TraceImportError(f"{path} is not text (a NUL byte at offset {nul}): expected trace-cmd report or perf script output")


def _raw_lines(path: Path) -> Iterator[tuple[int, str]]:
    # errors="replace": a comm is any 15 bytes; a stray byte must not stop the import
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, 1):
            yield lineno, raw.rstrip("\n")


def _detect(path: Path) -> str | None:
    """The layout of the first line that matches one (the two cannot match the same line)."""
    for _, text in _raw_lines(path):
        for fmt, layout in LAYOUTS.items():
            if layout.match(text):
                return fmt
    return None


def detect_format(path: Path) -> str:
    fmt = _detect(path)
    if fmt is not None:
        return fmt
    raise TraceImportError(
        f"{path}: no trace-cmd report or perf script event line "
        "(expected e.g. '  CPU 0/KVM-1234  [003]  12.345678: kvm_entry: vcpu 0, rip 0x...')"
    )


def _ns(ts: str) -> int:
    secs, _, frac = ts.partition(".")
    return int(secs) * 1_000_000_000 + int((frac + "000000000")[:9])


def _tgid(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() and int(text) > 0 else None


def parse_line(lineno: int, text: str, layout: re.Pattern) -> Line | None:
    m = layout.match(text)
    if m is None:
        return None
    return Line(lineno, m["comm"].strip(), int(m["pid"]), _tgid(m["tgid"]), int(m["cpu"]), _ns(m["ts"]), m["event"], m["body"])


def read_lines(path: Path, fmt: str, report: ImportReport | None = None) -> Iterator[Line]:
    """Event lines of `fmt`; header and drop markers are counted into `report` if given."""
    layout = LAYOUTS[fmt]
    for lineno, text in _raw_lines(path):
        line = parse_line(lineno, text, layout)
        if line is not None:
            yield line
        elif report is not None:
            _other_line(text.strip(), report)


def _other_line(text: str, report: ImportReport) -> None:
    report.lines += 1
    if m := CPUS_HEADER.match(text):
        report.header_cpus = int(m[1])
    elif m := DROPPED.match(text):
        report.dropped[int(m[1])] += int(m[2] or 1)
    elif text and not text.startswith("#") and not HEADER.match(text):
        report.not_understood += 1


# --- pass 1: threads, VMs, host size, the state at the start ------------------------------------
@dataclass
class Scan:
    threads: dict[int, Thread] = field(default_factory=dict)
    t0: int | None = None
    max_cpu: int = -1
    first_on_cpu: dict[int, tuple[int, int]] = field(default_factory=dict)  # cpu -> (line, tid current there first)
    undecided: dict[int, int] = field(default_factory=dict)  # tid -> cpu: running at the start, guest mode not known yet
    started: set[int] = field(default_factory=set)  # tids already current on some CPU's first line
    start_in_guest: set[int] = field(default_factory=set)
    ran_on: dict[int, set[int]] = field(default_factory=dict)  # cpu -> tids current or switched in there
    vcpu_field: dict[int, int] = field(default_factory=dict)  # tid -> `vcpu N` of its first kvm_entry/kvm_exit

    def see(self, tid: int, comm: str, lineno: int, tgid: int | None = None) -> Thread:
        th = self.threads.get(tid)
        if th is None:
            th = self.threads[tid] = Thread(tid, first=lineno)
        if comm and comm != "<...>" and not th.named:  # trace-cmd prints <...> for a pid it has no comm for
            th.comm = comm
            if (m := VCPU_COMM.match(comm)) and tid > 0:
                th.vcpu, th.named = int(m[1]), True
        if tgid is not None:
            th.tgid = tgid
        return th


def scan(path: Path, fmt: str, report: ImportReport) -> Scan:
    s = Scan()
    for line in read_lines(path, fmt, report):
        report.lines += 1
        report.event_lines += 1
        _scan_line(s, line)
    if s.t0 is None:
        other = next(f for f in LAYOUTS if f != fmt)
        hint = f": it looks like {other} output (--format auto finds it)" if _detect(path) == other else ""
        raise TraceImportError(f"{path}: no {fmt} event lines{hint}")
    for tid, idx in s.vcpu_field.items():  # a VMM that does not name its threads `CPU N/KVM`
        th = s.threads[tid]
        if th.vcpu is None:
            th.vcpu = idx
    for th in s.threads.values():
        if th.vcpu is not None and th.vcpu >= KVM_MAX_VCPUS:
            report.notes[f"thread {th.tid}: vCPU index {th.vcpu} >= {KVM_MAX_VCPUS} (KVM_MAX_VCPUS): not a vCPU"] += 1
            th.vcpu = None
    return s


def _scan_line(s: Scan, line: Line) -> None:
    s.t0 = line.ts_ns if s.t0 is None else s.t0
    s.max_cpu = max(s.max_cpu, line.cpu)
    s.see(line.pid, line.comm, line.lineno, line.tgid)
    s.ran_on.setdefault(line.cpu, set()).add(line.pid)
    if line.cpu not in s.first_on_cpu:
        s.first_on_cpu[line.cpu] = (line.lineno, line.pid)
        if line.pid not in s.started:  # only its first CPU: it cannot have run on two at the start
            s.started.add(line.pid)
            s.undecided[line.pid] = line.cpu
    if line.event == "sched_switch" and (m := _switch(line.body)):
        s.see(int(m["prev_pid"]), m["prev_comm"], line.lineno)
        s.see(int(m["next_pid"]), m["next_comm"], line.lineno)
        s.ran_on[line.cpu].add(int(m["next_pid"]))
    elif line.event == "sched_migrate_task" and (m := MIGRATE.search(line.body)):
        s.see(int(m["pid"]), m["comm"], line.lineno)
    elif line.event in VCPU_EVENTS and (m := VCPU_FIELD.match(line.body)):
        s.vcpu_field.setdefault(line.pid, int(m[1]))
    if s.undecided.get(line.pid) == line.cpu and line.event in (*VCPU_EVENTS, "sched_switch"):
        # running at the start: in guest mode then if its first own kvm event is an exit
        if line.event == "kvm_exit":
            s.start_in_guest.add(line.pid)
        del s.undecided[line.pid]


def _switch(body: str) -> re.Match | None:
    return SWITCH_RAW.search(body) or SWITCH_PLUGIN.match(body)


def group_vms(threads: dict[int, Thread]) -> tuple[list[VmInfo], str]:
    """vCPU threads into VMs: by tgid where the trace prints it, otherwise by thread id.

    Without a tgid, QEMU's vCPU threads of one VM are created one after another in vCPU order
    (qemu_init_vcpu() per CPU, in order), so in thread-id order a VM's indexes increase: a thread
    whose index is not above the current group's highest starts a new VM.
    """
    vcpus = sorted((th for th in threads.values() if th.vcpu is not None), key=lambda th: th.tid)
    by_tgid: dict[int, list[Thread]] = {}
    groups: list[list[Thread]] = []
    for th in vcpus:
        if th.tgid is not None:
            by_tgid.setdefault(th.tgid, []).append(th)
        elif not groups or th.vcpu <= max(x.vcpu for x in groups[-1]):
            groups.append([th])
        else:
            groups[-1].append(th)
    groups += by_tgid.values()
    groups.sort(key=lambda g: min(th.first for th in g))
    vms = [VmInfo(i, g[0].tgid, sorted(g, key=lambda th: (th.vcpu, th.tid))) for i, g in enumerate(groups, 1)]
    for vm in vms:
        for th in vm.threads:
            th.vm = vm.id
    loose = sum(1 for th in vcpus if th.tgid is None)
    if not loose:
        how = "grouped by the process id the trace prints (tgid)"
    else:
        how = "no process id in the trace: in thread-id order, a vCPU index not above the previous thread's starts a new VM"
    return vms, how


# --- pass 2: events ------------------------------------------------------------------------------
class Mapper:
    """Turns lines into events, keeping every replay precondition (docs/trace-format.md)."""

    def __init__(self, s: Scan, vms: list[VmInfo], nr_cpus: int, report: ImportReport):
        self.s, self.report, self.threads = s, report, s.threads
        self.vms = {vm.id: vm for vm in vms}
        self.by_tgid = {vm.tgid: vm.id for vm in vms if vm.tgid is not None}
        ran_vcpu = {c for c, tids in s.ran_on.items() if any(self._vcpu(t) for t in tids)}
        self.quiet = [c for c in range(nr_cpus) if c not in ran_vcpu]  # CPUs no vCPU thread ever runs on
        self.out: list[tuple[int, int, int, int, int, int]] = []
        self.loaded: dict[int, int] = {}  # vCPU thread -> pCPU it is loaded on
        self.on_cpu: list[int | None] = [None] * nr_cpus
        self.guest: set[int] = set()  # vCPU threads in guest mode
        self.last_exit: dict[int, int] = {}
        self.created: set[int] = set()
        self.zap_batch: dict[int, tuple[int, int]] = {}  # cpu -> (vm, kind) of the zap lines running there
        self.t = 0

    # --- bookkeeping -----------------------------------------------------------------------
    def _vcpu(self, tid: int) -> bool:
        th = self.threads.get(tid)
        return th is not None and th.vcpu is not None and th.vm is not None

    def emit(self, kind: Ev, vm: int, vcpu: int = -1, pcpu: int = -1, arg: int = 0) -> None:
        self.out.append((self.t, int(kind), vm, vcpu, pcpu, arg))
        self.report.mapped[EVENT_NAMES[kind]] += 1

    def fix(self, what: str) -> None:
        self.report.fixups[what] += 1

    def skip(self, why: str) -> None:
        self.report.skipped[why] += 1

    def _in_guest(self, cpu: int) -> bool:
        tid = self.on_cpu[cpu]
        return tid is not None and tid in self.guest

    # --- the state at the start -------------------------------------------------------------
    def start(self) -> None:
        """vCPU threads running when the recording started are loaded at t=0 where they ran;
        one whose first own kvm event is kvm_exit was in guest mode."""
        claimed: set[int] = set()
        for cpu, (_, tid) in sorted(self.s.first_on_cpu.items(), key=lambda kv: kv[1][0]):
            if not self._vcpu(tid) or tid in claimed or not self._load(tid, cpu):
                continue
            claimed.add(tid)
            th = self.threads[tid]
            note = f"CPU {cpu}: vm {th.vm} vcpu {th.vcpu}"
            if tid in self.s.start_in_guest:
                self.emit(Ev.VM_ENTRY, th.vm, th.vcpu)
                self.guest.add(tid)
                note += " (in guest mode)"
            self.report.initial.append(note)

    # --- host CPUs ----------------------------------------------------------------------------
    def _free_cpu(self, prefer: int) -> int | None:
        """A host CPU no vCPU is in guest mode on (host code cannot run there): `prefer`, else a
        CPU no vCPU thread ever runs on, else one with nothing loaded, else any out of guest mode."""
        if not self._in_guest(prefer):
            return prefer
        for cpus in (self.quiet, range(len(self.on_cpu))):
            for c in cpus:
                if self.on_cpu[c] is None:
                    return c
        return next((c for c in range(len(self.on_cpu)) if not self._in_guest(c)), None)

    def _ensure_vm(self, vm: int, cpu: int) -> bool:
        """vm_create before the VM's first event, on a CPU no vCPU thread runs on if the host has
        one: kvm_arch_vcpu_create() loads every VMCS there, and each vCPU's first load elsewhere
        sends that CPU a VMCLEAR IPI, which would kick a guest running there."""
        if vm in self.created:
            return True
        pcpu = next((c for c in self.quiet if not self._in_guest(c)), None)
        pcpu = self._free_cpu(cpu) if pcpu is None else pcpu
        if pcpu is None:
            return False
        self.emit(Ev.VM_CREATE, vm, pcpu=pcpu, arg=pack_vm_create(self.vms[vm].vcpus))
        self.created.add(vm)
        return True

    # --- vCPU scheduling ------------------------------------------------------------------------
    def _load(self, tid: int, cpu: int) -> bool:
        th = self.threads[tid]
        if self.loaded.get(tid) == cpu:
            return True
        if not self._ensure_vm(th.vm, cpu):
            self.skip("vcpu_load: no host CPU out of guest mode for its VM's vm_create")
            return False
        if tid in self.loaded:
            self._put(tid, PUT_UNKNOWN)
            self.fix("vcpu_put added: the vCPU thread showed up on another CPU (its sched_switch out is missing)")
        other = self.on_cpu[cpu]
        if other is not None:
            self._put(other, PUT_UNKNOWN)
            self.fix("vcpu_put added: another vCPU thread was switched in on its CPU")
        self.emit(Ev.VCPU_LOAD, th.vm, th.vcpu, pcpu=cpu)
        self.loaded[tid], self.on_cpu[cpu] = cpu, tid
        return True

    def _put(self, tid: int, reason: int) -> None:
        th = self.threads[tid]
        self.emit(Ev.VCPU_PUT, th.vm, th.vcpu, arg=reason)
        self.on_cpu[self.loaded.pop(tid)] = None
        self.guest.discard(tid)
        self.report.put_reasons[PUT_REASONS[reason]] += 1

    def _current(self, cpu: int, tid: int) -> None:
        """Every line names the task current on its CPU: a vCPU thread loaded there that is not
        it was switched out, and a vCPU thread that is it runs there."""
        other = self.on_cpu[cpu]
        if other is not None and other != tid:
            self._put(other, PUT_UNKNOWN)
            self.fix("vcpu_put added: another task ran on its CPU (its sched_switch out is missing)")
        if self._vcpu(tid) and self.loaded.get(tid) != cpu and self._load(tid, cpu):
            self.fix("vcpu_load added: the vCPU thread ran with no sched_switch in")

    # --- lines ----------------------------------------------------------------------------------
    def line(self, line: Line) -> None:
        t = line.ts_ns - self.s.t0
        if t < self.t:  # per-CPU buffers merged out of order, or a perf --deltatime run
            self.fix("time went back: event moved to the previous time")
        self.t = max(t, self.t)
        if not 0 <= line.cpu < len(self.on_cpu):
            self.skip(f"CPU {line.cpu} outside the host")
            return
        batch = self.zap_batch.pop(line.cpu, None)
        self._current(line.cpu, line.pid)
        handler = HANDLERS.get(line.event)
        if handler is None:
            self.skip(f"tracepoint {line.event} (not mapped)")
            return
        handler(self, line, batch)

    def on_switch(self, line: Line, _batch) -> None:
        m = _switch(line.body)
        if m is None:
            self.skip("sched_switch: fields not understood")
            return
        prev, nxt = int(m["prev_pid"]), int(m["next_pid"])
        used = False
        if self._vcpu(prev) and prev in self.loaded:
            self._put(prev, self._put_reason(prev, m["prev_state"]))
            used = True
        if self._vcpu(nxt) and self._load(nxt, line.cpu):
            used = True
        if used:
            self.report.used["sched_switch"] += 1
        else:
            self.skip("sched_switch between threads that are not vCPUs")

    def _put_reason(self, tid: int, state: str) -> int:
        """prev_state R (R+: preempted) = still runnable: kvm_sched_out() sets vcpu->preempted.
        S or D right after a HLT exit = blocked in kvm_vcpu_halt(). Blocked after any other exit
        is the thread waiting outside KVM_RUN (userspace I/O, a lock): neither."""
        if state.startswith("R"):
            return PUT_PREEMPTED
        if state[:1] in ("S", "D") and self.last_exit.get(tid) == EXIT_HLT:
            return PUT_HALT
        return PUT_UNKNOWN

    def on_migrate(self, line: Line, _batch) -> None:
        m = MIGRATE.search(line.body)
        tid = int(m["pid"]) if m else -1
        if not self._vcpu(tid):
            self.skip("sched_migrate_task: not a vCPU thread" if m else "sched_migrate_task: fields not understood")
            return
        if tid in self.loaded:  # set_task_cpu() moves a task that is not running: it was switched out
            self._put(tid, PUT_PREEMPTED)
            self.fix("vcpu_put added: sched_migrate_task of a vCPU thread still loaded")
        self.report.used["sched_migrate_task"] += 1  # no event: the move is its next vcpu_load

    def _vcpu_line(self, line: Line) -> Thread | None:
        if not self._vcpu(line.pid):
            self.skip(f"{line.event}: thread {line.comm}-{line.pid} has no vCPU index (not 'CPU N/KVM', no 'vcpu N')")
            return None
        if self.loaded.get(line.pid) != line.cpu:
            return None  # _load() already counted why
        self.report.used[line.event] += 1
        return self.threads[line.pid]

    def on_entry(self, line: Line, _batch) -> None:
        if th := self._vcpu_line(line):
            self.emit(Ev.VM_ENTRY, th.vm, th.vcpu)
            self.guest.add(th.tid)

    def on_exit(self, line: Line, _batch) -> None:
        if th := self._vcpu_line(line):
            reason = self._exit_reason(line.body)
            if th.tid not in self.guest:
                self.report.notes["kvm_exit with no kvm_entry since the vCPU was loaded"] += 1
            self.emit(Ev.VM_EXIT, th.vm, th.vcpu, arg=reason)
            self.guest.discard(th.tid)
            self.last_exit[th.tid] = reason

    def _exit_reason(self, body: str) -> int:
        m = EXIT_REASON.search(body)
        if m is None:
            self.report.notes["kvm_exit without a reason: exit_reason 0"] += 1
            return 0
        name = m["name"]
        if m["num"] or name.isdigit() or name.startswith("0x"):  # plugin_kvm.c "UNKNOWN (N)", __print_symbolic's hex
            return int(m["num"] or name, 0) & 0xFFFF
        if name not in VMX_EXIT_REASONS:
            self.report.notes[f"kvm_exit reason {name} is not a VMX exit reason (an AMD host?): exit_reason 0"] += 1
        return VMX_EXIT_REASONS.get(name, 0)

    def on_hv_flush(self, line: Line, _batch) -> None:
        if th := self._vcpu_line(line):  # the hypercall's exit handler, on the vCPU that made it
            self.emit(Ev.GUEST_TLB_FLUSH, th.vm, th.vcpu)
            self.guest.discard(th.tid)

    def on_zap(self, line: Line, batch) -> None:
        vm, kind = self._vm_of(line.pid), ZAP_EVENTS[line.event]
        if vm is None:
            self.skip(f"{line.event}: thread {line.comm}-{line.pid} belongs to no known VM (no tgid, {len(self.vms)} VMs)")
            return
        self.report.used[line.event] += 1
        if kind == Ev.ZAP and batch == (vm, kind):
            # kvm_mmu_prepare_zap_page() runs once per page; kvm_mmu_commit_zap_page() flushes once per batch
            self.report.notes["kvm_mmu_prepare_zap_page lines merged into the zap of the same batch"] += 1
            self.zap_batch[line.cpu] = batch
            return
        cpu = self._free_cpu(line.cpu) if self._ensure_vm(vm, line.cpu) else None
        if cpu is None:
            self.skip(f"{line.event}: every host CPU is in guest mode")
            return
        if cpu != line.cpu:
            self.fix(f"{EVENT_NAMES[kind]} moved to a free host CPU: its own CPU was in guest mode")
        self.emit(kind, vm, pcpu=cpu)
        self.zap_batch[line.cpu] = (vm, kind)

    def _vm_of(self, tid: int) -> int | None:
        """The VM a host event belongs to: its vCPU thread's, its process's, or the only VM."""
        th = self.threads.get(tid)
        if th is not None and th.vm is not None:
            return th.vm
        for pid in (th.tgid if th else None, tid):  # a VMM's main thread: pid == tgid
            if pid in self.by_tgid:
                return self.by_tgid[pid]
        return next(iter(self.vms)) if len(self.vms) == 1 else None


HANDLERS = {
    "sched_switch": Mapper.on_switch,
    "sched_migrate_task": Mapper.on_migrate,
    "kvm_entry": Mapper.on_entry,
    "kvm_exit": Mapper.on_exit,
    **dict.fromkeys(HV_FLUSH_EVENTS, Mapper.on_hv_flush),
    **dict.fromkeys(ZAP_EVENTS, Mapper.on_zap),
}


# --- the whole import ------------------------------------------------------------------------------
def host_size(s: Scan, report: ImportReport, nr_cpus: int | None, host: str) -> int:
    """The host's CPU count: given (--cpus, a host preset), else the larger of trace-cmd's cpus=
    header and the highest CPU seen + 1."""
    header = report.header_cpus
    if nr_cpus is not None:
        report.sized_by = f"host {host}" if host else "--cpus"
        if s.max_cpu >= nr_cpus:
            given = f"host {host} has" if host else f"--cpus {nr_cpus} makes a host of"
            raise TraceImportError(f"the trace uses CPU {s.max_cpu}, but {given} {nr_cpus} CPUs (0-{nr_cpus - 1})")
        return nr_cpus
    n = max(s.max_cpu + 1, header or 0)
    report.sized_by = "the cpus= header" if header and header >= s.max_cpu + 1 else f"highest CPU seen: {s.max_cpu}"
    if n > NR_CPUS_MAX:
        raise TraceImportError(f"the trace needs {n} CPUs, more than NR_CPUS ({NR_CPUS_MAX})")
    return n


def import_trace(path: str | Path, fmt: str = "auto", nr_cpus: int | None = None, host: str = "") -> tuple[Trace, ImportReport]:
    """Read a trace-cmd report / perf script text file: (the hvbench trace, what was done)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise TraceImportError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if nr_cpus is not None and not 1 <= nr_cpus <= NR_CPUS_MAX:
        raise TraceImportError(f"the host must have 1..{NR_CPUS_MAX} CPUs, got {nr_cpus}")
    _check_text(path)
    report = ImportReport(str(path), detect_format(path) if fmt == "auto" else fmt)
    s = scan(path, report.fmt, report)
    vms, report.grouping = group_vms(s.threads)
    if not vms:
        raise TraceImportError(f"{path}: no vCPU thread ('CPU N/KVM', or kvm_entry/kvm_exit with 'vcpu N'): nothing to import")
    report.vms, report.nr_cpus = vms, host_size(s, report, nr_cpus, host)
    mapper = Mapper(s, vms, report.nr_cpus, report)
    mapper.start()
    for line in read_lines(path, report.fmt):
        mapper.line(line)
    events = np.array(mapper.out, dtype=EVENT_DTYPE)
    meta = {"imported_from": str(path), "import_format": report.fmt, "nr_cpus": report.nr_cpus}
    return Trace.from_array(events, **meta), report
