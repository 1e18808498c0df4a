"""Reproduce published measurements: the catalogue, routing models and `moesim reproduce`."""
