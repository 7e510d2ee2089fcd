"""The other readings of a proposal, where the mail allows more than one (docs/findings.md says
which verdict rests on which). Each is a factory the tests call like a strategy class; its
`name` is the one its conf/strategy YAML gives the run."""

from functools import partial

from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.vm_ever_ran_mask import VmEverRanMask


def reading(cls, name: str, **params):
    factory = partial(cls, **params)
    factory.name = name
    return factory


READINGS = [
    reading(IpiAllOnAlloc, "ipi_all_on_alloc_elide", elide_migration_flush=True),
    reading(VmEverRanMask, "vm_ever_ran_mask_elide", elide_migration_flush=True),
    reading(VmEverRanMask, "vm_ever_ran_mask_elide_global", elide_migration_flush=True, first_visit_flush="global"),
    reading(PerRootCpumask, "per_root_cpumask_reference", mask_lifetime="reference"),
    reading(PerRootCpumask, "per_root_cpumask_memory_cache", mask_source="memory_cache"),
]
