#!/usr/bin/env bash
# Installs Debian's SLURM daemons and client tools (slurm-wlm: slurmctld, slurmd, sbatch,
# squeue, scancel, scontrol) and munge, for tests/test_slurm.py, which runs them itself as root
# on this one machine. Idempotent: does nothing when they are present. Exits 0 with a reason
# when apt-get cannot be used (not root, no apt-get, no network), so the SLURM tests then skip
# with that reason instead of the setup failing the whole test run.
set -u

have() { command -v "$1" >/dev/null 2>&1; }
need=(slurmctld slurmd sbatch squeue scancel scontrol munged)

missing=()
for c in "${need[@]}"; do have "$c" || [ -x "/usr/sbin/$c" ] || missing+=("$c"); done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm.sh: SLURM and munge already installed"
    exit 0
fi
if ! have apt-get; then
    echo "slurm.sh: apt-get not available; SLURM tests will be skipped (missing: ${missing[*]})"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm.sh: not root, cannot apt-get install slurm-wlm munge; SLURM tests will be skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

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
        echo "slurm.sh: apt/dpkg lock held by another process, retrying in 10 s ($i/60)"
        sleep 10
    done
    rm -f "$log"
    return 1
}

# the package scripts would start the daemons through systemd/init (absent in a container, and
# the test starts its own with its own slurm.conf): policy-rc.d tells invoke-rc.d not to
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi

if ! apt-cache show slurm-wlm >/dev/null 2>&1 || ! apt-cache show munge >/dev/null 2>&1; then
    if ! apt_retry update -qq; then
        echo "slurm.sh: apt-get update failed (no network?); SLURM tests will be skipped"
        exit 0
    fi
fi
if ! apt_retry install -y -qq --no-install-recommends slurm-wlm munge; then
    echo "slurm.sh: apt-get install slurm-wlm munge failed (no network?); SLURM tests will be skipped"
    exit 0
fi
echo "slurm.sh: installed slurm-wlm $(dpkg-query -W -f="${Version}" slurm-wlm 2>/dev/null) and $(munged --version 2>/dev/null | head -1)"
