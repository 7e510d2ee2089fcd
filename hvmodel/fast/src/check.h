// hvbench-check's view of the model state (hvmodel/check.py): a canonical encoding, so that two
// states with the same key have the same futures under every event sequence.
//
// What a future can observe is kept: which vCPU runs where and in which mode, its MMUs' roots
// and flags, each root's flags and strategy state, the page pool's order, and each pCPU's
// cached entries. Identities that are only ever compared are renumbered by first appearance:
// root serials (a cached entry names a live root or a dead one), pages, and epochs and
// generations (an entry is current for its root or not). What no future reads is left out:
// counters, times, VPID numbers (they only pick the INVVPID a flush is counted as).
#pragma once

#include <cstring>
#include <map>
#include <string>

#include "kvm.h"

namespace hv {

class KeyWriter {
   public:
    explicit KeyWriter(const State& s) : s_(s) {}

    void put(i64 x) { out_.append(reinterpret_cast<const char*>(&x), sizeof x); }
    // a page, by the order pages are first seen; pid 0, the zero page, is the dummy root's
    i64 page_number(i64 pid) { return pid == NONE ? -1 : pid == 0 ? 0 : pages_.emplace(pid, i64(pages_.size()) + 1).first->second; }
    void page(i64 pid) { put(page_number(pid)); }
    void hpa(i64 h) { page(h == DUMMY_ROOT_HPA ? 0 : h == NONE ? NONE : page_id(s_, h)); }
    // a root slot, by its place in the VMs' kvm->roots lists (roots() must run first)
    void root(i64 r) { put(r == NONE ? -1 : root_index_.at(r)); }
    const std::string& str() const { return out_; }

    // Number the live roots in list order, VM by VM, so slots reused in another order agree.
    void roots() {
        for (size_t vm = 0; vm < s_.vm_ext.size(); vm++)
            for (i64 r = s_.vm_rhead[vm]; r != NONE; r = s_.r_next[r]) root_index_[r] = i64(root_index_.size());
    }
    i64 live_root_of_serial(i64 serial) const {
        for (auto [r, k] : root_index_)
            if (s_.r_serial[r] == serial) return r;
        return NONE;
    }

   private:
    const State& s_;
    std::string out_;
    std::map<i64, i64> pages_, root_index_;
};

inline std::string state_key(const State& s) {
    KeyWriter k(s);
    k.roots();
    for (size_t vm = 0; vm < s.vm_ext.size(); vm++) {  // VMs: fixed slots (hvbench-check creates them once)
        k.put(s.vm_ext[vm]);
        for (i64 r = s.vm_rhead[vm]; r != NONE; r = s.r_next[r]) {
            k.page(s.r_pid[r]);
            k.put(s.r_role[r]), k.put(s.r_gfn[r]), k.put(s.r_count[r]), k.put(s.r_invalid[r]), k.put(s.r_tdp[r]);
            k.put(s.r_sched[r]), k.put(s.r_inhash[r]), k.put(s.r_vgen[r] == s.vm_vgen[vm]);
            if (s.r_row[r] != NONE && policy::per_root_mask(s))
                for (i64 w = 0; w < s.words; w++) k.put(i64(s.row(s.r_row[r])[w]));
            if (s.r_row[r] != NONE && s.policy == policy::ROOT_GENERATION)
                for (i64 cpu = 0; cpu < s.n_cpus; cpu++) {
                    u32 g = s.gen_row(s.r_row[r])[cpu];
                    k.put(g == 0 ? 0 : g == u32(s.r_gen[r] + 1) ? 1 : 2);
                }
        }
        for (i64 r = s.vm_thead[vm]; r != NONE; r = s.r_tnext[r]) k.root(r);  // tdp_mmu_roots order
        k.put(-2);
        for (i64 r = s.vm_hhead[vm]; r != NONE; r = s.r_hnext[r]) k.root(r);  // the shadow page hash order
        k.put(-3);
        k.hpa(s.vm_hv_root[vm]);
        if (s.vm_row[vm] != NONE)
            for (i64 w = 0; w < s.words; w++) k.put(i64(s.row(s.vm_row[vm])[w]));
    }
    for (i64 v = 0; v < s.v_used; v++) {  // vCPUs
        k.put(s.v_cpu[v]), k.put(s.v_loaded[v]), k.put(s.v_mode[v]), k.put(s.v_req[v]), k.put(s.v_lvmcs[v]);
        k.put(s.v_vpid12[v]), k.put(s.v_eptp12[v]), k.put(s.v_mmu[v]), k.put(s.v_gmode[v]), k.put(s.v_smm[v]);
        k.put(s.v_vmxon[v]), k.put(s.v_backed[v]), k.put(s.v_resched[v]), k.put(s.v_vpid02[v] != 0);
        k.hpa(s.v_hv_root[v]);
        for (int w = 0; w < 2; w++) k.put(s.vmcs(v, w)), k.put(s.m_role[v * 2 + w]), k.put(s.m_fast[v * 2 + w]);
        for (int m = 0; m < 2; m++)
            for (int j = 0; j < SLOTS; j++) {
                i64 i = s.slot(v, m, j);
                k.put(s.m_pgd[i]), k.hpa(s.m_hpa[i]), k.root(s.m_sp[i]);
            }
        for (i64 pid : s.v_pcache[v]) k.page(pid);
        k.put(-4);
    }
    for (const auto& stack : s.pool) {  // the allocator: a new root takes the page freed last
        for (i64 pid : stack) k.page(pid);
        k.put(-5);
    }
    for (i64 cpu = 0; cpu < s.n_cpus; cpu++) {  // pCPUs and their cached entries, in a canonical order
        k.put(s.running[cpu]), k.put(s.in_guest[cpu]);
        std::vector<std::array<i64, 4>> entries;
        for (i64 j = 0; j < s.tlb_n[cpu]; j++) {
            i64 e = cpu * s.tlb_w + j, r = k.live_root_of_serial(s.tlb_serial[e]);
            // every cached page is a live root's or in the pool, so already numbered
            entries.push_back({k.page_number(s.tlb_pid[e]), r, r != NONE && s.tlb_epoch[e] == s.r_epoch[r], s.tlb_missed[e]});
        }
        std::sort(entries.begin(), entries.end());
        for (auto& [page, r, current, missed] : entries) k.put(page), k.root(r), k.put(current), k.put(missed);
        k.put(-6);
    }
    return k.str();
}

// 128 bits of a key: two 64-bit mixes (splitmix64's finalizer) over its words, different seeds.
inline std::string key_digest(const std::string& key) {
    auto mix = [](u64 z) {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    };
    u64 a = 0x9E3779B97F4A7C15ULL, b = 0xD1B54A32D192ED03ULL ^ key.size();
    for (size_t i = 0; i < key.size(); i += 8) {
        u64 w = 0;
        std::memcpy(&w, key.data() + i, std::min<size_t>(8, key.size() - i));
        a = mix(a ^ w) + 0x632BE59BD9B4E019ULL;
        b = mix(b + w) ^ 0x8CB92BA72F3D8DD7ULL;
    }
    u64 out[2] = {a, b};
    return std::string(reinterpret_cast<const char*>(out), sizeof out);
}

}  // namespace hv
