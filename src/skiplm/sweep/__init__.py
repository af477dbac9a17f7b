"""Sweeps (resumable method x target grids) and `compare` (planners side by side)."""
