"""arch/x86/kvm/mmu/{mmu.c,tdp_mmu.c}: roots, their lifetime, and the per-vCPU root caches.

What matters for TLB flushing is *which EP4TA a vCPU can run on without going through
kvm_mmu_load()* (whose local single-context flush makes a freshly loaded root safe on this
pCPU): the current root and the prev_roots of root_mmu and guest_mmu, reached by
fast_pgd_switch() without any flush. Root pages come from a per-node page pool that reuses
freed pages, so a new root can inherit the EP4TA of a freed one, of this VM or another.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from hvmodel.kvm_host import (
    DUMMY_ROOT_HPA,
    INVALID_ROOT,
    KVM_MMU_NUM_PREV_ROOTS,
    KVM_MMU_ROOT_CURRENT,
    KVM_MMU_ROOT_PREVIOUS,
    KVM_MMU_ROOTS_ALL,
    KVM_REQ_LOAD_MMU_PGD,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    VALID_PAGE,
    KvmMmuPageRole,
    KvmMmuRootInfo,
)
from hvmodel.kvm_main import kvm_flush_remote_tlbs, kvm_make_all_cpus_request, kvm_make_request

if TYPE_CHECKING:
    from hvmodel.kvm import Kvm, KvmVcpu

PAGE_SHIFT = 12


PAGE_REUSE = ("lifo", "cached")
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40  # a kvm_mmu_memory_cache's capacity
PT64_ROOT_MAX_LEVEL = 5  # mmu_topup_memory_caches(): the shadow page cache's minimum


class PagePool:
    """The page allocator as root allocation sees it: a LIFO of freed pages per NUMA node.

    `lifo` (the default, the worst case): a new root gets the page freed last, at once, so EP4TA
    reuse happens as soon as it can. `cached`, as the kernel does it: root pages come from the
    vCPU's mmu_shadow_page_cache (tdp_mmu_alloc_sp() and kvm_mmu_alloc_shadow_page() both take
    kvm_mmu_memory_cache_alloc(), the object put in last), which kvm_mmu_load() tops up from the
    allocator (mmu_topup_memory_caches(): below PT64_ROOT_MAX_LEVEL objects, refill to 40); a
    freed shadow root's page goes back to the allocator at once (free_page()), a TDP root's only
    after an RCU grace period (call_rcu() -> tdp_mmu_free_sp_rcu_callback(), `rcu_grace_ns`, an
    assumption: grace periods take milliseconds); a vCPU's cache is freed with it.
    """

    def __init__(self, nodes: int, cached: bool = False, rcu_grace_ns: int = 0):
        self.free: list[list[int]] = [[] for _ in range(nodes)]
        self.next_pfn = [1] * nodes  # pfn 0 of node 0 is the zero page (dummy root)
        self.cached, self.rcu_grace_ns = cached, rcu_grace_ns
        self.caches: dict = {}  # cached: vCPU -> its mmu_shadow_page_cache (pages, LIFO)
        self.rcu: deque[tuple[int, int, int]] = deque()  # cached: (time it is freed, node, hpa)

    def page(self, node: int) -> int:
        """From the allocator: the page freed last on the node, else a new one."""
        if self.free[node]:
            return self.free[node].pop()
        pfn = self.next_pfn[node]
        self.next_pfn[node] += 1
        return ((node << 36) | pfn) << PAGE_SHIFT

    def rcu_callbacks(self, now: int) -> None:
        """The pages whose grace period ended by `now` join the allocator, in the order their
        periods ended: before anything freed later (the RCU callback runs when it ends)."""
        while self.rcu and self.rcu[0][0] <= now:
            _, n, hpa = self.rcu.popleft()
            self.free[n].append(hpa)

    def topup(self, vcpu: KvmVcpu, node: int, now: int) -> None:
        """mmu_topup_memory_caches() at kvm_mmu_load()."""
        if not self.cached:
            return
        self.rcu_callbacks(now)
        cache = self.caches.setdefault(vcpu, [])
        if len(cache) < PT64_ROOT_MAX_LEVEL:
            cache.extend(self.page(node) for _ in range(KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE - len(cache)))

    def alloc(self, vcpu: KvmVcpu, node: int) -> int:
        return self.caches[vcpu].pop() if self.cached else self.page(node)

    def release(self, node: int, hpa: int, now: int, rcu: bool) -> None:
        if self.cached and rcu:
            self.rcu.append((now + self.rcu_grace_ns, node, hpa))
        else:
            self.rcu_callbacks(now)
            self.free[node].append(hpa)

    def free_cache(self, vcpu: KvmVcpu, node: int, now: int) -> None:
        """kvm_mmu_free_memory_caches(): the objects go back last one first."""
        self.rcu_callbacks(now)
        cache = self.caches.pop(vcpu, [])
        self.free[node].extend(reversed(cache))


class KvmMmuPage:
    """struct kvm_mmu_page as a root: a TDP MMU root (tdp_mmu_page) or a shadow-EPT root.

    `root_count` is the TDP root's refcount (one reference held by the TDP MMU itself until
    the root is invalidated and zapped, one per vCPU using it) or the shadow page's root_count.
    `epoch` counts zaps of its SPTEs: TLB entries cached at an older epoch are stale.
    """

    __slots__ = (
        "id",
        "kvm",
        "role",
        "gfn",
        "hpa",
        "root_count",
        "invalid",
        "epoch",
        "tdp_mmu_page",
        "tdp_mmu_scheduled_root_to_zap",
        "mmu_valid_gen",
    )

    def __init__(self, rid: int, kvm: Kvm, role: KvmMmuPageRole, gfn: int, hpa: int, tdp: bool):
        self.id, self.kvm, self.role, self.gfn, self.hpa = rid, kvm, role, gfn, hpa
        self.root_count = 0
        self.invalid = False
        self.epoch = 0
        self.tdp_mmu_page = tdp
        self.tdp_mmu_scheduled_root_to_zap = False  # the TDP MMU's reference is still to be put
        self.mmu_valid_gen = kvm.mmu_valid_gen

    def __repr__(self) -> str:
        kind = "tdp" if self.tdp_mmu_page else "shadow"
        return f"<root {self.id} {kind} vm{self.kvm.id} hpa={self.hpa:#x} epoch={self.epoch}{' invalid' if self.invalid else ''}>"


class KvmMmu:
    """struct kvm_mmu: root + prev_roots[KVM_MMU_NUM_PREV_ROOTS] and the role of new roots."""

    __slots__ = ("name", "root", "prev_roots", "root_role", "root_via_fast_switch")

    def __init__(self, name: str, root_role: KvmMmuPageRole | None):
        self.name = name
        self.root = INVALID_ROOT
        self.prev_roots = [INVALID_ROOT] * KVM_MMU_NUM_PREV_ROOTS
        self.root_role = root_role
        # oracle bookkeeping: the current root came from the cache since the last load/migration
        self.root_via_fast_switch = False

    def slots(self) -> list[KvmMmuRootInfo]:
        return [self.root, *self.prev_roots]


# --- roles --------------------------------------------------------------------------------
def kvm_calc_tdp_mmu_root_page_role(vcpu: KvmVcpu) -> KvmMmuPageRole:
    """TDP roots: level from guest MAXPHYADDR (per VM), smm and guest_mode from vCPU state."""
    return KvmMmuPageRole(
        level=vcpu.kvm.tdp_level,
        direct=True,
        guest_mode=vcpu.guest_mode,
        smm=vcpu.smm,
        ad_disabled=not vcpu.kvm.host.ept_ad,
    )


def kvm_calc_shadow_ept_root_page_role(vcpu: KvmVcpu) -> KvmMmuPageRole:
    return KvmMmuPageRole(level=4, direct=False, guest_mode=True, smm=False, ad_disabled=not vcpu.kvm.host.ept_ad)


def kvm_init_mmu(vcpu: KvmVcpu) -> None:
    """Recompute root_role after a mode change (SMM, guest mode)."""
    if vcpu.arch.mmu is vcpu.arch.root_mmu:
        vcpu.arch.root_mmu.root_role = kvm_calc_tdp_mmu_root_page_role(vcpu)


# --- allocation ---------------------------------------------------------------------------
def kvm_mmu_alloc_root_page(vcpu: KvmVcpu, role: KvmMmuPageRole, gfn: int, tdp: bool) -> KvmMmuPage:
    """tdp_mmu_alloc_sp() / kvm_mmu_alloc_shadow_page(): a page from the VM's node (through the
    vCPU's page cache with host.page_reuse=cached)."""
    kvm = vcpu.kvm
    host = kvm.host
    kvm.next_root_id += 1
    sp = KvmMmuPage(kvm.next_root_id, kvm, role, gfn, host.pool.alloc(vcpu, kvm.node), tdp)
    kvm.roots[sp.id] = sp
    host.metrics.vm["root_allocs"] += 1
    host.strategy.root_created(vcpu, sp)
    return sp


def kvm_mmu_free_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    """The page goes back to the allocator. No TLB flush: KVM relies on flush-at-first-use."""
    host = kvm.host
    del kvm.roots[sp.id]
    host.metrics.vm["root_frees"] += 1
    host.strategy.root_freed(sp)
    host.pool.release(kvm.node, sp.hpa, host.now, rcu=sp.tdp_mmu_page)


def kvm_tdp_mmu_alloc_root(vcpu: KvmVcpu) -> KvmMmuPage:
    """Reuse a valid root with the same role.word (kvm_tdp_mmu_get_root), else allocate one
    with refcount 2: one for this vCPU, one for the TDP MMU until the root is invalidated."""
    kvm, role = vcpu.kvm, vcpu.arch.mmu.root_role
    for root in kvm.tdp_mmu_roots:
        if root.role == role and not root.invalid:
            root.root_count += 1
            return root
    sp = kvm_mmu_alloc_root_page(vcpu, role, 0, tdp=True)
    sp.root_count = 2
    kvm.tdp_mmu_roots.append(sp)
    kvm.host.strategy.root_allocated(vcpu, sp)
    return sp


def is_obsolete_sp(kvm: Kvm, sp: KvmMmuPage) -> bool:
    return sp.invalid or (not sp.tdp_mmu_page and sp.mmu_valid_gen != kvm.mmu_valid_gen)


def kvm_mmu_get_shadow_page(vcpu: KvmVcpu, gfn: int, role: KvmMmuPageRole) -> KvmMmuPage:
    """Find the shadow page for (gfn, role) in the VM's hash, or create it.

    A found page keeps its HPA (and any strategy state attached to it): a "new" root can be
    an old shadow page whose root_count went back to 0 without being zapped.
    """
    kvm, key = vcpu.kvm, (gfn, role)
    sp = kvm.mmu_page_hash.get(key)
    if sp is None or is_obsolete_sp(kvm, sp):
        sp = kvm_mmu_alloc_root_page(vcpu, role, gfn, tdp=False)
        kvm.mmu_page_hash[key] = sp
    return sp


def mmu_alloc_shadow_roots(vcpu: KvmVcpu) -> KvmMmuRootInfo:
    """guest_mmu for nested EPT: the root shadows L1's EPT12 root table at gfn = EPTP12."""
    mmu = vcpu.arch.mmu
    gfn = vcpu.nested_eptp12
    if not vcpu.nested_eptp12_backed:  # !kvm_vcpu_is_visible_gfn(): kvm_mmu_get_dummy_root()
        # returns before "mmu->root.pgd = root_pgd": the pgd stays 0, so no single-context L1
        # INVEPT ever matches (nested_ept_root_matches) and frees the dummy root
        return KvmMmuRootInfo(0, DUMMY_ROOT_HPA, None)
    sp = kvm_mmu_get_shadow_page(vcpu, gfn, mmu.root_role)
    sp.root_count += 1
    strategy = vcpu.kvm.host.strategy
    strategy.root_referenced(vcpu, sp)
    if sp.root_count == 1:  # "!sp->root_count++": the moment strategy B broadcasts
        strategy.root_allocated(vcpu, sp)
    return KvmMmuRootInfo(gfn, sp.hpa, sp)


def kvm_mmu_load(vcpu: KvmVcpu) -> None:
    """Get a root for vcpu->arch.mmu, then flush it on this pCPU only (flush_tlb_current).

    This flush happens on every load, also when an existing TDP root is merely re-referenced;
    it is what lets freeing a root skip any flush.
    """
    mmu, host = vcpu.arch.mmu, vcpu.kvm.host
    host.pool.topup(vcpu, vcpu.kvm.node, host.now)
    host.strategy.mmu_topup_memory_caches(vcpu)
    if mmu.root_role.direct:
        sp = kvm_tdp_mmu_alloc_root(vcpu)
        mmu.root = KvmMmuRootInfo(0, sp.hpa, sp)
    else:
        mmu.root = mmu_alloc_shadow_roots(vcpu)
    mmu.root_via_fast_switch = False
    vcpu.kvm.host.strategy.kvm_mmu_load_flush(vcpu)


# --- freeing ------------------------------------------------------------------------------
def kvm_tdp_mmu_put_root(kvm: Kvm, sp: KvmMmuPage) -> None:
    """Drop a reference; the last one (only possible once invalidated) frees via RCU."""
    sp.root_count -= 1
    if sp.root_count == 0:
        kvm.tdp_mmu_roots.remove(sp)
        kvm_mmu_free_page(kvm, sp)


def mmu_free_root_page(kvm: Kvm, root: KvmMmuRootInfo) -> bool:
    """Returns True if a shadow page was zapped (the caller then commits: remote flush)."""
    sp = root.sp
    if sp is None:  # special root
        return False
    if sp.tdp_mmu_page:
        kvm_tdp_mmu_put_root(kvm, sp)
        return False
    sp.root_count -= 1
    if sp.root_count == 0 and sp.invalid:
        kvm_mmu_free_page(kvm, sp)
        return True
    return False


def kvm_mmu_free_roots(kvm: Kvm, mmu: KvmMmu, roots_to_free: int) -> None:
    """prev_roots[0..2] first, then the active root, as mmu.c does: with a LIFO page pool the
    order decides which freed page the next root reuses."""
    zapped = False
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        if roots_to_free & KVM_MMU_ROOT_PREVIOUS(i) and VALID_PAGE(mmu.prev_roots[i].hpa):
            zapped |= mmu_free_root_page(kvm, mmu.prev_roots[i])
            mmu.prev_roots[i] = INVALID_ROOT
    if roots_to_free & KVM_MMU_ROOT_CURRENT and VALID_PAGE(mmu.root.hpa):
        zapped |= mmu_free_root_page(kvm, mmu.root)
        mmu.root = INVALID_ROOT
    if zapped:  # kvm_mmu_commit_zap_page()
        kvm_flush_remote_tlbs(kvm)


def kvm_mmu_unload(vcpu: KvmVcpu) -> None:
    """Free every root of root_mmu and guest_mmu (KVM_MMU_ROOTS_ALL)."""
    kvm_mmu_free_roots(vcpu.kvm, vcpu.arch.root_mmu, KVM_MMU_ROOTS_ALL)
    kvm_mmu_free_roots(vcpu.kvm, vcpu.arch.guest_mmu, KVM_MMU_ROOTS_ALL)


def is_obsolete_root(kvm: Kvm, root: KvmMmuRootInfo) -> bool:
    """Roots without a shadow page (the dummy root) are always treated as obsolete: a memslot
    change may have made their gfn visible."""
    return root.sp is None or is_obsolete_sp(kvm, root.sp)


def kvm_mmu_free_obsolete_roots(vcpu: KvmVcpu) -> None:
    for mmu in (vcpu.arch.root_mmu, vcpu.arch.guest_mmu):
        roots = sum(
            (KVM_MMU_ROOT_CURRENT if i == 0 else KVM_MMU_ROOT_PREVIOUS(i - 1))
            for i, r in enumerate(mmu.slots())
            if VALID_PAGE(r.hpa) and is_obsolete_root(vcpu.kvm, r)
        )
        if roots:
            kvm_mmu_free_roots(vcpu.kvm, mmu, roots)


# --- switching to a cached root -----------------------------------------------------------
def is_root_usable(root: KvmMmuRootInfo, pgd: int, role: KvmMmuPageRole) -> bool:
    if not VALID_PAGE(root.hpa) or root.sp is None:
        return False
    if not role.direct and pgd != root.pgd:
        return False
    return role == root.sp.role and not root.sp.invalid


def cached_root_find_and_keep_current(kvm: Kvm, mmu: KvmMmu, pgd: int, role: KvmMmuPageRole) -> bool:
    """Rotate current into prev_roots while searching; on a miss free the LRU root."""
    if is_root_usable(mmu.root, pgd, role):
        return True
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        mmu.root, mmu.prev_roots[i] = mmu.prev_roots[i], mmu.root
        if is_root_usable(mmu.root, pgd, role):
            return True
    kvm_mmu_free_roots(kvm, mmu, KVM_MMU_ROOT_CURRENT)
    return False


def cached_root_find_without_current(kvm: Kvm, mmu: KvmMmu, pgd: int, role: KvmMmuPageRole) -> bool:
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        if is_root_usable(mmu.prev_roots[i], pgd, role):
            mmu.root, mmu.prev_roots[i] = mmu.prev_roots[i], mmu.root
            mmu.prev_roots[i:] = [*mmu.prev_roots[i + 1 :], INVALID_ROOT]
            return True
    return False


def fast_pgd_switch(kvm: Kvm, mmu: KvmMmu, pgd: int, role: KvmMmuPageRole) -> bool:
    if VALID_PAGE(mmu.root.hpa) and mmu.root.sp is None:  # special roots are never cached
        kvm_mmu_free_roots(kvm, mmu, KVM_MMU_ROOT_CURRENT)
    if VALID_PAGE(mmu.root.hpa):
        return cached_root_find_and_keep_current(kvm, mmu, pgd, role)
    return cached_root_find_without_current(kvm, mmu, pgd, role)


def kvm_mmu_new_pgd(vcpu: KvmVcpu, pgd: int) -> None:
    """Switch vcpu->arch.mmu to `pgd`: a cache hit only reloads EPT_POINTER, with NO flush
    (hazard H3); a miss leaves the root invalid for kvm_mmu_reload() -> kvm_mmu_load()."""
    mmu = vcpu.arch.mmu
    was = mmu.root.sp
    if not fast_pgd_switch(vcpu.kvm, mmu, pgd, mmu.root_role):
        return
    kvm_make_request(KVM_REQ_LOAD_MMU_PGD, vcpu)
    if mmu.root.sp is not was:
        mmu.root_via_fast_switch = True


# --- VM-wide zaps -------------------------------------------------------------------------
def kvm_mmu_zap_leafs(kvm: Kvm, eptp12: int = 0) -> None:
    """SPTEs were zapped in every root that maps the range (all of them for an mmu_notifier
    range; only the shadow-EPT roots of one EPTP12 for kvm_mmu_track_write), then flushed."""
    for sp in kvm.roots.values():
        if eptp12 == 0 or (not sp.tdp_mmu_page and sp.gfn == eptp12):
            sp.epoch += 1
    kvm_flush_remote_tlbs(kvm)


def kvm_mmu_zap_shadow_root(kvm: Kvm, eptp12: int) -> None:
    """kvm_mmu_track_write() on write flooding (detect_write_flooding()) or a misaligned write
    to L1's EPT12 root table: kvm_mmu_prepare_zap_page() on the shadow root itself. It leaves
    the hash, becomes invalid (obsolete) with its SPTEs zapped, and is freed now if no vCPU
    holds it; otherwise every vCPU gets KVM_REQ_MMU_FREE_OBSOLETE_ROOTS and its next entry frees
    it and loads a new shadow root (root_count 0 -> 1: B's broadcast). Then the commit's remote
    flush."""
    in_use = False
    for key, sp in list(kvm.mmu_page_hash.items()):
        if sp.gfn != eptp12 or sp.invalid:
            continue
        del kvm.mmu_page_hash[key]
        sp.invalid, sp.epoch = True, sp.epoch + 1
        if sp.root_count:
            in_use = True
        else:
            kvm_mmu_free_page(kvm, sp)
    if in_use:
        kvm_make_all_cpus_request(kvm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    kvm_flush_remote_tlbs(kvm)


def kvm_tdp_mmu_invalidate_roots(kvm: Kvm) -> None:
    """Mark valid roots invalid and schedule them for zapping; roots invalidated earlier are
    already scheduled (or zapped): their TDP MMU reference must be put only once."""
    for sp in kvm.tdp_mmu_roots:
        if not sp.invalid:
            sp.invalid = True
            sp.tdp_mmu_scheduled_root_to_zap = True


def kvm_zap_obsolete_pages(kvm: Kvm) -> None:
    """Zap obsolete shadow pages: unused roots now, roots in use once their root_count drops.
    A shadow root always has child pages (not modelled one by one) that are zapped now, so any
    obsolete shadow page means a non-empty invalid list: kvm_mmu_commit_zap_page() flushes."""
    zapped = False
    for key, sp in list(kvm.mmu_page_hash.items()):
        if not is_obsolete_sp(kvm, sp):
            continue
        del kvm.mmu_page_hash[key]
        sp.invalid = True
        zapped = True
        if sp.root_count == 0:
            kvm_mmu_free_page(kvm, sp)
    if zapped:
        kvm_flush_remote_tlbs(kvm)


def kvm_tdp_mmu_zap_invalidated_roots(kvm: Kvm) -> None:
    """Put the TDP MMU's own reference of each root scheduled for zapping (freed if no vCPU
    holds it any more)."""
    for sp in [r for r in kvm.tdp_mmu_roots if r.tdp_mmu_scheduled_root_to_zap]:
        sp.tdp_mmu_scheduled_root_to_zap = False
        kvm_tdp_mmu_put_root(kvm, sp)


def kvm_mmu_zap_all_fast(kvm: Kvm) -> None:
    """Memslot delete/move with KVM_X86_QUIRK_SLOT_ZAP_ALL: invalidate every root; vCPUs drop
    them (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kicking those in guest mode) and load new ones,
    flushing only locally. No remote TLB flush for the TDP roots."""
    kvm.mmu_valid_gen ^= 1
    kvm_tdp_mmu_invalidate_roots(kvm)
    kvm_make_all_cpus_request(kvm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    kvm_zap_obsolete_pages(kvm)
    kvm_tdp_mmu_zap_invalidated_roots(kvm)


def kvm_mmu_uninit_vm(kvm: Kvm) -> None:
    """VM teardown after all vCPUs dropped their roots: the same zap of every root (no vCPU is
    in guest mode any more, so nobody is kicked), after which every root page is freed."""
    kvm_mmu_zap_all_fast(kvm)
    assert not kvm.roots, f"roots leaked at VM destroy: {list(kvm.roots.values())}"
