"""The cost model: microseconds charged to a pCPU for each flush-related operation.

Open loop (DESIGN.md §3) by default: costs are accounted, never fed back into the schedule; with
workload.closed_loop=true they delay the vCPUs that pay them (hvmodel/closed_loop.py). Defaults
and their sources live in conf/cost/*.yaml; this class only names the knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvmodel.errors import ConfigError


@dataclass(frozen=True)
class CostModel:
    ipi_send_us: float = 0.3  # sender, per ICR write (one per x2APIC cluster in cluster mode)
    ipi_receive_us: float = 1.0  # receiver: IRQ entry, call-function handler, ack
    vmexit_us: float = 1.5  # VM exit + re-entry forced by an IPI into a pCPU in guest mode
    invept_single_us: float = 0.5
    invept_global_us: float = 1.0
    invvpid_us: float = 0.3
    vmcs_migrate_us: float = 0.5  # VMPTRLD + host-state VMWRITEs on a new pCPU (all strategies)
    refill_us: float = 77.0  # guest time to refill the translations of one flushed EP4TA
    hv_flush_hypercall_us: float = 20.0  # HvCallFlushGuestPhysicalAddressSpace (nested only)

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise ConfigError(f"cost.{name}", f"must be >= 0, got {value}")
