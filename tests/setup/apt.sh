# Sourced by the test-only setup scripts (browser.sh, slurm.sh): checks whether apt-get can be
# used and installs Debian packages, retrying while another apt/dpkg holds its lock. Each
# function prints why it cannot go on and returns non-zero; the caller then exits 0, so the
# tests that need the packages skip with that reason instead of the setup failing the run.
# Needs NAME (the caller's name, for messages) and SKIPPED (what is skipped, e.g. "browser tests").

have() { command -v "$1" >/dev/null 2>&1; }

# apt-get usable here: present, and we are root
apt_usable() {
    if ! have apt-get; then
        echo "$NAME: apt-get not available; $SKIPPED will be skipped"
        return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "$NAME: not root, cannot apt-get install $*; $SKIPPED will be skipped"
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
}

# apt-get refuses to run while another apt/dpkg holds its lock: wait and retry (up to ~10 min)
apt_retry() {
    local i log
    log=$(mktemp)
    for i in $(seq 1 60); do
        if apt-get -o DPkg::Lock::Timeout=10 "$@" 2>&1 | tee "$log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
            rm -f "$log"
            return 0
        fi
        if ! grep -qiE "could not get lock|unable to acquire|is another process using it" "$log"; then
            rm -f "$log"
            return 1  # failed for another reason than the lock
        fi
        echo "$NAME: apt/dpkg lock held by another process, retrying in 10 s ($i/60)"
        sleep 10
    done
    rm -f "$log"
    return 1
}

# the package lists are updated only when they do not know every package yet
apt_lists_know() {
    local pkg
    for pkg in "$@"; do
        if ! apt-cache show "$pkg" >/dev/null 2>&1; then
            apt_retry update -qq && return 0
            echo "$NAME: apt-get update failed (no network?); $SKIPPED will be skipped"
            return 1
        fi
    done
}

apt_install() {
    apt_retry install -y -qq --no-install-recommends "$@" && return 0
    echo "$NAME: apt-get install $* failed (no network?); $SKIPPED will be skipped"
    return 1
}
