"""Stage 3: SimPy discrete-event replay of traces under offloading policies."""
