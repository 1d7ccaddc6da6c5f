#!/bin/bash
# Runs on the preload VM, as root, with the build context as its working directory. What it writes
# to /var/lib, /mnt/stateful_partition or /usr/share/oem stays in the image.
set -euo pipefail
echo "Hello, World!" > /var/lib/hello
# A container image preloaded into the image's own docker (kept on the stateful partition).
docker pull "${IMAGE:-busybox:latest}"
