#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the dashboard/report browser tests
# (tests/test_dashboard.py, tests/test_report.py). Idempotent: does nothing when both are
# present. Exits 0 with a reason when apt-get cannot be used (not root, no network), so the
# tests then skip with that reason instead of the setup failing the whole test run.
set -u

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "browser.sh: chromium and chromedriver already installed ($(chromium --version 2>/dev/null | head -1))"
    exit 0
fi
if ! have apt-get; then
    echo "browser.sh: apt-get not available; browser tests will be skipped"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "browser.sh: not root, cannot apt-get install chromium; browser tests will be skipped"
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
        echo "browser.sh: apt/dpkg lock held by another process, retrying in 10 s ($i/60)"
        sleep 10
    done
    rm -f "$log"
    return 1
}

# update the package lists only when they do not know chromium yet
if ! apt-cache show chromium >/dev/null 2>&1 || ! apt-cache show chromium-driver >/dev/null 2>&1; then
    if ! apt_retry update -qq; then
        echo "browser.sh: apt-get update failed (no network?); browser tests will be skipped"
        exit 0
    fi
fi
if ! apt_retry install -y -qq --no-install-recommends chromium chromium-driver; then
    echo "browser.sh: apt-get install chromium chromium-driver failed (no network?); browser tests will be skipped"
    exit 0
fi
echo "browser.sh: installed $(chromium --version 2>/dev/null | head -1) and $(chromedriver --version 2>/dev/null | head -1)"
