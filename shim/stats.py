"""``-o stats``: the repository's size and use, as ``df -P`` reports them."""

from __future__ import annotations

import os

from shim.contract import StorageStats
from shim.nas import MountSession, Repository


def storage_stats(repository: Repository) -> StorageStats:
    """Mount the repository and read its size and use in 1 KiB blocks (no version gate)."""
    with MountSession(repository) as session:
        st = os.statvfs(session.root)
        # df -P: total = f_blocks * f_frsize; used = (f_blocks - f_bfree) * f_frsize, in KiB
        # rounded up as df rounds.
        total = -(-st.f_blocks * st.f_frsize // 1024)
        used = -(-(st.f_blocks - st.f_bfree) * st.f_frsize // 1024)
        return StorageStats(mount_point=str(session.root), total_kib=total, used_kib=used)
