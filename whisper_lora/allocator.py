"""`train --low-cpu-memory`: freed activations go back to the OS instead of staying resident.

Training on CPU frees and re-allocates the same activation-sized blocks (tens of MB) every step.
glibc serves blocks above its mmap threshold with a fresh mapping, but the threshold is dynamic:
the first time such a block is freed, glibc raises the threshold to its size (up to 32 MB), so from
then on activations come from the heap, fragment it, and freed space stays resident. For
whisper-base, batch 8, that is a peak RSS of ~8 GB for ~3.5 GB of live tensors, more than the
Hugging Face Trainer recipe it replaces.

A fixed threshold of 1 MB keeps large blocks as their own mappings, unmapped on free, so peak RSS
tracks live memory (3.5 GB). Fresh mappings cost page faults, and how much varies from run to run:
bench/train_bench.py measured 0-21% slower encoder + decoder steps and a decoder-only run (small
steps, the same large blocks) at half speed. Hence opt-in, for runs that would not fit otherwise.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks from 1 MB up get their own mapping, returned to the OS on free


def return_freed_blocks_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MB (see the module docstring). False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:  # musl, macOS, Windows: their allocators behave otherwise
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
