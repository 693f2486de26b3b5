#!/usr/bin/env bash
# Installs Debian's slurm-wlm (slurmctld, slurmd, sbatch, srun, ...) and munge for
# tests/test_slurm.py, which starts its own munged, slurmctld and slurmd with a configuration,
# key and state all under a temporary folder (nothing in /etc/slurm or /etc/munge is used or
# changed). Idempotent: does nothing when the commands are present. Exits 0 with a reason when
# apt-get cannot be used (not root, no network), so the test then skips and says why instead of
# the setup failing the whole test run.
set -u
NAME=slurm.sh SKIPPED="SLURM tests"
source "$(dirname "$0")/apt.sh"

# sbatch --version needs a slurm.conf; the package's version does not
version() { dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null || echo "slurm (not a Debian package)"; }
# the daemons live in /usr/sbin, which a non-login PATH may lack
export PATH="$PATH:/usr/sbin:/sbin"

if have slurmctld && have slurmd && have sbatch && have munged; then
    echo "$NAME: slurm and munge already installed ($(version))"
    exit 0
fi
apt_usable slurm-wlm munge && apt_lists_know slurm-wlm munge || exit 0
# the packages' postinst scripts try to start the system's daemons; a policy-rc.d that denies
# it (only when none exists) keeps the install from starting services the test does not use
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
ok=1
apt_install slurm-wlm munge || ok=0
if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi
[ "$ok" = 1 ] || exit 0
echo "$NAME: installed $(version) and $(munged --version 2>/dev/null | head -1)"
