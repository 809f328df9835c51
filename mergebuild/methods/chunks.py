"""Worker threads and their per-thread scratch for the kernels that merge a tensor by chunks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class ChunkWorkspace:
    """Worker threads and their per-thread scratch of ``chunk`` elements, kept for a build.

    torch and numpy release the GIL, so chunks merged on these threads run in parallel.
    """

    def __init__(self, workers: int, chunk: int):
        self.chunk, self.workers = chunk, max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self.local = threading.local()
        self.allocated = 0  # bytes of scratch over all workers
        self._lock = threading.Lock()

    def buffer(self, name: Any, dtype: torch.dtype) -> torch.Tensor:
        """The calling thread's buffer ``name`` of ``chunk`` elements (made on first use)."""
        buffers = getattr(self.local, "buffers", None)
        if buffers is None:
            buffers = self.local.buffers = {}
        buf = buffers.get(name)
        if buf is None:
            buf = buffers[name] = torch.empty(self.chunk, dtype=dtype)
            with self._lock:
                self.allocated += buf.numel() * buf.element_size()
        return buf

    def run(self, fn, items) -> list:
        if self.pool is None:
            return [fn(i) for i in items]
        return list(self.pool.map(fn, items))

    def nbytes(self) -> int:
        return self.allocated

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
