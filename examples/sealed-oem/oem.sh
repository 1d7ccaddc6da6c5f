#!/bin/bash
# Runs on the preload VM, as root: fills the OEM partition, which seal-oem then makes read-only and
# verified (dm-verity) on every boot.
set -euo pipefail
mkdir -p /usr/share/oem/app
echo "configuration shipped read-only" > /usr/share/oem/app/config
