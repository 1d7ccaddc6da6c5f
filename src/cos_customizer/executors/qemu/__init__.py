"""The qemu executor: a GCE build rehearsed on this machine (the Daisy runner, QEMU instances, the
metadata and GCS servers)."""
