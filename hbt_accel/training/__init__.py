"""One training run: setup, the loop and finalize (run), its losses, checkpoints, hard-negative mining,
the embedding gradient, the console, the run-folder lock and weight averaging of finished runs.
"""
