"""Volume sources from primary storage objects, as the agent builds them for the script.

A TakeBackupCommand carries, per volume, its primary store (``PrimaryDataStoreTO``) and
its path. The agent passes the path to ``nasbackup.sh -d`` as it is, except for Ceph: for
a pool of type ``RBD`` it builds QEMU's ``rbd:`` string (``KVMPhysicalDisk.
RBDStringBuilder``) from the monitors and port of the store and the Ceph user and key of
the agent's libvirt pool of the same uuid (whose secret has that uuid too). This module
builds the same string, so the engine reads what the drop-in would have been given.
The string carries the key: it is masked wherever the shim logs or prints (``shim.log``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shim.errors import UsageError

RBD = "RBD"
"""``Storage.StoragePoolType.RBD`` as GSON writes it."""


@dataclass(frozen=True)
class CephAuth:
    """The Ceph user of a pool and its key (base64, as the secret's value encodes)."""

    user: str
    key: str = field(repr=False)


def _mon_hosts(hosts: str, port: int) -> str:
    # As RBDStringBuilder composes them: each monitor (an IPv6 address bracketed, its
    # colons escaped), then "\:port" when a port is set, joined by "\;".
    composed = []
    for name in (h.strip() for h in hosts.split(",")):
        if not name:
            continue
        host = "[" + name.strip("[]").replace(":", "\\:") + "]" if ":" in name else name
        composed.append(f"{host}\\:{port}" if port > 0 else host)
    return "\\;".join(composed)


def rbd_source(pool: Mapping[str, Any], image: str, auth: CephAuth | None) -> str:
    """The ``rbd:`` string the agent passes for ``image`` (``<ceph pool>/<image>``)."""
    host = str(pool.get("host") or "")
    port = pool.get("port") or 0
    if not host:
        raise UsageError(f"RBD primary store {pool.get('uuid', '?')} has no monitor host")
    text = f"rbd:{image}:mon_host={_mon_hosts(host, int(port))}"
    if auth is None:
        text += ":auth_supported=none"
    else:
        text += f":auth_supported=cephx:id={auth.user}:key={auth.key}"
    details = pool.get("details")
    data_pool = details.get("rbd_default_data_pool") if isinstance(details, Mapping) else None
    if data_pool:
        text += f":rbd_default_data_pool={data_pool}"
    return text + ":rbd_default_format=2:client_mount_timeout=30"


def is_rbd(pool: Mapping[str, Any] | None) -> bool:
    """Whether a primary store object is a Ceph RBD pool."""
    return pool is not None and pool.get("poolType") == RBD


def ceph_auth(conn: Any, pool_uuid: str) -> CephAuth | None:
    """The Ceph user and key of the agent's libvirt pool ``pool_uuid`` (None: no auth).

    Raise UsageError when libvirt has no such pool: the agent would fail the same way.
    """
    import libvirt  # noqa: PLC0415 - only Ceph volumes need libvirt here
    from lxml import etree  # noqa: PLC0415

    try:
        pool = conn.storagePoolLookupByUUIDString(pool_uuid)
    except libvirt.libvirtError:
        raise UsageError(f"RBD pool {pool_uuid} is not defined in libvirt on this host") from None
    xml = etree.fromstring(pool.XMLDesc(0).encode())
    auth = xml.find("source/auth")
    if auth is None or not auth.get("username"):
        return None
    secret_element = auth.find("secret")
    secret_uuid = secret_element.get("uuid") if secret_element is not None else pool_uuid
    try:
        value = conn.secretLookupByUUIDString(secret_uuid or pool_uuid).value()
    except libvirt.libvirtError:
        raise UsageError(f"the Ceph secret of RBD pool {pool_uuid} is not readable") from None
    return CephAuth(user=auth.get("username", ""), key=base64.b64encode(value).decode())
