"""Offline quality and live load measurement: ``twostage eval`` and ``twostage loadtest``."""
