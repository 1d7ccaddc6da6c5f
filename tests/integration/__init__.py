"""Integration tests: root, loop devices, mounts and the real tools (e2fsprogs, veritysetup, sgdisk, containerd)."""
