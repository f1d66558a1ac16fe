"""How dptab's processes get their memory: two library defaults changed for every process.

A run allocates and frees many large temporary arrays (a block level's measurements are tens of
millions of rows, read again by each estimate part; histograms, tables and checks the same) in
several short-lived processes. What each first touch of fresh memory costs then matters, and two
library defaults make it slow and erratic on a common Linux set-up (transparent huge pages in
``madvise`` mode, a virtual machine). Measured on the 2-core / 24 GB reference VM (BENCHMARKS.md,
"Memory from the operating system"):

- numpy advises huge pages for every array of ≥ 4 MB (``NUMPY_MADVISE_HUGEPAGE``, read once at
  import). Touching 1 GB of fresh arrays took 0.1 s with huge pages at best, but 2–10 s in a
  fresh process, against a steady 0.4 s with ordinary pages.
- with pyarrow's default pool (mimalloc), reading a 1 M-person block level's measurement rows
  spent 4.3 s in ``read_row_group`` against 0.8–1.0 s with jemalloc or the system allocator
  (``ARROW_DEFAULT_MEMORY_POOL``, read when the first pool is made; why mimalloc is slower here
  was not investigated).

Both are environment variables read at import or first use, so the roofs (the ``dptab`` command,
the Prefect flows) call :func:`apply_allocator_defaults` before anything imports numpy or
pyarrow, and the worker pool passes them to its processes; an operator's own setting of either
variable always wins. Results do not depend on them (only where memory comes from).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from typing import Any


def allocator_defaults() -> dict[str, str]:
    """The environment dptab gives its processes unless the operator set the variable."""
    env = {"NUMPY_MADVISE_HUGEPAGE": "0"}
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64"):
        env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"  # in pyarrow's Linux wheels; not on every platform
    return env


#: freed heap memory a pool worker may keep for its next task (:func:`use_heap_for_large_arrays`)
WORKER_KEEP_FREE_BYTES = 512 << 20


def use_heap_for_large_arrays() -> None:
    """In a pool worker (its initializer): large arrays from glibc's heap, kept when freed; the
    worker gives back what it freed beyond :data:`WORKER_KEEP_FREE_BYTES` after each task
    (``return_free_memory(keep=...)``). ``mallopt`` at start-up rather than ``MALLOC_*``
    variables, which reach a worker only if the fork server was started with them (another
    component may have started it first). An operator's ``MALLOC_MMAP_MAX_`` or
    ``MALLOC_TRIM_THRESHOLD_`` wins; a no-op without glibc.

    glibc gives every allocation above its mmap threshold (at most 32 MB) fresh pages from the
    operating system and returns them when freed, so a worker that makes a shard's arrays again
    and again pays the first touch of every page each time: measured on a 10 M-person block
    shard's noisy measurements (8 shards in one process), 1.15 s of kernel time against 0.20 s
    with no mmap and a trim threshold that keeps freed memory — and 1.2 s again when everything
    freed is given back after each shard (the reuse is from one shard to the next). The driver
    and the release writer keep glibc's defaults."""
    libc = _glibc()
    if libc is None:
        return
    if "MALLOC_MMAP_MAX_" not in os.environ:
        libc.mallopt(-4, 0)  # M_MMAP_MAX
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (an int): we trim above the allowance


def apply_allocator_defaults() -> None:
    """Set :func:`allocator_defaults` in ``os.environ`` where unset. Call before numpy and
    pyarrow are imported (both read their variable once); child processes inherit it."""
    for key, value in allocator_defaults().items():
        os.environ.setdefault(key, value)


def return_free_memory(keep: int = 0) -> None:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``; a no-op
    elsewhere); with ``keep`` (bytes), only when more than that is free (glibc's ``mallinfo2``;
    without it, always). The run's orchestrating process draws several shards at once on
    threads, each thread in its own malloc arena; what those shards freed stays mapped in the
    arenas, so without this the process carried the levels' high-water mark into publishing,
    where it is also the release writer. Arrow's pool (jemalloc, :func:`allocator_defaults`)
    keeps what it freed for reuse too, and is purged with it where pyarrow is loaded: the job's
    driver held 68 MB of it when publishing started at 10 M persons."""
    libc = _glibc()
    if libc is None:
        return
    if keep:
        info = _mallinfo2()
        if info is not None and info().fordblks <= keep:
            return
    libc.malloc_trim(0)
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()


@functools.cache
def _glibc() -> Any:
    """The C library if it is glibc (has ``malloc_trim``), looked up once (``find_library`` may
    run ``ldconfig``), or None."""
    if sys.platform != "linux":
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    return libc


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (2.33 and later; its ``fordblks``: free bytes in every arena's
    heap), or None."""
    libc = _glibc()
    fn = None if libc is None else getattr(libc, "mallinfo2", None)
    if fn is None:
        return None
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    fn.restype = MallInfo2
    fn.argtypes = []
    return fn
