#!/usr/bin/env bash
# Install Debian's mricron-data package, which holds the Colin27 T1 MRI (ch2.nii.gz) and the
# hand-drawn AAL atlas (aal.nii.gz) that medseg_nbdev uses as its embedded real data.
#   - With MEDSEG_DATA set, or without root: download the .deb with `apt-get download` and unpack
#     it into "$MEDSEG_DATA/mricron-data" (default data folder: ~/.local/share/medseg_nbdev).
#   - As root without MEDSEG_DATA: `apt-get install -y mricron-data` (files in /usr/share/mricron).
# Exits with status 1 and the commands to run by hand when neither works.
set -euo pipefail

data_home=${MEDSEG_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/medseg_nbdev}
unpacked="$data_home/mricron-data"
templates=usr/share/mricron/templates

if [[ -f "$unpacked/$templates/ch2.nii.gz" && -f "$unpacked/$templates/aal.nii.gz" ]]; then
  echo "install_data: mricron-data already unpacked in $unpacked"
  exit 0
fi
if [[ -z "${MEDSEG_DATA:-}" && -f "/$templates/ch2.nii.gz" && -f "/$templates/aal.nii.gz" ]]; then
  echo "install_data: mricron-data already installed in /$templates"
  exit 0
fi

if [[ -z "${MEDSEG_DATA:-}" && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  if apt-get install -y -q mricron-data >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q mricron-data >/dev/null; }; then
    echo "install_data: installed mricron-data in /$templates"
    exit 0
  fi
fi

if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  if (cd "$workdir" && apt-get download -q mricron-data >/dev/null 2>&1); then
    mkdir -p "$data_home"
    staging=$(mktemp -d "$data_home/.mricron-data.XXXXXX")
    dpkg-deb -x "$workdir"/mricron-data_*.deb "$staging"
    rm -rf "$unpacked"
    mv "$staging" "$unpacked"  # a rename, so a half-unpacked folder is never left at the final path
    echo "install_data: unpacked mricron-data into $unpacked"
    exit 0
  fi
fi

cat >&2 <<MSG
install_data: could not install Debian's mricron-data package automatically.
Install it by hand with one of:
  sudo apt-get install -y mricron-data
  apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb "$unpacked"
On a system without apt, get mricron-data_*.deb from a Debian mirror and unpack it with
  dpkg-deb -x mricron-data_*.deb "$unpacked"   (or: ar x the .deb, then tar xf data.tar.xz -C "$unpacked")
MSG
exit 1
