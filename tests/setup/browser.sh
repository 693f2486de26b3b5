#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the dashboard/report browser tests
# (tests/test_dashboard.py, tests/test_report.py). Idempotent: does nothing when both are
# present. Exits 0 with a reason when apt-get cannot be used (not root, no network), so the
# tests then skip with that reason instead of the setup failing the whole test run.
set -u
NAME=browser.sh SKIPPED="browser tests"
source "$(dirname "$0")/apt.sh"

if have chromium && have chromedriver; then
    echo "$NAME: chromium and chromedriver already installed ($(chromium --version 2>/dev/null | head -1))"
    exit 0
fi
apt_usable chromium chromium-driver && apt_lists_know chromium chromium-driver && apt_install chromium chromium-driver \
    || exit 0
echo "$NAME: installed $(chromium --version 2>/dev/null | head -1) and $(chromedriver --version 2>/dev/null | head -1)"
