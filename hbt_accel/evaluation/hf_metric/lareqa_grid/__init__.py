"""The LAReQA grid as an `evaluate` metric; see lareqa_grid.py."""
