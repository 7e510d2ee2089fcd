"""Deterministic trace generators, one module each (conf/workload/*.yaml select them by
`_target_`): partitioned_pinned, overcommit, rt_mixed, trace_file; base holds what they share."""
