"""Sweeps of training runs (run: points, launch, resume, Slurm) and their reports (report)."""
