// hvmodel.metrics for the fast engine: noise windows, stale-use examples, strategy memory.
// Every sum is taken in the same order as the reference (per pCPU, event by event), so the
// floating-point results are the same bit for bit.
#pragma once

#include "state.h"

namespace hv {

inline void mask_alloc(State& s, i64 nbytes) {
    s.mask_now += nbytes;
    if (s.mask_now > s.event_peak) s.event_peak = s.mask_now;
    if (s.mask_now > s.vmc[CPUMASK_BYTES_PEAK]) s.vmc[CPUMASK_BYTES_PEAK] = s.mask_now;
}

inline void mask_free(State& s, i64 nbytes) { s.mask_now -= nbytes; }

inline void close_window(State& s, i64 cpu) {
    double noise = s.win_noise[cpu];
    if (noise > s.f(NOISE_MAX_WINDOW_US, cpu)) s.f(NOISE_MAX_WINDOW_US, cpu) = noise;
    if (noise > s.noise_budget_us) s.c(RT_BUDGET_VIOLATIONS, cpu)++;
    s.win_noise[cpu] = 0.0;
}

// Metrics.record_noise for one pCPU: one interruption of `us` at time t_ns.
inline void record_noise(State& s, i64 cpu, i64 t_ns, double us) {
    if (us < s.noise_threshold_us) return;
    s.f(NOISE_US, cpu) += us;
    s.c(NOISE_EVENTS, cpu)++;
    if (us > s.f(NOISE_MAX_SINGLE_US, cpu)) s.f(NOISE_MAX_SINGLE_US, cpu) = us;
    i64 w = t_ns / s.noise_period_ns;
    if (w != s.win[cpu]) {
        close_window(s, cpu);
        s.win[cpu] = w;
    }
    s.win_noise[cpu] += us;
}

inline void close_all_windows(State& s) {
    for (i64 cpu = 0; cpu < s.n_cpus; cpu++)
        if (s.win[cpu] >= 0) {
            close_window(s, cpu);
            s.win[cpu] = -1;
        }
}

// a strictly before b on (t_ns, pcpu, vm, vcpu)
inline bool example_before(const i64* a, const i64* b) {
    for (int c = 0; c < 4; c++)
        if (a[c] != b[c]) return a[c] < b[c];
    return false;
}

// Metrics.stale: count a stale use, and keep it if it is among the first max_examples in the
// (t_ns, pcpu, vm, vcpu) order. Ties keep arrival order, as Python's stable sort does.
inline void stale(State& s, i64 cpu, int kinds, const i64* example) {
    s.c(STALE_TLB_USES, cpu)++;
    s.stale_kind[__builtin_ctz(kinds)]++;
    for (int k = 0; k < N_HAZARDS; k++) s.stale_any[k] += (kinds >> k) & 1;
    i64 n = s.ex_n, k = s.max_examples;
    if (n == k && (k == 0 || !example_before(example, &s.ex[(n - 1) * N_EX]))) return;
    i64 i = n;
    for (; i > 0 && example_before(example, &s.ex[(i - 1) * N_EX]); i--)
        std::copy_n(&s.ex[(i - 1) * N_EX], N_EX, &s.ex[i * N_EX]);
    std::copy_n(example, N_EX, &s.ex[i * N_EX]);
    s.ex_n = n + 1 < k ? n + 1 : k;
}

}  // namespace hv
