# The Cloud Build step image of cos-customizer: `args:` of a cloudbuild.yaml step go to
# `cos-customizer` (the ENTRYPOINT), as with Google's image of the original.
#
#   docker build -t cos-customizer .            (deploy/cloudbuild.yaml builds and pushes it)
#
# It holds: the package in a virtualenv (/opt/cos-customizer, on PATH); the provisioner prebuilt as one
# static executable with its manifest for each machine (/usr/lib/cos-customizer/provisioner and
# provisioner.json for x86-64, provisioner-arm64 and provisioner-arm64.json for arm64), so a GCE build
# never builds it on the Cloud Build worker, and a stale one is refused, never shipped;
# daisy from Google's published image (/usr/local/bin/daisy); and the system tools a local build runs.
# A local build (-image-file, the local executor) mounts file systems from loop devices: run the
# container with --privileged (and -v /dev:/dev) for it. GCE builds need nothing of the sort.
#
# Stages: daisy (Google's image; its static binary is /daisy), base (Debian with the run-time
# tools; shared by both stages below so apt runs once for them), builder (the virtualenv and the
# provisioner), builder-arm64 (the arm64 provisioner, frozen by Debian's arm64 Python and tools), and the
# final image. builder-arm64 runs arm64 binaries: on an x86-64 machine the kernel must hand them to
# qemu-user-static through binfmt_misc with the F flag (deploy/cloudbuild.yaml registers it first).
# tests/integration/test_step_image.py builds this file against local stand-ins of the three base images.

FROM gcr.io/compute-image-tools/daisy:latest AS daisy

FROM debian:bookworm-slim AS base
# What a build runs: Debian's own Python (the venv's interpreter), CA certificates (daisy, the Google
# clients), e2fsprogs (mke2fs, e2fsck, resize2fs, debugfs), mount and util-linux (losetup, mount,
# unshare), dosfstools and mtools (the EFI and CIDATA FAT file systems), qemu-utils (qcow2 sources and
# outputs), tar, gzip and pigz (.tar.gz outputs), slirp4netns (the scripts' network in a local build).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 ca-certificates e2fsprogs mount util-linux dosfstools mtools qemu-utils tar gzip pigz slirp4netns \
 && rm -rf /var/lib/apt/lists/*

FROM base AS builder
# The provisioner's toolchain: PyInstaller needs libpython's shared library and binutils (objdump,
# objcopy), staticx needs patchelf; build-provisioner insists on Debian's /usr/bin/python3.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3-venv libpython3.11 binutils patchelf \
 && rm -rf /var/lib/apt/lists/*
# The dependencies first, from pyproject.toml alone, so a change of the sources reuses these layers.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
      open("/src/runtime.txt", "w").write("\n".join(p["dependencies"]) + "\n"); \
      open("/src/toolchain.txt", "w").write("\n".join(["hatchling", *p["optional-dependencies"]["provisioner"]]) + "\n")' \
 && python3 -m venv /opt/cos-customizer \
 && /opt/cos-customizer/bin/pip install --no-cache-dir --disable-pip-version-check -q -r /src/runtime.txt \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -q -r /src/toolchain.txt
COPY README.md /src/README.md
COPY src /src/src
# One wheel, installed into both virtualenvs: the provisioner's manifest names the digest of these
# very sources, and the final image's package checks it against its own.
RUN /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check -q --no-deps --no-build-isolation \
      -w /wheels /src \
 && /opt/cos-customizer/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-deps /wheels/*.whl \
 && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-deps /wheels/*.whl \
 && /opt/build/bin/python -m cos_customizer.provisioner_build /usr/lib/cos-customizer \
 && rm -rf /root/.cache

FROM --platform=linux/arm64 arm64v8/debian:bookworm-slim AS builder-arm64
# The same toolchain for arm64, and what staticx needs to be built from its sources (it publishes no
# aarch64 wheel): gcc, musl-tools (its bootloader is linked with musl-gcc, as its own wheels are), scons.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3-venv libpython3.11 binutils patchelf gcc libc6-dev musl-tools scons \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/toolchain.txt /src/toolchain.txt
RUN python3 -m venv /opt/build \
 && BOOTLOADER_CC=musl-gcc /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -q \
      -r /src/toolchain.txt
# The builder's wheel: the arm64 manifest names the digest of the same sources as the x86-64 one.
COPY --from=builder /wheels /wheels
RUN /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-deps /wheels/*.whl \
 && /opt/build/bin/python -m cos_customizer.provisioner_build -arch=arm64 /usr/lib/cos-customizer \
 && rm -rf /root/.cache

FROM base
COPY --from=builder /opt/cos-customizer /opt/cos-customizer
COPY --from=builder /usr/lib/cos-customizer /usr/lib/cos-customizer
COPY --from=builder-arm64 /usr/lib/cos-customizer/provisioner-arm64 /usr/lib/cos-customizer/provisioner-arm64.json \
     /usr/lib/cos-customizer/
COPY --from=daisy /daisy /usr/local/bin/daisy
ENV PATH=/opt/cos-customizer/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The image's own name (deploy/cloudbuild.yaml passes it): an SBOM names it as its tool, as the original's
# names gcr.io/cos-cloud/cos-customizer. Empty: the SBOM says cos-customizer and its version.
ARG STEP_IMAGE=
ENV COS_CUSTOMIZER_STEP_IMAGE=${STEP_IMAGE}
# Refuse to make an image whose prebuilt provisioners do not match its package.
RUN python3 -c 'import sys; from cos_customizer import provisioner_build as p; from cos_customizer.arch import Arch; \
      sys.exit(any(p.prebuilt({}, arch=arch) is None for arch in Arch))' \
 && cos-customizer --version
WORKDIR /workspace
ENTRYPOINT ["cos-customizer"]
