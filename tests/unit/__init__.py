"""Unit tests: no root, no devices, no daemons; seconds each. `scripts/test` runs them."""
