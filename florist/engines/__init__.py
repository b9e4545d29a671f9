"""Engines run a round's client jobs: in this process (``inprocess``) or on Flower."""
