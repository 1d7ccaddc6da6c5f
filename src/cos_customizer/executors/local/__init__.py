"""The local executor: a build on an image file on this machine, its stage, the script sandbox and the
image's container daemons."""
