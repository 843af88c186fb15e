"""Samplers and teleportation (being built in the sampling issue)."""
