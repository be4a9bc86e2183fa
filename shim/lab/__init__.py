"""Throwaway hypervisor fixtures for the tests and the demo.

A :class:`Lab` creates TCG domains shaped like CloudStack's (transient by default, named
``i-2-<n>-VM``, qcow2 v3 volumes at ``<pool-uuid>/<volume-uuid>``), writes guest data through
QEMU's block layer, takes reference backups and compares images; everything it creates is
removed by :meth:`Lab.close`, also when a test fails. See :mod:`shim.lab.lab`.
"""

from shim.lab.lab import KiB, Lab, LabVM, MiB, compare, flatten, sweep_stale_labs

__all__ = ["KiB", "Lab", "LabVM", "MiB", "compare", "flatten", "sweep_stale_labs"]
