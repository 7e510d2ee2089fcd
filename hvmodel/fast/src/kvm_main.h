// hvmodel.kvm_main for the fast engine: requests, kicks, kvm_flush_remote_tlbs.
#pragma once

#include <algorithm>

#include "host.h"
#include "policy.h"

namespace hv {

// Set req on every vCPU; IPI (and wait for) only the pCPUs whose vCPU is in guest mode.
inline void kvm_make_all_cpus_request(State& s, i64 vm, i64 req) {
    i64* cpus = s.scratch.data();
    i64 n = 0;
    for (i64 v = s.vm_vcpu0[vm]; v < s.vm_vcpu0[vm] + s.vm_nvcpus[vm]; v++) {
        s.v_req[v] |= req;
        if (s.v_mode[v] == IN_GUEST_MODE) cpus[n++] = s.v_cpu[v];
    }
    std::sort(cpus, cpus + n);  // distinct: one vCPU in guest mode per pCPU
    send_ipis(s, s.this_cpu, cpus, n, IPI_FLUSH, NO_FLUSH);
}

inline void hv_track_root_tdp(State& s, i64 v, i64 root_hpa) {
    s.v_hv_root[v] = root_hpa;
    if (root_hpa != s.vm_hv_root[s.v_vm[v]]) s.vm_hv_root[s.v_vm[v]] = NONE;
}

// The cached common root, or else each vCPU's hv_root_tdp in vCPU order, skipping only repeats
// of the first one (arch/x86/kvm/kvm_onhyperv.c).
inline void hv_flush_remote_tlbs(State& s, i64 vm) {
    std::vector<i64> roots;
    if (s.vm_hv_root[vm] != NONE) {
        roots.push_back(s.vm_hv_root[vm]);
    } else {
        for (i64 v = s.vm_vcpu0[vm]; v < s.vm_vcpu0[vm] + s.vm_nvcpus[vm]; v++) {
            i64 root = s.v_hv_root[v];
            if (root != NONE && root != s.vm_hv_root[vm]) {
                if (roots.empty()) s.vm_hv_root[vm] = root;
                roots.push_back(root);
            }
        }
        if (roots.size() > 1) s.vm_hv_root[vm] = NONE;
    }
    note_remote_flush(s, vm, roots.data(), i64(roots.size()));
    for (i64 hpa : roots) hv_flush_guest_physical_address_space(s, s.this_cpu, hpa);
}

// The environment's default: hv_flush_remote_tlbs() nested on Hyper-V, else requests.
inline void kvm_arch_flush_remote_tlbs(State& s, i64 vm) {
    if (s.hyperv) return hv_flush_remote_tlbs(s, vm);
    note_remote_flush(s, vm, nullptr, -1);
    kvm_make_all_cpus_request(s, vm, KVM_REQ_TLB_FLUSH);
}

inline void kvm_flush_remote_tlbs(State& s, i64 vm) {
    s.vmc[REMOTE_FLUSHES]++;
    policy::flush_remote_tlbs(s, vm);
    kvm_arch_flush_remote_tlbs(s, vm);
}

}  // namespace hv
