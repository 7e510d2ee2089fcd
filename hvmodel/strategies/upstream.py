"""A — upstream KVM (arch/x86/kvm/vmx/vmx.c, vmx_vcpu_load_vmcs()).

On a new pCPU: KVM_REQ_TLB_FLUSH, serviced at the next VM entry as ept_sync_global() (INVEPT
all-context), which also drops every other VM's translations on that pCPU. New or reloaded
roots get a local single-context flush in kvm_mmu_load(). Sean, 2021 (YQljNBBp/EousNBk): the
migration flush exists because a remote flush only reaches pCPUs running the VM right now.
"""

from hvmodel.strategies.base import KernelDefaults


class Upstream(KernelDefaults):
    name = "upstream"
    fast_code = 0  # hvmodel/fast/src/policy.h
