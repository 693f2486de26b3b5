#!/usr/bin/env bash
# Installs Debian's slurm-wlm (slurmctld, slurmd, sbatch, srun, ...) and munge for
# tests/test_slurm.py, which starts its own munged, slurmctld and slurmd with a configuration,
# key and state all under a temporary folder (nothing in /etc/slurm or /etc/munge is used or
# changed). Idempotent: does nothing when the commands are present. Exits 0 with a reason when
# apt-get cannot be used (not root, no network), so the test then skips and says why instead of
# the setup failing the whole test run.
set -u

have() { command -v "$1" >/dev/null 2>&1; }
# sbatch --version needs a slurm.conf; the package's version does not
version() { dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null || echo "slurm (not a Debian package)"; }
# the daemons live in /usr/sbin, which a non-login PATH may lack
export PATH="$PATH:/usr/sbin:/sbin"

if have slurmctld && have slurmd && have sbatch && have munged; then
    echo "slurm.sh: slurm and munge already installed ($(version))"
    exit 0
fi
if ! have apt-get; then
    echo "slurm.sh: apt-get not available; SLURM tests will be skipped"
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

if ! apt-cache show slurm-wlm >/dev/null 2>&1 || ! apt-cache show munge >/dev/null 2>&1; then
    if ! apt_retry update -qq; then
        echo "slurm.sh: apt-get update failed (no network?); SLURM tests will be skipped"
        exit 0
    fi
fi
# the packages' postinst scripts try to start the system's daemons; a policy-rc.d that denies
# it (only when none exists) keeps the install from starting services the test does not use
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
ok=1
apt_retry install -y -qq --no-install-recommends slurm-wlm munge || ok=0
if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
if [ "$ok" = 0 ]; then
    echo "slurm.sh: apt-get install slurm-wlm munge failed (no network?); SLURM tests will be skipped"
    exit 0
fi
echo "slurm.sh: installed $(version) and $(munged --version 2>/dev/null | head -1)"
