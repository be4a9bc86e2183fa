"""The libvirt side of the engine: connection, domain disks, backup jobs, checkpoints."""
