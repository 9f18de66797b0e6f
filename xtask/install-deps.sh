#!/bin/sh
# Install the Debian packages the build, the tests and the benchmarks need
# (xtask/debian-packages.txt). Used by .ci/run and by `cargo xtask` when a
# tool is missing; run as root.
#
# QEMU's packages must come from one source package version: a machine may
# already hold a newer qemu-utils (a backport) than the qemu-system-x86 its
# apt sources offer, and qemu-utils >= 8 Breaks qemu-system-common < 8, so a
# plain `apt-get install qemu-system-x86` stops at "held broken packages".
# When the archive has qemu-system-x86 at the installed qemu-utils' version,
# take that; otherwise bring qemu-utils to the version qemu-system-x86 will be
# installed at (a downgrade, said out loud).
set -eu
here=$(dirname "$0")
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "install-deps: installing packages needs root: sudo $0" >&2
  exit 1
fi
apt-get update -q
pkgs=$(grep -v '^#' "$here/debian-packages.txt" | sed '/^[[:space:]]*$/d')
extra=""
have=$(dpkg-query -W -f '${Status} ${Version}\n' qemu-utils 2>/dev/null \
  | awk '$3 == "installed" {print $4}')
if [ -n "$have" ]; then
  if apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
      | grep -qx -- "$have"; then
    want=$have
  else
    want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  fi
  if [ "$want" != "$have" ]; then
    echo "install-deps: qemu-utils $have is installed but qemu-system-x86 is only" \
      "available at $want; installing qemu-utils $want to match" >&2
    extra="--allow-downgrades"
  fi
  pkgs=$(printf '%s\n' "$pkgs" | sed "s/^qemu-utils\$/qemu-utils=$want/; s/^qemu-system-x86\$/qemu-system-x86=$want/")
fi
# Node.js from another source (e.g. NodeSource) bundles its own npm and
# Conflicts with Debian's npm package: keep the npm that is there.
if command -v npm >/dev/null 2>&1 && ! dpkg-query -W -f '${Status}' npm 2>/dev/null | grep -q 'ok installed'; then
  echo "install-deps: using the npm already on PATH ($(command -v npm)), not Debian's npm package" >&2
  pkgs=$(printf '%s\n' "$pkgs" | sed '/^npm$/d')
fi
# shellcheck disable=SC2086  # one package per word
apt-get install -y -q --no-install-recommends $extra $pkgs
