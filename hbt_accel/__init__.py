"""hbt_accel: hybrid batch training of multilingual dense retrievers with HuggingFace Accelerate."""

import os

# torch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when this is set before its
# first large allocation. A training step allocates and frees hundreds of MB (a dense word-embedding gradient alone
# is 384 MB for e5-small), and with 4 KB pages every fresh buffer pays a page fault per 4 KB: on the 2-core test
# machine that was ~25% of a full fine-tuning step (benchmarks/train_speed.py). An explicit value is respected.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
