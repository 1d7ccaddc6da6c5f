#!/bin/bash
# Runs inside the image being built (in a sandbox on the runner), as root.
set -euo pipefail
echo "Hello, World!" > /var/lib/hello
echo "built by GitHub Actions" > /usr/share/oem/built-by
