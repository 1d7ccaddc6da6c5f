"""The GCE executor: the preload on Compute Engine (Compute calls, GCS, daisy)."""
