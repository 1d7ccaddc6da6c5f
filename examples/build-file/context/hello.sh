#!/bin/bash
# Runs inside the image being built (in a sandbox), as root.
set -euo pipefail
echo "$GREETING" > /var/lib/hello
echo "built from one build file" > /usr/share/oem/built-by
