// hvmodel.fast._engine: the compiled engine, one State per hvmodel.fast.engine.FastEngine.
//
// replay() reads records straight from a chunk of the binary trace (hvmodel.trace.EVENT_DTYPE,
// packed: engine.py checks the layout against EVENT_LAYOUT) and releases the GIL while it runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <tuple>

#include "check.h"
#include "kvm.h"

namespace py = pybind11;
using namespace hv;

#ifndef HV_SOURCE_DIGEST
#define HV_SOURCE_DIGEST "unknown"
#endif

namespace {

// itemsize, then the offsets of time_ns, kind, vm, vcpu, pcpu, arg
constexpr i64 EVENT_LAYOUT[] = {29, 0, 8, 9, 13, 17, 21};

template <class T>
T field(const char* p, i64 offset) {
    T value;
    std::memcpy(&value, p + offset, sizeof value);  // the records are packed: fields are unaligned
    return value;
}

class Engine {
   public:
    explicit Engine(const Config& c) : s(c) {}

    // Replay a chunk of records; returns how many were done (fewer than the chunk on an error).
    i64 replay(py::buffer chunk) {
        py::buffer_info b = chunk.request();
        if (b.itemsize != EVENT_LAYOUT[0] || b.ndim != 1 || (b.shape[0] > 1 && b.strides[0] != b.itemsize))
            throw std::invalid_argument("replay() needs a contiguous array of hvmodel.trace.EVENT_DTYPE records");
        const char* p = static_cast<const char*>(b.ptr);
        const i64 n = b.shape[0];
        py::gil_scoped_release unlocked;
        for (i64 i = 0; i < n; i++, p += EVENT_LAYOUT[0]) {
            s.now = field<i64>(p, EVENT_LAYOUT[1]);
            i64 level = s.event_peak = s.mask_now;
            dispatch(s, field<uint8_t>(p, EVENT_LAYOUT[2]), field<int32_t>(p, EVENT_LAYOUT[3]), field<int32_t>(p, EVENT_LAYOUT[4]),
                     field<int32_t>(p, EVENT_LAYOUT[5]), field<i64>(p, EVENT_LAYOUT[6]));
            if (s.err) return i;
            finish_event(s, s.now);
            if (s.split && (s.event_peak > level || s.mask_now != level)) {
                s.mask_event.push_back(s.events), s.mask_excursion.push_back(s.event_peak - level);
                s.mask_change.push_back(s.mask_now - level);
            }
            s.events++;
        }
        return n;
    }

    // --- hvbench-check (hvmodel/check.py): explore event sequences from copies of a state
    Engine copy() const { return *this; }

    // One event (its time: the count of events so far); false if the trace would be invalid
    // there (the state is then half-changed: drop this copy).
    bool step(int kind, i64 vm, i64 vcpu, i64 pcpu, i64 arg) {
        s.now = s.events;
        s.event_peak = s.mask_now;
        dispatch(s, kind, vm, vcpu, pcpu, arg);
        if (s.err) return false;
        finish_event(s, s.now);
        s.events++;
        return true;
    }

    // 128 bits of the state's canonical key (check.h): equal for states with the same futures
    py::bytes digest() const { return py::bytes(key_digest(state_key(s))); }

    // Every child of this state: for each letter (EVENT_DTYPE records; times are ignored) that
    // is valid here, (letter index, stale uses, first hazard kind, a 128-bit digest of the
    // child's key). The GIL is released: hvbench-check runs strategies side by side.
    py::list expand(py::buffer letters) {
        py::buffer_info b = letters.request();
        if (b.itemsize != EVENT_LAYOUT[0] || b.ndim != 1) throw std::invalid_argument("expand() needs EVENT_DTYPE records");
        const char* p = static_cast<const char*>(b.ptr);
        std::vector<std::tuple<i64, i64, i64, std::string>> out;
        {
            py::gil_scoped_release unlocked;
            Engine child(*this);
            for (i64 k = 0; k < b.shape[0]; k++, p += EVENT_LAYOUT[0]) {
                int kind = field<uint8_t>(p, EVENT_LAYOUT[2]);
                i64 vm = field<int32_t>(p, EVENT_LAYOUT[3]), vcpu = field<int32_t>(p, EVENT_LAYOUT[4]);
                i64 pcpu = field<int32_t>(p, EVENT_LAYOUT[5]), arg = field<i64>(p, EVENT_LAYOUT[6]);
                child.s = s;  // a copy that reuses the child's storage
                if (!child.step(kind, vm, vcpu, pcpu, arg)) continue;
                auto [n, first] = child.stale();
                out.emplace_back(k, n, first, n ? std::string() : key_digest(state_key(child.s)));
            }
        }
        py::list result;
        for (auto& [k, n, first, digest] : out) result.append(py::make_tuple(k, n, first, py::bytes(digest)));
        return result;
    }

    std::pair<i64, i64> stale() const {
        i64 n = 0;
        for (int k = 0; k < N_HAZARDS; k++) n += s.stale_kind[k];
        return {n, s.ex_n ? s.ex[EX_KIND] : -1};
    }

    // Stale uses so far, and the hazard kind of the first one (HAZARDS order, -1: none).
    py::tuple stale_uses() const {
        auto [n, first] = stale();
        return py::make_tuple(n, first);
    }

    // Another shard's event at t_ns broadcast kvm_flush_tlb_root to every online pCPU: each
    // (src pCPU, hpa) reaches this shard's pCPUs as in the unsplit run, then the event ends here.
    void remote_on_each_cpu(i64 t_ns, const std::vector<i64>& srcs, const std::vector<i64>& hpas) {
        py::gil_scoped_release unlocked;
        s.now = t_ns;
        for (size_t b = 0; b < srcs.size(); b++) {
            i64 pid = page_id(s, hpas[b]);
            for (i64 cpu : s.local_cpus)
                if (cpu != srcs[b]) deliver(s, cpu, IPI_FLUSH, pid);
        }
        finish_event(s, t_ns);
    }

    // The on_each_cpu broadcasts so far that left this shard: (event index, src, hpa) columns.
    py::tuple take_outbox() { return take(s.out_event, s.out_src, s.out_hpa); }

    // Per event that changed strategy memory: (event index, the most bytes above the level before
    // it, the change): what the whole host's cpumask_bytes_peak is made of.
    py::tuple take_mask_series() { return take(s.mask_event, s.mask_excursion, s.mask_change); }

    // Metrics.result(), as arrays: close the open noise windows, and the guest-mode, steal and
    // lifetime intervals still open at end_ns (Host.close_accounting), first. Call once, at the end.
    py::tuple result(i64 end_ns) {
        close_all_windows(s);
        close_accounting(s, end_ns);
        s.vmc[EVENTS] = s.events;
        auto matrix = [](const auto& v, i64 rows, i64 cols) {
            using T = typename std::decay_t<decltype(v)>::value_type;
            py::array_t<T> a({rows, cols});
            std::copy(v.begin(), v.begin() + rows * cols, a.mutable_data());
            return a;
        };
        std::vector<i64> vmc(s.vmc, s.vmc + N_REPLICATED), stale(s.stale_kind, s.stale_kind + N_HAZARDS);
        std::vector<i64> any(s.stale_any, s.stale_any + N_HAZARDS);
        return py::make_tuple(matrix(s.cnt, N_COUNTERS, s.n_cpus), matrix(s.flt, N_FLOATS, s.n_cpus), vmc, stale, any,
                              matrix(s.ex, s.ex_n, N_EX));
    }

    py::tuple error() const { return py::make_tuple(s.err, std::vector<i64>(s.err_args, s.err_args + 4)); }

    // (VM id, vCPU index, pCPU) of a vCPU slot, for error messages
    py::tuple vcpu(i64 v) const { return py::make_tuple(s.vm_ext[s.v_vm[v]], s.v_idx[v], s.v_cpu[v]); }

   private:
    State s;

    static py::tuple take(std::vector<i64>& a, std::vector<i64>& b, std::vector<i64>& c) {
        py::tuple out = py::make_tuple(py::array_t<i64>(a.size(), a.data()), py::array_t<i64>(b.size(), b.data()),
                                       py::array_t<i64>(c.size(), c.data()));
        a.clear(), b.clear(), c.clear();
        return out;
    }
};

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "The compiled hvbench engine (hvmodel/fast/src); use hvmodel.fast.engine.FastEngine.";
    py::class_<Config>(m, "Config")
        .def(py::init<>())
        .def_readwrite("n_cpus", &Config::n_cpus)
        .def_readwrite("n_nodes", &Config::n_nodes)
        .def_readwrite("hyperv", &Config::hyperv)
        .def_readwrite("ept_ad", &Config::ept_ad)
        .def_readwrite("cluster", &Config::cluster)
        .def_readwrite("owned", &Config::owned)
        .def_readwrite("split", &Config::split)
        .def_readwrite("local", &Config::local)
        .def_property("cost", [](const Config& c) { return std::vector<double>(c.cost, c.cost + N_COSTS); },
                      [](Config& c, const std::vector<double>& v) {
                          if (v.size() != N_COSTS) throw std::invalid_argument("cost: wrong length");
                          std::copy(v.begin(), v.end(), c.cost);
                      })
        .def_readwrite("noise_period_ns", &Config::noise_period_ns)
        .def_readwrite("noise_threshold_us", &Config::noise_threshold_us)
        .def_readwrite("noise_budget_us", &Config::noise_budget_us)
        .def_readwrite("max_examples", &Config::max_examples)
        .def_readwrite("policy", &Config::policy)
        .def_readwrite("elide_migration_flush", &Config::elide_migration_flush)
        .def_readwrite("first_visit_global", &Config::first_visit_global)
        .def_readwrite("mask_reset_on_reference", &Config::mask_reset_on_reference)
        .def_readwrite("mask_cache", &Config::mask_cache)
        .def_readwrite("page_cached", &Config::page_cached)
        .def_readwrite("rcu_grace_ns", &Config::rcu_grace_ns)
        .def_readwrite("mmus", &Config::mmus)
        .def_readwrite("prev_roots", &Config::prev_roots)
        .def_readwrite("mask_bytes", &Config::mask_bytes)
        .def_readwrite("table_bytes", &Config::table_bytes);
    py::class_<Engine>(m, "Engine")
        .def(py::init<const Config&>())
        .def("replay", &Engine::replay)
        .def("result", &Engine::result)
        .def("error", &Engine::error)
        .def("vcpu", &Engine::vcpu)
        .def("remote_on_each_cpu", &Engine::remote_on_each_cpu)
        .def("take_outbox", &Engine::take_outbox)
        .def("take_mask_series", &Engine::take_mask_series)
        .def("copy", &Engine::copy)
        .def("step", &Engine::step)
        .def("digest", &Engine::digest)
        .def("expand", &Engine::expand)
        .def("stale_uses", &Engine::stale_uses);
    m.attr("SOURCE_DIGEST") = HV_SOURCE_DIGEST;
    m.attr("EVENT_LAYOUT") = py::make_tuple(EVENT_LAYOUT[0], EVENT_LAYOUT[1], EVENT_LAYOUT[2], EVENT_LAYOUT[3],
                                            EVENT_LAYOUT[4], EVENT_LAYOUT[5], EVENT_LAYOUT[6]);
    m.attr("PER_CPU_COUNTERS") = py::make_tuple("ipi_flush", "ipi_vmclear", "vmexits_from_ipi", "invept_single", "invept_global",
                                                "invvpid", "migrations", "vmcs_first_loads", "pcpu_changes", "stale_tlb_uses",
                                                "noise_events", "rt_budget_violations", "vm_exits", "halts", "preemptions",
                                                "guest_ns", "steal_ns");
    m.attr("PER_CPU_FLOATS") = py::make_tuple("flush_overhead_us", "noise_us", "noise_max_single_us", "noise_max_window_us");
    m.attr("REPLICATED") = py::make_tuple("events", "root_allocs", "root_frees", "remote_flushes", "hv_flush_hypercalls",
                                          "vpid_exhausted", "cpumask_bytes_peak", "vcpu_ns");
    m.attr("HAZARDS") = py::make_tuple("h1", "h4", "h3", "h5", "h2");
    m.attr("COST_FIELDS") = py::make_tuple("ipi_send_us", "ipi_receive_us", "vmexit_us", "invept_single_us", "invept_global_us",
                                           "invvpid_us", "vmcs_migrate_us", "refill_us", "hv_flush_hypercall_us");
    m.attr("EXAMPLE_FIELDS") = py::make_tuple("t_ns", "pcpu", "vm", "vcpu", "kind", "mmu", "root", "hpa", "epoch", "cached_root",
                                              "cached_vm", "cached_epoch");
    m.attr("POLICIES") = py::make_tuple("upstream", "ipi_all_on_alloc", "vm_ever_ran_mask", "active_roots", "per_root_cpumask",
                                        "per_root_cpumask_clear", "root_generation", "hyperv_flush_hypercall");
}
