"""Checkpoint format, backends, placement and cadence."""
