"""A real, minimal offloading engine used to validate the simulator."""
