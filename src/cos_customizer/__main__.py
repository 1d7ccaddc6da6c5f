from cos_customizer.cli.main import entry

entry()
