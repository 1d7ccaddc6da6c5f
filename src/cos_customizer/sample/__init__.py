"""The sample image: a COS-shaped disk, its containers and its bootable guest."""
