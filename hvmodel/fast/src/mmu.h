// hvmodel.mmu for the fast engine: roots, their lifetime, and the per-vCPU root caches.
//
// A vCPU's root_mmu / guest_mmu slots (root, prev_roots[0..2]) are (pgd, hpa, root slot) in
// m_pgd / m_hpa / m_sp; the slot is -1 for an invalid or special root.
#pragma once

#include "kvm_main.h"
#include "x86_ops.h"

namespace hv {

// --- roles --------------------------------------------------------------------------------
// kvm_calc_tdp_mmu_root_page_role(): level from guest MAXPHYADDR (per VM), smm and guest_mode
// from vCPU state.
inline i64 tdp_role(const State& s, i64 v) {
    i64 role = s.vm_level[s.v_vm[v]] | ROLE_DIRECT;
    if (s.v_gmode[v]) role |= ROLE_GUEST_MODE;
    if (s.v_smm[v]) role |= ROLE_SMM;
    if (!s.ept_ad) role |= ROLE_AD_DISABLED;
    return role;
}

// kvm_calc_shadow_ept_root_page_role()
inline i64 shadow_ept_role(const State& s) { return 4 | ROLE_GUEST_MODE | (s.ept_ad ? 0 : ROLE_AD_DISABLED); }

inline void kvm_init_mmu(State& s, i64 v) {
    if (s.v_mmu[v] == ROOT_MMU) s.role(v, ROOT_MMU) = tdp_role(s, v);
}

inline void set_slot(State& s, i64 v, int m, int k, i64 pgd, i64 hpa, i64 r) {
    i64 i = s.slot(v, m, k);
    s.m_pgd[i] = pgd, s.m_hpa[i] = hpa, s.m_sp[i] = r;
}

inline void swap_slots(State& s, i64 v, int m, int a, int b) {
    i64 i = s.slot(v, m, a), j = s.slot(v, m, b);
    std::swap(s.m_pgd[i], s.m_pgd[j]), std::swap(s.m_hpa[i], s.m_hpa[j]), std::swap(s.m_sp[i], s.m_sp[j]);
}

// --- root slots, and the lists the kernel keeps through them ------------------------------------
inline i64 new_root_slot(State& s) {
    if (!s.r_free.empty()) {
        i64 r = s.r_free.back();
        s.r_free.pop_back();
        return r;
    }
    size_t r = s.r_vm.size(), n = r + 1;
    for (auto* a : {&s.r_vm, &s.r_id, &s.r_serial, &s.r_role, &s.r_gfn, &s.r_pid, &s.r_count, &s.r_epoch, &s.r_vgen,
                    &s.r_next, &s.r_prev, &s.r_tnext, &s.r_tprev, &s.r_hnext, &s.r_hprev, &s.r_row, &s.r_gen})
        a->resize(n, NONE);
    for (auto* a : {&s.r_invalid, &s.r_tdp, &s.r_sched, &s.r_inhash}) a->resize(n, 0);
    return i64(r);
}

// One of a VM's lists of roots in insertion order: kvm->roots (a dict in the reference),
// kvm->arch.tdp_mmu_roots, or the shadow page hash.
struct RootList {
    std::vector<i64>&next, &prev, &head, &tail;

    void append(i64 vm, i64 r) {
        next[r] = NONE, prev[r] = tail[vm];
        (tail[vm] == NONE ? head[vm] : next[tail[vm]]) = r;
        tail[vm] = r;
    }
    void remove(i64 vm, i64 r) {
        (prev[r] == NONE ? head[vm] : next[prev[r]]) = next[r];
        (next[r] == NONE ? tail[vm] : prev[next[r]]) = prev[r];
    }
    // list[key] = new for a key already present: the entry keeps its place
    void replace(i64 vm, i64 old, i64 r) {
        next[r] = next[old], prev[r] = prev[old];
        (prev[r] == NONE ? head[vm] : next[prev[r]]) = r;
        (next[r] == NONE ? tail[vm] : prev[next[r]]) = r;
    }
};

inline RootList vm_roots(State& s) { return {s.r_next, s.r_prev, s.vm_rhead, s.vm_rtail}; }
inline RootList tdp_mmu_roots(State& s) { return {s.r_tnext, s.r_tprev, s.vm_thead, s.vm_ttail}; }
inline RootList mmu_page_hash(State& s) { return {s.r_hnext, s.r_hprev, s.vm_hhead, s.vm_htail}; }

// --- allocation ---------------------------------------------------------------------------
// tdp_mmu_alloc_sp() / kvm_mmu_alloc_shadow_page(): a page from the VM's node.
inline i64 kvm_mmu_alloc_root_page(State& s, i64 v, i64 role, i64 gfn, bool tdp) {
    i64 r = new_root_slot(s), vm = s.v_vm[v];
    s.r_vm[r] = vm, s.r_id[r] = ++s.vm_next_rid[vm], s.r_serial[r] = s.next_serial++;
    s.r_role[r] = role, s.r_gfn[r] = gfn, s.r_pid[r] = root_page_alloc(s, v, s.vm_node[vm]);
    s.r_count[r] = 0, s.r_epoch[r] = 0, s.r_vgen[r] = s.vm_vgen[vm];
    s.r_invalid[r] = 0, s.r_tdp[r] = tdp, s.r_sched[r] = 0, s.r_inhash[r] = 0;
    vm_roots(s).append(vm, r);
    s.vmc[ROOT_ALLOCS]++;
    policy::root_created(s, v, r);
    return r;
}

// The page goes back to the allocator. No TLB flush: KVM relies on flush-at-first-use.
inline void kvm_mmu_free_page(State& s, i64 vm, i64 r) {
    vm_roots(s).remove(vm, r);
    s.vmc[ROOT_FREES]++;
    policy::root_freed(s, r);
    page_release(s, s.vm_node[vm], s.r_pid[r], s.r_tdp[r]);
    s.r_row[r] = NONE;
    s.r_free.push_back(r);
}

// The strategy's flush of a new root: B on_each_cpu(), C on the VM's ever-ran mask.
inline void root_allocated(State& s, i64 v, i64 r) {
    auto scope = policy::root_allocated(s);
    if (scope == policy::ALLOC_NOTHING) return;
    i64 cpu = s.v_cpu[v], pid = s.r_pid[r];
    if (scope == policy::ALLOC_FLUSH_ALL) {
        invept_single(s, cpu, pid);
        send_ipis_all(s, cpu, IPI_FLUSH, pid);
        return;
    }
    std::vector<i64> cpus(s.n_cpus);
    const u64* ever_ran = s.row(s.vm_row[s.v_vm[v]]);
    i64 n = bits_to_list(ever_ran, s.words, cpus.data());
    if (bit_test(ever_ran, cpu)) invept_single(s, cpu, pid);
    send_ipis(s, cpu, cpus.data(), n, IPI_FLUSH, pid);
}

// A valid root with the same role.word, else a new one with refcount 2 (this vCPU, and the
// TDP MMU until the root is invalidated).
inline i64 kvm_tdp_mmu_alloc_root(State& s, i64 v) {
    i64 vm = s.v_vm[v], role = s.role(v, int(s.v_mmu[v]));
    for (i64 r = s.vm_thead[vm]; r != NONE; r = s.r_tnext[r])
        if (s.r_role[r] == role && !s.r_invalid[r]) {
            s.r_count[r]++;
            return r;
        }
    i64 r = kvm_mmu_alloc_root_page(s, v, role, 0, true);
    s.r_count[r] = 2;
    tdp_mmu_roots(s).append(vm, r);
    root_allocated(s, v, r);
    return r;
}

inline bool is_obsolete_sp(const State& s, i64 vm, i64 r) {
    return s.r_invalid[r] || (!s.r_tdp[r] && s.r_vgen[r] != s.vm_vgen[vm]);
}

// The shadow page for (gfn, role) in the VM's hash, or a new one.
inline i64 kvm_mmu_get_shadow_page(State& s, i64 v, i64 gfn, i64 role) {
    i64 vm = s.v_vm[v];
    i64 found = s.vm_hhead[vm];
    while (found != NONE && !(s.r_gfn[found] == gfn && s.r_role[found] == role)) found = s.r_hnext[found];
    if (found != NONE && !is_obsolete_sp(s, vm, found)) return found;
    i64 r = kvm_mmu_alloc_root_page(s, v, role, gfn, false);
    s.r_inhash[r] = 1;
    if (found == NONE) {
        mmu_page_hash(s).append(vm, r);
    } else {
        mmu_page_hash(s).replace(vm, found, r);
        s.r_inhash[found] = 0;
    }
    return r;
}

// Get a root for vcpu->arch.mmu, then (per strategy) flush it on this pCPU only: "the
// provenance of the root is unknown".
inline void kvm_mmu_load(State& s, i64 v) {
    int m = int(s.v_mmu[v]);
    page_topup(s, v, s.vm_node[s.v_vm[v]]);
    policy::mmu_topup_memory_caches(s, v);
    if (s.role(v, m) & ROLE_DIRECT) {
        i64 r = kvm_tdp_mmu_alloc_root(s, v);
        set_slot(s, v, m, 0, 0, page_hpa(s, s.r_pid[r]), r);
    } else if (!s.v_backed[v]) {  // kvm_mmu_get_dummy_root()
        set_slot(s, v, m, 0, 0, DUMMY_ROOT_HPA, NONE);  // pgd stays 0: no L1 INVEPT matches it
    } else {
        i64 r = kvm_mmu_get_shadow_page(s, v, s.v_eptp12[v], s.role(v, m));
        s.r_count[r]++;
        set_slot(s, v, m, 0, s.v_eptp12[v], page_hpa(s, s.r_pid[r]), r);
        policy::root_referenced(s, r);
        if (s.r_count[r] == 1) root_allocated(s, v, r);  // "!sp->root_count++"
    }
    s.fast(v, m) = 0;
    if (policy::kvm_mmu_load_flushes(s)) flush_tlb_current(s, v);
}

// --- freeing ------------------------------------------------------------------------------
// Drop a reference; the last one (only possible once invalidated) frees via RCU.
inline void kvm_tdp_mmu_put_root(State& s, i64 vm, i64 r) {
    if (--s.r_count[r] == 0) {
        tdp_mmu_roots(s).remove(vm, r);
        kvm_mmu_free_page(s, vm, r);
    }
}

// Returns true if a shadow page was zapped (the caller then commits: remote flush).
inline bool mmu_free_root_page(State& s, i64 vm, i64 r) {
    if (r == NONE) return false;
    if (s.r_tdp[r]) {
        kvm_tdp_mmu_put_root(s, vm, r);
        return false;
    }
    if (--s.r_count[r] == 0 && s.r_invalid[r]) {
        kvm_mmu_free_page(s, vm, r);
        return true;
    }
    return false;
}

// prev_roots[0..2] (slots 1..3) first, then the active root (slot 0), as mmu.c does: with a
// LIFO page pool the order decides which freed page the next root reuses.
inline void kvm_mmu_free_roots(State& s, i64 vm, i64 v, int m, i64 roots_to_free) {
    bool zapped = false;
    for (int j = 1; j <= SLOTS; j++)
        if (int k = j % SLOTS; (roots_to_free & (1 << k)) && s.m_hpa[s.slot(v, m, k)] != NONE) {
            zapped |= mmu_free_root_page(s, vm, s.m_sp[s.slot(v, m, k)]);
            set_slot(s, v, m, k, 0, NONE, NONE);
        }
    if (zapped) kvm_flush_remote_tlbs(s, vm);  // kvm_mmu_commit_zap_page()
}

inline void kvm_mmu_unload(State& s, i64 v) {
    kvm_mmu_free_roots(s, s.v_vm[v], v, ROOT_MMU, KVM_MMU_ROOTS_ALL);
    kvm_mmu_free_roots(s, s.v_vm[v], v, GUEST_MMU, KVM_MMU_ROOTS_ALL);
}

// Roots without a shadow page (the dummy root) count as obsolete: a memslot change may have
// made their gfn visible.
inline void kvm_mmu_free_obsolete_roots(State& s, i64 v) {
    i64 vm = s.v_vm[v];
    for (int m = 0; m < 2; m++) {
        i64 roots = 0;
        for (int k = 0; k < SLOTS; k++) {
            i64 r = s.m_sp[s.slot(v, m, k)];
            if (s.m_hpa[s.slot(v, m, k)] != NONE && (r == NONE || is_obsolete_sp(s, vm, r))) roots |= 1 << k;
        }
        if (roots) kvm_mmu_free_roots(s, vm, v, m, roots);
    }
}

// --- switching to a cached root -----------------------------------------------------------
inline bool is_root_usable(const State& s, i64 v, int m, int k, i64 pgd, i64 role) {
    i64 i = s.slot(v, m, k), r = s.m_sp[i];
    if (s.m_hpa[i] == NONE || r == NONE) return false;
    if (!(role & ROLE_DIRECT) && pgd != s.m_pgd[i]) return false;
    return role == s.r_role[r] && !s.r_invalid[r];
}

inline bool fast_pgd_switch(State& s, i64 vm, i64 v, int m, i64 pgd, i64 role) {
    if (s.m_hpa[s.slot(v, m, 0)] != NONE && s.m_sp[s.slot(v, m, 0)] == NONE)  // special roots are never cached
        kvm_mmu_free_roots(s, vm, v, m, KVM_MMU_ROOT_CURRENT);
    if (s.m_hpa[s.slot(v, m, 0)] != NONE) {  // cached_root_find_and_keep_current()
        if (is_root_usable(s, v, m, 0, pgd, role)) return true;
        for (int k = 1; k < SLOTS; k++) {  // rotate current into prev_roots while searching
            swap_slots(s, v, m, 0, k);
            if (is_root_usable(s, v, m, 0, pgd, role)) return true;
        }
        kvm_mmu_free_roots(s, vm, v, m, KVM_MMU_ROOT_CURRENT);
        return false;
    }
    for (int k = 1; k < SLOTS; k++)  // cached_root_find_without_current()
        if (is_root_usable(s, v, m, k, pgd, role)) {
            swap_slots(s, v, m, 0, k);
            for (int j = k; j < SLOTS - 1; j++) swap_slots(s, v, m, j, j + 1);
            set_slot(s, v, m, SLOTS - 1, 0, NONE, NONE);
            return true;
        }
    return false;
}

// A cache hit only reloads EPT_POINTER, with NO flush (H3); a miss leaves the root invalid for
// kvm_mmu_load().
inline void kvm_mmu_new_pgd(State& s, i64 v, i64 pgd) {
    int m = int(s.v_mmu[v]);
    i64 was = s.m_sp[s.slot(v, m, 0)];
    if (!fast_pgd_switch(s, s.v_vm[v], v, m, pgd, s.role(v, m))) return;
    s.v_req[v] |= KVM_REQ_LOAD_MMU_PGD;
    if (s.m_sp[s.slot(v, m, 0)] != was) s.fast(v, m) = 1;
}

// --- VM-wide zaps -------------------------------------------------------------------------
// SPTEs were zapped in every root that maps the range (all of them for an mmu_notifier range;
// only the shadow-EPT roots of one EPTP12 for kvm_mmu_track_write), then flushed.
inline void kvm_mmu_zap_leafs(State& s, i64 vm, i64 eptp12) {
    for (i64 r = s.vm_rhead[vm]; r != NONE; r = s.r_next[r])
        if (eptp12 == 0 || (!s.r_tdp[r] && s.r_gfn[r] == eptp12)) s.r_epoch[r]++;
    kvm_flush_remote_tlbs(s, vm);
}

// kvm_mmu_track_write() on write flooding or a misaligned write to L1's EPT12 root table:
// kvm_mmu_prepare_zap_page() on the shadow root itself (mmu.kvm_mmu_zap_shadow_root).
inline void kvm_mmu_zap_shadow_root(State& s, i64 vm, i64 eptp12) {
    bool in_use = false;
    for (i64 r = s.vm_hhead[vm], next; r != NONE; r = next) {
        next = s.r_hnext[r];
        if (s.r_gfn[r] != eptp12 || s.r_invalid[r]) continue;
        mmu_page_hash(s).remove(vm, r);
        s.r_inhash[r] = 0, s.r_invalid[r] = 1, s.r_epoch[r]++;
        if (s.r_count[r]) in_use = true;
        else kvm_mmu_free_page(s, vm, r);
    }
    if (in_use) kvm_make_all_cpus_request(s, vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS);
    kvm_flush_remote_tlbs(s, vm);
}

inline void kvm_tdp_mmu_invalidate_roots(State& s, i64 vm) {
    for (i64 r = s.vm_thead[vm]; r != NONE; r = s.r_tnext[r])
        if (!s.r_invalid[r]) s.r_invalid[r] = 1, s.r_sched[r] = 1;
}

inline void kvm_zap_obsolete_pages(State& s, i64 vm) {
    bool zapped = false;
    for (i64 r = s.vm_hhead[vm], next; r != NONE; r = next) {
        next = s.r_hnext[r];
        if (!is_obsolete_sp(s, vm, r)) continue;
        mmu_page_hash(s).remove(vm, r);
        s.r_inhash[r] = 0, s.r_invalid[r] = 1;
        zapped = true;
        if (s.r_count[r] == 0) kvm_mmu_free_page(s, vm, r);
    }
    if (zapped) kvm_flush_remote_tlbs(s, vm);
}

inline void kvm_tdp_mmu_zap_invalidated_roots(State& s, i64 vm) {
    for (i64 r = s.vm_thead[vm], next; r != NONE; r = next) {
        next = s.r_tnext[r];
        if (s.r_sched[r]) {
            s.r_sched[r] = 0;
            kvm_tdp_mmu_put_root(s, vm, r);
        }
    }
}

// Memslot delete/move with KVM_X86_QUIRK_SLOT_ZAP_ALL: invalidate every root; vCPUs drop them
// and load new ones, flushing only locally.
inline void kvm_mmu_zap_all_fast(State& s, i64 vm) {
    s.vm_vgen[vm] ^= 1;
    kvm_tdp_mmu_invalidate_roots(s, vm);
    kvm_make_all_cpus_request(s, vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS);
    kvm_zap_obsolete_pages(s, vm);
    kvm_tdp_mmu_zap_invalidated_roots(s, vm);
}

}  // namespace hv
