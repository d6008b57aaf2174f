"""What leaves the run folder: the model card and the Hub upload."""
