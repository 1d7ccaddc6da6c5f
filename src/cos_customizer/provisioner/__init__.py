"""The provisioner: the guest agent that runs the configured steps.

Everything in this package imports only the standard library (and the
standard-library-only modules `cos_customizer.errors` and
`cos_customizer.units`), so the static executable stays small.
"""
