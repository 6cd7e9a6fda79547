"""rclip: robust CLIP with optimal transport — the library behind the book."""
import os

# Large CPU tensors on 2 MB pages (PyTorch's own switch; read once, at the first CPU allocation, so set before any):
# OT fusion's 3 072 x 3 072 temporaries otherwise spend a third of their time in page faults (benchmarks/README).
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
