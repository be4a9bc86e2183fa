"""What differs between the QEMU, libvirt and coreutils releases CloudStack hosts run.

The one table of version-dependent behaviour; code that acts on one imports it from here.
Each row was found by running the suite on that release (``scripts/test``: Debian 11, 12
and 13 in chroots; QEMU 5.2, 7.2, 10.0; libvirt 7.0, 9.0, 11.3; Python 3.9, 3.11, 3.13).

Handled without a version check, because the same code is right everywhere:

* coreutils 9.2 stopped counting directories in ``du --apparent-size``: a backup's size is
  the host's own ``du -sb`` (:func:`shim.backupdir.directory_size`), as upstream's is.
* qemu-storage-daemon before 6.0 quits without closing its images, so persistent bitmaps
  added there were never stored: the daemon's images are closed (``blockdev-del``) first
  (:meth:`shim.storage_daemon.StorageDaemon`).
* libvirt before 7.2 has the backup API but refuses it to domains that did not opt in:
  the domain capabilities are asked (:func:`shim.virt.host.live_backup_supported`).
* Python 3.9 (EL9, Debian 11): :mod:`shim.compat`.
* Debian 11's QEMU 5.2 was built without zstd: compressed backups there are zlib, found by
  creating a small image (:func:`shim.targets.compression_type`), not by the version (a
  build option, which any release can lack).

Known, not worked around (see README.md, "Supported hosts"):

* From QEMU 8.2, a backup job that ends while another copies drains every block node, and
  the monitor answers nothing until the other job's writes in flight (up to 64 MiB) have
  reached the NAS; an unchanged disk's job ends inside backupBegin itself.
"""

from __future__ import annotations

MIN_QEMU = (4, 2, 0)
"""Upstream's ``sanity_checks``: the QEMU a running VM's backup needs."""
MIN_LIBVIRT = (7, 2, 0)
"""Upstream's ``sanity_checks``: the libvirt a running VM's backup needs (the first that
enables its backup API for every domain)."""
PUSH_CAP_REFUSED_BY = (11, 3, 0)
"""libvirt's backup API takes no speed. libvirt 9.0 lets ``virDomainBlockJobSetSpeed`` cap
a push backup's per-disk jobs; 11.3 answers "disk vda does not have an active block job"
(the releases between were not run). From here a capped push backup is logged as uncapped:
the method rule takes capped backups in pull mode, which caps every copy itself."""
X_PERF_SINCE = (6, 0)
"""The first QEMU whose blockdev-backup takes ``x-perf`` (the copy's parallelism)."""
