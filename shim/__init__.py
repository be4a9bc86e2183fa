"""A CloudStack-compatible NAS backup agent shim for KVM hosts.

The engine lives in this package, split by concern: ``virt`` (libvirt host, domains,
backup jobs, checkpoints), ``qemu_img`` (the qemu-img tool), ``nas`` (the NAS mount
session), ``proc`` (the one subprocess helper), ``errors`` (the one error hierarchy) and
``lab`` (throwaway hypervisor fixtures for the tests and the demo).
"""

__version__ = "0.1.0"
