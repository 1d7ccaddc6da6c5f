"""The command line: one module per step family."""
