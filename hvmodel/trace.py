"""The trace: time-sorted events as a numpy structured array, in chunks.

Binary form: one record per event (EVENT_DTYPE). Text form: JSON Lines, one event per line
with named fields (docs/trace-format.md). Both load into the same `Trace`.

A generated trace is open loop: it says which vCPU runs where and when, and what KVM is asked
to do (zap, memslot delete, SMM, nested transitions); it never depends on the flush strategy,
so every strategy replays exactly the same events. A closed-loop trace (hvmodel/closed_loop.py)
depends on the strategy and cost model that made it; its metadata says which.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

EVENT_DTYPE = np.dtype(
    [
        ("time_ns", "<i8"),
        ("kind", "u1"),
        ("vm", "<i4"),
        ("vcpu", "<i4"),
        ("pcpu", "<i4"),
        ("arg", "<i8"),
    ]
)


class Ev(IntEnum):
    """Event kinds, named after the kernel path each one drives."""

    VM_CREATE = 1  # kvm_create_vm + kvm_vm_ioctl_create_vcpu for each vCPU
    VM_DESTROY = 2  # kvm_destroy_vm
    VCPU_LOAD = 3  # vcpu_load / preempt-notifier sched_in -> kvm_arch_vcpu_load
    VCPU_PUT = 4  # vcpu_put / sched_out
    VM_ENTRY = 5  # vcpu_enter_guest
    VM_EXIT = 6  # the vCPU leaves guest mode (e.g. HLT) and stays loaded
    ZAP = 7  # mmu_notifier invalidation (arg 0) or kvm_mmu_track_write on EPT12 (arg = eptp12)
    MEMSLOT_DELETE = 8  # kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_all_fast
    SMM_ENTER = 9  # enter_smm -> kvm_smm_changed(true)
    SMM_EXIT = 10  # RSM -> kvm_smm_changed(false)
    NESTED_VMENTER = 11  # nested_vmx_enter_non_root_mode
    NESTED_VMEXIT = 12  # nested_vmx_vmexit
    L1_INVEPT = 13  # handle_invept (arg = eptp12, 0 = all-context)
    MMU_RESET_CONTEXT = 14  # kvm_mmu_reset_context on CR0/CR4/EFER role bits or CPUID
    GUEST_TLB_FLUSH = 15  # KVM_REQ_TLB_FLUSH_GUEST (PV flush hypercall, INVPCID all, ...)
    NEED_RESCHED = 16  # set_tsk_need_resched() on the vCPU thread: a kick makes it schedule()


EVENT_NAMES = {e: e.name.lower() for e in Ev}
EVENT_BY_NAME = {v: k for k, v in EVENT_NAMES.items()}

# --- arg encodings -------------------------------------------------------------------------
# vm_create: vcpus | tdp_level << 16 | node << 24
# nested_vmenter: l2 | NO_NESTED_EPT | EPTP_NOT_BACKED  (with nested EPT, eptp12 == l2)
NESTED_NO_EPT = 1 << 32  # L1 does not use EPT for this L2: KVM maps L2 with a TDP root (guest_mode=1)
NESTED_EPTP_NOT_BACKED = 1 << 33  # EPTP12 points outside L1's memslots: dummy root
# zap: arg = eptp12 | ZAP_FLOOD
ZAP_FLOOD = 1 << 32  # kvm_mmu_track_write() zaps the shadow root itself (write flooding, misaligned write)
MMU_RESET_REASONS = ("cr0", "cr4", "efer", "cpuid")
# vcpu_put: arg = why the thread left its pCPU. kvm_sched_out() sets vcpu->preempted when the
# task is still runnable (task_is_runnable(current) && vcpu->wants_to_run); a vCPU blocked in
# kvm_vcpu_halt() is not. Neither changes a flush: they feed the trace's own rates.
PUT_REASONS = ("unknown", "halt", "preempted")
PUT_HALT, PUT_PREEMPTED = 1, 2


def pack_vm_create(vcpus: int, tdp_level: int = 4, node: int = 0) -> int:
    return vcpus | (tdp_level << 16) | (node << 24)


def unpack_vm_create(arg: int) -> tuple[int, int, int]:
    return arg & 0xFFFF, (arg >> 16) & 0xFF, arg >> 24


def pack_nested_vmenter(l2: int, nested_ept: bool = True, eptp_backed: bool = True) -> int:
    return l2 | (0 if nested_ept else NESTED_NO_EPT) | (0 if eptp_backed else NESTED_EPTP_NOT_BACKED)


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the line or event index."""


# --- text form (JSON Lines) ----------------------------------------------------------------
# event name -> (required fields, optional fields with defaults)
_COMMON = ("t_ns", "event", "vm")
TEXT_FIELDS: dict[Ev, tuple[tuple[str, ...], dict[str, object]]] = {
    Ev.VM_CREATE: (("vcpus",), {"node": 0, "tdp_level": 4, "pcpu": 0}),
    Ev.VM_DESTROY: ((), {"pcpu": 0}),
    Ev.VCPU_LOAD: (("vcpu", "pcpu"), {}),
    Ev.VCPU_PUT: (("vcpu",), {"reason": "unknown"}),
    Ev.VM_ENTRY: (("vcpu",), {}),
    Ev.VM_EXIT: (("vcpu",), {"exit_reason": 0}),
    Ev.ZAP: ((), {"pcpu": 0, "eptp12": 0, "flood": False}),
    Ev.MEMSLOT_DELETE: ((), {"pcpu": 0}),
    Ev.SMM_ENTER: (("vcpu",), {}),
    Ev.SMM_EXIT: (("vcpu",), {}),
    Ev.NESTED_VMENTER: (("vcpu", "l2"), {"nested_ept": True, "eptp_backed": True}),
    Ev.NESTED_VMEXIT: (("vcpu",), {}),
    Ev.L1_INVEPT: (("vcpu",), {"eptp12": 0}),
    Ev.MMU_RESET_CONTEXT: (("vcpu",), {"reason": "cr4"}),
    Ev.GUEST_TLB_FLUSH: (("vcpu",), {}),
    Ev.NEED_RESCHED: (("vcpu",), {}),
}


KVM_MAX_VCPUS = 4096  # with MAXSMP
L2_MAX = (1 << 32) - 1


def _int_field(obj: dict, name: str, lineno: int, lo: int = 0, hi: int = (1 << 31) - 1) -> int:
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise TraceError(f"line {lineno}: field '{name}' must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _bool_field(obj: dict, name: str, lineno: int) -> bool:
    v = obj[name]
    if not isinstance(v, bool):
        raise TraceError(f"line {lineno}: field '{name}' must be true or false, got {v!r}")
    return v


def event_from_json(obj: dict, lineno: int) -> tuple:
    """One JSON object -> one EVENT_DTYPE record (as a tuple)."""
    name = obj.get("event")
    kind = EVENT_BY_NAME.get(name) if isinstance(name, str) else None
    if kind is None:
        raise TraceError(f"line {lineno}: unknown event {name!r}; allowed: {', '.join(EVENT_BY_NAME)}")
    required, optional = TEXT_FIELDS[kind]
    allowed = set(_COMMON) | set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            raise TraceError(f"line {lineno}: {name}: unknown field '{key}'; allowed: {', '.join(sorted(allowed))}")
    for key in (*_COMMON, *required):
        if key not in obj:
            raise TraceError(f"line {lineno}: {name}: missing field '{key}'")
    f = {**optional, **obj}
    t = _int_field(f, "t_ns", lineno, 0, (1 << 63) - 1)
    vm = _int_field(f, "vm", lineno)
    vcpu = _int_field(f, "vcpu", lineno) if "vcpu" in required else -1
    pcpu = _int_field(f, "pcpu", lineno) if "pcpu" in f else -1
    arg = 0
    if kind == Ev.VM_CREATE:
        level = _int_field(f, "tdp_level", lineno)
        if level not in (4, 5):
            raise TraceError(f"line {lineno}: vm_create: tdp_level must be 4 or 5, got {level}")
        arg = pack_vm_create(_int_field(f, "vcpus", lineno, 1, KVM_MAX_VCPUS), level, _int_field(f, "node", lineno, 0, 1023))
    elif kind == Ev.ZAP:
        arg = _int_field(f, "eptp12", lineno, 0, L2_MAX)
        if _bool_field(f, "flood", lineno):
            if not arg:
                raise TraceError(f"line {lineno}: zap: flood needs an eptp12 (the EPT12 table L1 wrote)")
            arg |= ZAP_FLOOD
    elif kind == Ev.L1_INVEPT:
        arg = _int_field(f, "eptp12", lineno, 0, L2_MAX)
    elif kind == Ev.NESTED_VMENTER:
        l2 = _int_field(f, "l2", lineno, 1, L2_MAX)
        arg = pack_nested_vmenter(l2, _bool_field(f, "nested_ept", lineno), _bool_field(f, "eptp_backed", lineno))
    elif kind == Ev.MMU_RESET_CONTEXT:
        if f["reason"] not in MMU_RESET_REASONS:
            raise TraceError(f"line {lineno}: mmu_reset_context: reason must be one of {', '.join(MMU_RESET_REASONS)}")
        arg = MMU_RESET_REASONS.index(f["reason"])
    elif kind == Ev.VCPU_PUT:
        if f["reason"] not in PUT_REASONS:
            raise TraceError(f"line {lineno}: vcpu_put: reason must be one of {', '.join(PUT_REASONS)}")
        arg = PUT_REASONS.index(f["reason"])
    elif kind == Ev.VM_EXIT:
        arg = _int_field(f, "exit_reason", lineno, 0, 0xFFFF)
    return (t, int(kind), vm, vcpu, pcpu, arg)


def event_to_json(rec) -> dict:
    t, kind, vm, vcpu, pcpu, arg = (int(x) for x in rec)
    kind = Ev(kind)
    obj: dict[str, object] = {"t_ns": t, "event": EVENT_NAMES[kind], "vm": vm}
    required, optional = TEXT_FIELDS[kind]
    if "vcpu" in required:
        obj["vcpu"] = vcpu
    if "pcpu" in required or "pcpu" in optional:
        obj["pcpu"] = pcpu
    if kind == Ev.VM_CREATE:
        obj["vcpus"], obj["tdp_level"], obj["node"] = unpack_vm_create(arg)
    elif kind == Ev.ZAP:
        obj["eptp12"] = arg & L2_MAX
        if arg & ZAP_FLOOD:
            obj["flood"] = True
    elif kind == Ev.L1_INVEPT:
        obj["eptp12"] = arg
    elif kind == Ev.NESTED_VMENTER:
        obj["l2"] = arg & 0xFFFFFFFF
        obj["nested_ept"] = not arg & NESTED_NO_EPT
        obj["eptp_backed"] = not arg & NESTED_EPTP_NOT_BACKED
    elif kind == Ev.MMU_RESET_CONTEXT:
        obj["reason"] = MMU_RESET_REASONS[arg]
    elif kind == Ev.VCPU_PUT and arg:
        obj["reason"] = PUT_REASONS[arg]
    elif kind == Ev.VM_EXIT and arg:
        obj["exit_reason"] = arg
    return obj


# --- the Trace ------------------------------------------------------------------------------
@dataclass
class Trace:
    """An iterable of time-sorted chunks of EVENT_DTYPE records, plus metadata.

    `chunks` is a zero-argument callable returning a fresh iterator, so a trace can be replayed
    any number of times (once per strategy, once per shard) without being held in memory whole.
    `lines` maps event index -> source line for text traces (for error messages).
    """

    chunks: object  # Callable[[], Iterator[np.ndarray]]
    duration_ns: int
    meta: dict = field(default_factory=dict)
    lines: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.chunks())

    def where(self, index: int) -> str:
        """'line N' for text traces, 'event N' otherwise."""
        if self.lines is not None and 0 <= index < len(self.lines):
            return f"line {int(self.lines[index])}"
        return f"event {index}"

    @classmethod
    def from_array(cls, events: np.ndarray, duration_ns: int | None = None, **meta) -> Trace:
        events = np.asarray(events, dtype=EVENT_DTYPE)
        dur = duration_ns if duration_ns is not None else (int(events["time_ns"][-1]) if len(events) else 0)
        return cls(lambda: iter([events]), dur, meta)

    def to_array(self) -> np.ndarray:
        parts = list(self)
        return np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)


def load_text(path: str | Path) -> Trace:
    """Parse a JSON Lines trace. Blank lines and lines starting with '#' are comments."""
    recs, lines = [], []
    last_t = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise TraceError(f"line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"line {lineno}: expected a JSON object")
            rec = event_from_json(obj, lineno)
            if rec[0] < last_t:
                raise TraceError(f"line {lineno}: t_ns {rec[0]} goes back in time (previous {last_t})")
            last_t = rec[0]
            recs.append(rec)
            lines.append(lineno)
    events = np.array(recs, dtype=EVENT_DTYPE)
    trace = Trace.from_array(events, source=str(path))
    trace.lines = np.array(lines, dtype=np.int64)
    return trace


def write_text(trace: Iterable[np.ndarray], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for chunk in trace:
            for rec in chunk:
                fh.write(json.dumps(event_to_json(rec)) + "\n")


# --- binary form ----------------------------------------------------------------------------
MAGIC = b"HVTRACE1\n"


def save_binary(trace: Trace, path: str | Path) -> int:
    """Write chunk by chunk: a magic line, a JSON header line, then raw records. Returns events.

    Written to a temporary name and renamed, so a crash never leaves a half-written trace.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    n = 0
    with open(tmp, "wb") as fh:
        fh.write(MAGIC)
        header = {"dtype": EVENT_DTYPE.descr, "duration_ns": trace.duration_ns, "meta": trace.meta}
        fh.write(json.dumps(header).encode() + b"\n")
        for chunk in trace:
            fh.write(np.ascontiguousarray(chunk, dtype=EVENT_DTYPE).tobytes())
            n += len(chunk)
    tmp.replace(path)
    return n


def load_binary(path: str | Path, chunk_events: int = 1 << 20) -> Trace:
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.readline() != MAGIC:
            raise TraceError(f"{path}: not an hvbench binary trace (bad magic)")
        header = json.loads(fh.readline())
        offset = fh.tell()

    def chunks() -> Iterator[np.ndarray]:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while True:
                part = np.fromfile(fh, dtype=EVENT_DTYPE, count=chunk_events)
                if not len(part):
                    return
                yield part

    return Trace(chunks, int(header["duration_ns"]), {**header.get("meta", {}), "source": str(path)})


def load(path: str | Path) -> Trace:
    """Binary if the file starts with the magic line, JSON Lines otherwise."""
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC))
    return load_binary(path) if head == MAGIC else load_text(path)
