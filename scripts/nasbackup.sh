#!/bin/sh
# Drop-in replacement for CloudStack's scripts/vm/hypervisor/kvm/nasbackup.sh: same argv,
# same stdout, same exit codes (see README.md). Copy or link it to the agent's script path.
# The project's Python is found next to this file's real location (a link), or through
# /etc/cloudstack-nasbackup-shim/python (written by scripts/install-agent, for a copy).
self=$(readlink -f "$0")
python=$(dirname "$self")/../.venv/bin/python
if [ ! -x "$python" ] && [ -r /etc/cloudstack-nasbackup-shim/python ]; then
    python=$(cat /etc/cloudstack-nasbackup-shim/python)
fi
if [ ! -x "$python" ]; then
    echo "nasbackup shim is not installed: no Python environment (run scripts/setup-host)"
    exit 1
fi
exec "$python" -m shim.cli "$@"
