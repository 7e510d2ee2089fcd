"""Constants and small types from arch/x86/include/asm/kvm_host.h and include/linux/kvm_host.h.

Kept in one place so mmu.py, vmx.py and kvm.py can share them without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

KVM_MMU_NUM_PREV_ROOTS = 3
INVALID_PAGE = -1
# kvm_mmu_get_dummy_root(): the zero page, used when a guest root gfn has no memslot.
# It maps nothing, so it can never hold a translation, stale or not.
DUMMY_ROOT_HPA = 0

# vcpu->requests bits (only those that take part in TLB maintenance).
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_TLB_FLUSH_CURRENT = 1 << 1
KVM_REQ_TLB_FLUSH_GUEST = 1 << 2
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 3
KVM_REQ_LOAD_MMU_PGD = 1 << 4

# vcpu->mode
OUTSIDE_GUEST_MODE = 0
IN_GUEST_MODE = 1

# kvm_mmu_free_roots() roots_to_free
KVM_MMU_ROOT_CURRENT = 1 << 0
KVM_MMU_ROOT_PREVIOUS_ALL = ((1 << KVM_MMU_NUM_PREV_ROOTS) - 1) << 1
KVM_MMU_ROOTS_ALL = KVM_MMU_ROOT_CURRENT | KVM_MMU_ROOT_PREVIOUS_ALL


def KVM_MMU_ROOT_PREVIOUS(i: int) -> int:
    return 1 << (i + 1)


VMX_NR_VPIDS = 1 << 16


class KvmMmuPageRole(NamedTuple):
    """union kvm_mmu_page_role, reduced to the bits that distinguish EPT roots.

    `invalid` is kept on the page (KvmMmuPage.invalid) rather than here; is_root_usable()
    compares role.word, which includes role.invalid, so an invalid root never matches.
    """

    level: int  # 4 or 5 (kvm_mmu_get_tdp_level(), fixed per VM by guest MAXPHYADDR)
    direct: bool  # TDP MMU root (1) or shadow page (0: shadow-EPT root for nested EPT)
    guest_mode: bool  # root maps L2
    smm: bool  # SMM address space
    ad_disabled: bool  # !kvm_ad_enabled(); not part of the hardware tag (EP4TA)


class KvmMmuRootInfo(NamedTuple):
    """struct kvm_mmu_root_info {pgd, hpa}; `sp` is root_to_sp(hpa), None for special roots."""

    pgd: int
    hpa: int
    sp: object | None  # KvmMmuPage


INVALID_ROOT = KvmMmuRootInfo(0, INVALID_PAGE, None)


def VALID_PAGE(hpa: int) -> bool:
    return hpa != INVALID_PAGE
