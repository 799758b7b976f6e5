#!/usr/bin/env bash
# Installs what a fresh machine lacks, then runs a Justfile recipe:
#   ./bootstrap.sh run     # fetch the models, build, serve on the default config
#   ./bootstrap.sh test    # fetch the models, build, run every test
# Needs: Debian/Ubuntu with apt-get (as root or with sudo), Rust via rustup, Python 3.11+ with pip.
set -euo pipefail
cd "$(dirname "$0")"

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v clang >/dev/null || missing+=(clang)
# bindgen needs libclang.so; Debian ships it in libclang-dev.
if ! ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'; then missing+=(libclang-dev); fi
command -v c++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  sudo_if_needed apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v just >/dev/null; then
  # Debian 12 has no `just` package; PyPI's rust-just ships the official binary.
  echo "bootstrap: installing just" >&2
  python3 -m pip install --quiet --disable-pip-version-check rust-just
  hash -r
fi
if ! command -v just >/dev/null; then
  export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
fi

exec just "$@"
