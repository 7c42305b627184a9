"""Code every twostage service shares: config, model runtime, batching,
errors, server bootstrap and the ``twostage`` command line."""

__version__ = "0.1.0"
