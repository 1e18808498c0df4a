"""Stage 2: hardware calibration and profiles (the contract between measurement and simulation)."""
