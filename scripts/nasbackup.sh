#!/bin/sh
# Drop-in replacement for CloudStack's scripts/vm/hypervisor/kvm/nasbackup.sh: same argv,
# same stdout, same exit codes (see README.md). Copy or link it to the agent's script path.
# The project's Python is the one /etc/cloudstack-nasbackup-shim/python names (written by
# scripts/install-agent for an environment outside the clone), else the clone's .venv next
# to this file's real location (a link).
if [ -r /etc/cloudstack-nasbackup-shim/python ]; then
    python=$(cat /etc/cloudstack-nasbackup-shim/python)
else
    python=$(dirname "$(readlink -f "$0")")/../.venv/bin/python
fi
if [ ! -x "$python" ]; then
    echo "nasbackup shim is not installed: no Python environment (run scripts/setup-host)"
    exit 1
fi
exec "$python" -m shim.cli "$@"
