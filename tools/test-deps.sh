#!/usr/bin/env bash
# What the tests need besides the Rust toolchain: headless Chromium, for the test that opens an
# evaluation's report.html in a real browser (crates/cli/tests/report_page.rs). Installs the
# distribution's package when no Chromium is found ($RENEG_CHROMIUM, chromium or
# chromium-browser on PATH); does nothing otherwise. Debian/Ubuntu (apt-get), as root or with sudo.
set -euo pipefail
if [[ -n "${RENEG_CHROMIUM:-}" && -x "${RENEG_CHROMIUM}" ]] || command -v chromium >/dev/null \
    || command -v chromium-browser >/dev/null; then
  exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
if ! command -v apt-get >/dev/null; then
  echo "tools/test-deps.sh: no Chromium and no apt-get; install Chromium and set RENEG_CHROMIUM to it" >&2
  exit 2
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
