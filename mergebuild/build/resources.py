"""What one unit of build work needs (peak memory from safetensors headers, a GPU), and how
many units fit on this machine at once."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.build.compat import TensorShapes
from mergebuild.io.dtypes import dtype_size

# A build process before its first tensor: the interpreter, torch, the engine, the chunk
# workspaces of the streamed kernels. A passthrough merge of the benchmark's small models
# peaks at 320 MB, most of it this (benchmarks/README.md); benchmarks/executors.py measures
# the estimate against real builds.
PROCESS_BASELINE_BYTES = 320 * 2**20
# The single writer's tensors in flight: the one being written, one queued behind it, the
# one being computed (the queue holds four, but only the two largest tensors, embeddings and
# head, are large, and they are not adjacent).
_WRITER_TENSORS = 3
_FUSED_QUEUE_TENSORS = 4  # engine._queued_budget: four of the largest tensors ...
_FUSED_QUEUE_FLOOR = 64 * 2**20  # ... at least 64 MB
MEMINFO = Path("/proc/meminfo")
# MemAvailable is what the kernel could give without swapping; leave the rest of the
# machine (the driver, page cache for the mapped parents) a tenth.
_AVAILABLE_SHARE = 0.9


@dataclass(frozen=True)
class UnitNeeds:
    """What a unit asks of the machine that runs it."""

    memory: int  # bytes, peak
    gpu: bool = False


def estimate_peak_bytes(parents: Mapping[str, TensorShapes], variants: int = 1) -> int:
    """Peak memory of one build pass over ``parents`` (their safetensors headers) producing
    ``variants`` outputs at once.

    The engine streams tensor by tensor, so the peak is set by the largest tensor, not the
    model: a float32 copy of it per parent (the whole-tensor scratch of a method that is not
    elementwise or streamed; those use less), and the outputs in flight: the single writer's
    three, or a fused pass's group of variants being computed (at most the writers' shared
    budget: four of the largest tensors, at least 64 MB) plus that budget queued, on top of
    the process's baseline. Calibrated as an upper
    bound (benchmarks/executors.py, the small models): a TIES build of four parents peaks
    at 0.77 of it, a fused 4-variant TIES sweep at 0.73, SLERP at 0.59, linear at 0.56.
    """
    largest_elements = 0
    largest_stored = 0
    for tensors in parents.values():
        for dtype, shape in tensors.values():
            elements = math.prod(shape)
            largest_elements = max(largest_elements, elements)
            largest_stored = max(largest_stored, elements * _size(dtype))
    inputs = max(1, len(parents)) * largest_elements * 4
    if variants > 1:
        budget = max(_FUSED_QUEUE_TENSORS * largest_stored, _FUSED_QUEUE_FLOOR)
        outputs = min(variants * largest_stored, budget) + budget
    else:
        outputs = _WRITER_TENSORS * largest_stored
    return PROCESS_BASELINE_BYTES + inputs + outputs


def _size(dtype: str) -> int:
    try:
        return dtype_size(dtype)
    except KeyError:
        return 4


def available_memory(meminfo: Path | None = None) -> int | None:
    """Bytes this machine can give new processes without swapping (``MemAvailable``; the
    free physical pages where there is no /proc), or None when unknown."""
    try:
        for line in (meminfo or MEMINFO).read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def visible_gpus(environ: Mapping[str, str] | None = None, devices: Path = Path("/dev")
                 ) -> int:
    """CUDA devices a build worker could use, without importing torch: those
    ``CUDA_VISIBLE_DEVICES`` lists when it is set, else the ``/dev/nvidiaN`` device files."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [e.strip() for e in listed.split(",") if e.strip()]
        # CUDA stops at the first invalid entry ("-1" is the usual way to hide every GPU)
        count = 0
        for entry in entries:
            if entry.startswith("-"):
                break
            count += 1
        return count
    try:
        return sum(1 for p in devices.iterdir()
                   if p.name.startswith("nvidia") and p.name[6:].isdigit())
    except OSError:
        return 0


def concurrent_builds(jobs: int, gpus: int, device: str) -> int:
    """How many builds ``-j jobs`` runs at once: ``jobs``, but one per GPU when the builds
    run on GPUs (``device`` auto or cuda with ``gpus`` visible)."""
    if gpus > 0 and device_uses_gpu(device, gpus):
        return max(1, min(jobs, gpus))
    return max(1, jobs)


def device_uses_gpu(device: str, gpus: int) -> bool:
    """Whether builds asked to run on ``device`` use a GPU, ``gpus`` being visible."""
    return gpus > 0 and (device == "auto" or device.startswith("cuda"))


def worker_environment(index: int, gpus: int, device: str) -> dict[str, str]:
    """The environment of build worker ``index``: its own GPU when builds use GPUs (so
    ``cuda`` inside the worker is that device), nothing otherwise."""
    if not device_uses_gpu(device, gpus):
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(index % gpus)}


@dataclass
class MemoryBudget:
    """The memory the running units may use together. A unit that does not fit waits for
    running ones to finish; a unit alone always runs (it would have to run anyway)."""

    total: int | None  # bytes; None: unknown, nothing is limited
    running: dict[int, int] = field(default_factory=dict)  # ticket → its estimate

    @staticmethod
    def of_this_machine(meminfo: Path | None = None) -> MemoryBudget:
        available = available_memory(meminfo)
        return MemoryBudget(None if available is None else int(available * _AVAILABLE_SHARE))

    def fits(self, needs: int) -> bool:
        if self.total is None or not self.running:
            return True
        return sum(self.running.values()) + needs <= self.total

    def take(self, ticket: int, needs: int) -> None:
        self.running[ticket] = needs

    def give_back(self, ticket: int) -> None:
        self.running.pop(ticket, None)
