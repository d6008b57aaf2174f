"""The model and its speed work: the dual encoder, its settings, the bundled e5, the sentence-transformers
folder format, CPU attention and the precision a device runs best.
"""
