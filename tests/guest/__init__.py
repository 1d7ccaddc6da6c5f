"""Guest tests: QEMU boots (TCG here) of the sample image, the provisioner and the outputs."""
