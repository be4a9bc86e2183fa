"""Throwaway hypervisor fixtures for the tests, the demo, the benchmarks and the fault report.

Test and demo equipment, not product: it lives beside the tests, is not installed by
``pip install`` and is run from a clone (``scripts/demo``, ``scripts/bench``,
``scripts/fault-report`` run it with the checkout as the working directory).

A :class:`Lab` creates TCG domains shaped like CloudStack's (transient by default, named
``i-2-<n>-VM``, qcow2 v3 volumes at ``<pool-uuid>/<volume-uuid>``), writes guest data through
QEMU's block layer, takes reference backups and compares images; everything it creates is
removed by :meth:`Lab.close`, also when a test fails. See :mod:`tests.lab.lab`.
"""

from tests.lab.lab import (
    FlakyNas,
    KiB,
    Lab,
    LabError,
    LabVM,
    MiB,
    compare,
    flatten,
    sweep_stale_labs,
)

__all__ = [
    "FlakyNas",
    "KiB",
    "Lab",
    "LabError",
    "LabVM",
    "MiB",
    "compare",
    "flatten",
    "sweep_stale_labs",
]
