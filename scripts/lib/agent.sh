# Where the CloudStack KVM agent finds nasbackup.sh, and whether the shim is installed for
# it: one answer for install-agent, setup-host and the lab scripts (sourced, not run).
#
# The agent looks the script up in kvm.scripts.dir (agent.properties; default
# scripts/vm/hypervisor/kvm), taken as is when absolute and otherwise under paths.script
# (environment.properties; /usr/share/cloudstack-common in the packages), as CloudStack's
# Script.findScript does.
# Environment: SHIM_AGENT_CONF_DIR (default /etc/cloudstack/agent), where both files are.

agent_conf_dir=${SHIM_AGENT_CONF_DIR:-/etc/cloudstack/agent}
# The Python a copied (not linked) drop-in runs, written by install-agent.
shim_python_file=/etc/cloudstack-nasbackup-shim/python

# The last value of key $2 in the Java properties file $1 (nothing when unset or unreadable).
agent_property() {
    [ -r "$1" ] || return 0
    local key=${2//./\\.}
    sed -n "s/^[[:space:]]*$key[[:space:]]*[=:][[:space:]]*//p" "$1" | tail -n1 \
        | sed 's/[[:space:]]*$//'
}

# The directory the agent takes nasbackup.sh from.
agent_kvm_scripts_dir() {
    local dir base
    dir=$(agent_property "$agent_conf_dir/agent.properties" kvm.scripts.dir)
    dir=${dir:-scripts/vm/hypervisor/kvm}
    case "$dir" in
        /*) echo "${dir%/}" ;;
        *)
            base=$(agent_property "$agent_conf_dir/environment.properties" paths.script)
            base=${base:-/usr/share/cloudstack-common}
            echo "${base%/}/${dir%/}"
            ;;
    esac
}

# Whether the agent runs the shim on this host; prints how when it does. $1, when given, is
# the agent's nasbackup.sh (else the one the agent's configuration names).
shim_serves_agent() {
    local script=${1:-$(agent_kvm_scripts_dir)/nasbackup.sh} real
    if [ -L "$script" ]; then
        real=$(readlink -f "$script")
        if [ -f "$(dirname "$real")/../shim/cli.py" ]; then
            echo "$script links to $real"
            return 0
        fi
    fi
    if command -v dpkg-divert >/dev/null && dpkg-divert --list "$script" 2>/dev/null | grep -q .; then
        echo "dpkg diverts $script"
        return 0
    fi
    if [ -e "$shim_python_file" ]; then
        echo "$shim_python_file names the Python the agent's drop-in runs"
        return 0
    fi
    return 1
}

# The virtual environment the agent's drop-in runs in, when the shim serves the agent.
agent_venv() {
    local script real
    script=$(agent_kvm_scripts_dir)/nasbackup.sh
    if [ -r "$shim_python_file" ]; then
        dirname "$(dirname "$(cat "$shim_python_file")")"
    elif [ -L "$script" ] && real=$(readlink -f "$script") \
        && [ -f "$(dirname "$real")/../shim/cli.py" ]; then
        (cd "$(dirname "$real")/.." && echo "$PWD/.venv")
    fi
}

# For the lab scripts (demo, test, bench, fault-report), which install packages, start
# libvirtd and create VMs: refuses (exit 2) where the shim serves the agent, a production
# host, unless $2 is "yes" (the script was told --lab).
lab_only() {
    local how
    [ "${2:-no}" = yes ] && return 0
    how=$(shim_serves_agent) || return 0
    echo "$1: refusing to run on a host whose CloudStack agent runs the shim ($how)." >&2
    echo "$1: it installs packages, starts libvirtd and creates VMs: it is for a lab machine." >&2
    echo "$1: if this host is one, say so: $1 --lab" >&2
    exit 2
}
