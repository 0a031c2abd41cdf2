"""CPU memory policy for training: large tensors on huge pages, and freed ones returned to the OS.

Training on CPU frees and re-allocates the same activation-sized blocks (tens of MB) every step.
glibc serves blocks above its mmap threshold with a fresh mapping, but the threshold is dynamic:
the first time such a block is freed, glibc raises the threshold to its size (up to 32 MB), so from
then on activations come from the heap, fragment it, and freed space stays resident. For
whisper-base, batch 8, that is a peak RSS of ~8 GB for ~3.5 GB of live tensors, more than the
Hugging Face Trainer recipe it replaces.

A fixed threshold of 1 MB keeps large blocks as their own mappings, unmapped on free, so peak RSS
tracks live memory. Fresh mappings cost page faults; on 4 KB pages that made steps ~25% slower,
so large tensors also go on transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE: 2 MB pages,
512 times fewer faults), which makes the policy about free. Measurements: README, training benchmark.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks from 1 MB up get their own mapping, returned to the OS on free
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch once, at its first CPU allocation


def request_huge_pages() -> None:
    """Ask PyTorch to put CPU tensors of 2 MB and more on transparent huge pages.

    Only effective before torch's first allocation, hence called when the package is imported; a
    value the user set (0 to turn it off) is kept.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


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
