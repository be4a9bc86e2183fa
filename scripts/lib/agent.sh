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

# The shim clone the agent's nasbackup.sh links to (nothing, and status 1, when it does not).
agent_clone() {
    local script real
    script=$(agent_kvm_scripts_dir)/nasbackup.sh
    [ -L "$script" ] || return 1
    real=$(readlink -f "$script")
    [ -f "$(dirname "$real")/../shim/cli.py" ] || return 1
    (cd "$(dirname "$real")/.." && pwd)
}

# Whether the agent runs the shim on this host; prints how when it does.
shim_serves_agent() {
    local script clone
    script=$(agent_kvm_scripts_dir)/nasbackup.sh
    if clone=$(agent_clone); then
        echo "$script links to the clone at $clone"
        return 0
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
    local clone
    if [ -r "$shim_python_file" ]; then
        dirname "$(dirname "$(cat "$shim_python_file")")"
    elif clone=$(agent_clone); then
        echo "$clone/.venv"
    fi
}

# A script's usage: its leading comment block, after the #! line.
usage_of() {
    awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$1"
}

# The arguments of a lab script ($1 its name, $2 its path, then its arguments): --help
# prints its usage and exits; --lab lifts the guard (lab_only); the others are left in the
# array lab_args for the script.
lab_script() {
    local name=$1 path=$2 arg lab=no
    shift 2
    lab_args=()
    for arg in "$@"; do
        case "$arg" in
            -h|--help) usage_of "$path"; exit 0 ;;
            --lab) lab=yes ;;
            *) lab_args+=("$arg") ;;
        esac
    done
    lab_only "$name" "$lab"
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
