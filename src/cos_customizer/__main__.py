"""`python -m cos_customizer`: the command line."""

from cos_customizer.cli.main import entry

entry()
