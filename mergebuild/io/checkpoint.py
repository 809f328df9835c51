"""Safetensors I/O at the edge: validated headers, zero-copy mmap reads, streaming sharded writes.

Reading a header never imports torch, so planning stays torch-free; torch is imported inside
the functions that touch tensor data (`CheckpointReader.load`, `CheckpointWriter.write`).

Non-goals: pickle checkpoints (``*.bin``/``*.pt``) are refused, never unpickled; big-endian
hosts are not supported (safetensors data is little-endian and is mapped as-is).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import xxhash

from mergebuild import faults
from mergebuild.errors import CheckpointError
from mergebuild.io.atomic import fsync_directory
from mergebuild.io.dtypes import DTYPE_SIZES, safetensors_code, torch_dtype
from mergebuild.io.json_limits import (
    CONFIG_MAX_BYTES,
    INDEX_MAX_BYTES,
    loads_bounded,
    read_json_bounded,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "SINGLE_FILE_NAME",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "check_tensor_entries",
    "plan_shards",
    "read_header",
    "reference_order",
    "shard_file_names",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
# The reference implementation refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100 * 2**20
_ALIGN = 8
# Tensors are hashed and written in 1 MB slices: a slice is read from memory once, by sha256,
# and xxh128 and pwrite find it in cache (64 MB slices read every byte from memory three
# times; writing 577 MB this way took 0.63 s of CPU against 1.30 s). It also keeps one
# syscall far below Linux's 2 GiB cap.
_IO_CHUNK = 1 * 2**20

_DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_SIZES)}

_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_CONVERT_HINT = (
    "load it once with transformers and save_pretrained(out, safe_serialization=True), "
    "or use the Hugging Face 'convert to safetensors' space"
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its safetensors dtype, shape and absolute byte range in a file."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16", "F32", "F16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --------------------------------------------------------------------------- reading headers


def _fail(
    path: Path, problem: str, todo: str = "re-download or rebuild it", *, node: str | None = None
) -> CheckpointError:
    return CheckpointError(f"{path.name} {problem}; {todo}", node=node, hint=str(path))


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(
    path: Path, *, node: str | None = None, header_only: bool = False
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header without trusting any of it first.

    Args:
        path: a ``.safetensors`` file.
        node: the node the file belongs to, named in errors.
        header_only: check the header alone, not that the file holds the data it promises
            (for planning from a file whose tensor data is not needed yet).

    Returns:
        (tensors by name in file order, the ``__metadata__`` mapping or ``{}``).

    Raises:
        CheckpointError: the file is missing, truncated, has trailing bytes, or its header is
            not a well-formed safetensors header (bad length, JSON, dtype, shape or offsets).

    Example:
        >>> tensors, metadata = read_header(Path("model.safetensors"))
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _fail(path, f"is {size} bytes, too short to be a safetensors file", node=node)
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise _fail(
                    path,
                    f"declares a {header_len}-byte header (limit {MAX_HEADER_BYTES}); "
                    "it is corrupt or not a safetensors file",
                    node=node,
                )
            if header_len > size - 8:
                raise _fail(
                    path,
                    f"is truncated: header length is {header_len} bytes but only "
                    f"{size - 8} bytes follow it",
                    node=node,
                )
            raw = fh.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist", node=node, hint="check the path") from None
    except IsADirectoryError:
        raise CheckpointError(
            f"{path} is a directory, not a safetensors file", node=node
        ) from None
    except PermissionError:
        raise CheckpointError(
            f"{path} is not readable", node=node, hint="check its permissions"
        ) from None

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "has a header that is not UTF-8", node=node) from None
    if not text.startswith("{"):
        raise _fail(path, "has a header that is not a JSON object", node=node)
    try:
        header = loads_bounded(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:
        raise _fail(path, f"has a header that is not valid JSON ({exc})", node=node) from None
    if not isinstance(header, dict):
        raise _fail(path, "has a header that is not a JSON object", node=node)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "has __metadata__ that is not a string-to-string mapping", node=node)

    data_start = 8 + header_len
    data_size = size - data_start
    ranges = check_tensor_entries(
        header, path, max_data_bytes=None if header_only else data_size, node=node
    )
    cursor = ranges[-1][1] if ranges else 0
    if cursor < data_size and not header_only:
        raise _fail(
            path,
            f"has {data_size - cursor} unexpected trailing bytes after its tensor data",
            node=node,
        )

    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
        for begin, end, name, dtype, shape in ranges
    }
    return tensors, dict(metadata)


def check_tensor_entries(
    entries: Mapping[str, Any],
    path: Path,
    *,
    max_data_bytes: int | None,
    node: str | None = None,
) -> list[tuple[int, int, str, str, tuple[int, ...]]]:
    """Validate a safetensors header's tensor entries (``__metadata__`` removed).

    Every entry needs a known dtype, a shape of non-negative ints and ``data_offsets`` that
    span exactly its bytes; together they must tile the data from 0 without overlaps or gaps
    and end within ``max_data_bytes`` (when given).

    Returns:
        ``(begin, end, name, dtype, shape)`` per tensor, by offset (relative to the data).

    Raises:
        CheckpointError: naming ``path`` (and ``node``) and the first bad entry.
    """
    ranges: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise _fail(path, f"has a malformed entry for tensor '{name}'", node=node)
        dtype = entry.get("dtype")
        if dtype not in DTYPE_SIZES:
            raise _fail(
                path,
                f"has tensor '{name}' with unsupported dtype {dtype!r} "
                f"(known: {', '.join(DTYPE_SIZES)})",
                "convert it to a supported dtype",
                node=node,
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"has tensor '{name}' with an invalid shape {shape!r}", node=node)
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise _fail(
                path, f"has tensor '{name}' with invalid data_offsets {offsets!r}", node=node
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise _fail(
                path,
                f"has tensor '{name}' whose data_offsets span {offsets[1] - offsets[0]} bytes "
                f"but {dtype} {shape} needs {expected}",
                node=node,
            )
        ranges.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    ranges.sort(key=lambda r: (r[0], r[1]))
    cursor = 0
    for begin, end, name, _, _ in ranges:
        if begin < cursor:
            raise _fail(
                path, f"has tensor '{name}' overlapping the previous tensor's bytes", node=node
            )
        if begin > cursor:
            raise _fail(path, f"has a gap of unused bytes before tensor '{name}'", node=node)
        cursor = end
    if max_data_bytes is not None and cursor > max_data_bytes:
        raise _fail(
            path,
            f"is truncated: header promises {cursor} bytes of tensor data, "
            f"file has {max_data_bytes}",
            node=node,
        )
    return ranges


# --------------------------------------------------------------------------- reading weights


class CheckpointReader:
    """A model directory's safetensors weights, with zero-copy loads through mmap.

    Discovers ``model.safetensors.index.json`` (sharded) or the ``*.safetensors`` files in the
    directory; refuses pickle-only directories. Tensors returned by `load` are views of a
    read-only mapping: never modify them in place (the process would crash with SIGSEGV);
    use ``load(name, copy=True)`` or compute into your own buffers.

    Example:
        >>> with CheckpointReader(Path("models/base")) as reader:
        ...     w = reader.load("model.norm.weight")
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.index_file: Path | None = None
        self.metadata: dict[str, dict[str, str]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        if not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory} is not a directory", hint="point the source at a model folder"
            )
        files = self._discover()
        tensors: dict[str, TensorInfo] = {}
        owner: dict[str, Path] = {}
        for file in files:
            file_tensors, file_metadata = read_header(file)
            self.metadata[file.name] = file_metadata
            for name, info in file_tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"tensor '{name}' appears in both {owner[name].name} and {file.name} "
                        f"in {self.directory}",
                        hint="remove the stray weights file or add an index",
                    )
                tensors[name] = info
                owner[name] = file
        if self.index_file is not None:
            self._check_index(tensors)
        self._files = files
        self.tensors: dict[str, TensorInfo] = {n: tensors[n] for n in sorted(tensors)}
        self.config: dict | None = self._read_config()

    def _discover(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.index_file = index
            try:
                data = read_json_bounded(index, INDEX_MAX_BYTES)
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()
                ):
                    raise TypeError("weight_map is not a name-to-file mapping")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{INDEX_NAME} in {self.directory} is not a valid index ({exc})",
                    hint="re-download or rebuild the model",
                ) from None
            self._weight_map: dict[str, str] = weight_map
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if Path(shard).name != shard:
                    raise CheckpointError(
                        f"{INDEX_NAME} in {self.directory} points outside the directory "
                        f"({shard!r})",
                        hint="shard names must be plain file names",
                    )
            missing = [s for s in shards if not (self.directory / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{INDEX_NAME} in {self.directory} references missing shard(s): "
                    f"{', '.join(missing)}",
                    hint="re-download or rebuild the model",
                )
            return [self.directory / s for s in shards]
        files = sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
        if files:
            return files
        pickles = sorted(
            {p.name for pattern in _PICKLE_PATTERNS for p in self.directory.glob(pattern)}
        )
        if pickles:
            raise CheckpointError(
                f"{self.directory} holds only pickle checkpoints ({', '.join(pickles)}); "
                f"pickle checkpoints are not read (only safetensors); convert with "
                f"transformers save_pretrained(..., safe_serialization=True)",
                hint=_CONVERT_HINT,
            )
        raise CheckpointError(
            f"{self.directory} holds no weights (no *.safetensors files or {INDEX_NAME})",
            hint="is this a model directory?",
        )

    def _check_index(self, tensors: dict[str, TensorInfo]) -> None:
        for name, shard in self._weight_map.items():
            info = tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(
                    f"{INDEX_NAME} in {self.directory} places '{name}' in {shard}, "
                    f"but that shard does not hold it",
                    hint="the index and the shards disagree; re-download or rebuild the model",
                )
        extra = sorted(set(tensors) - set(self._weight_map))
        if extra:
            raise CheckpointError(
                f"shards in {self.directory} hold tensors missing from {INDEX_NAME}: "
                f"{', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}",
                hint="the index and the shards disagree; re-download or rebuild the model",
            )

    def _read_config(self) -> dict | None:
        path = self.directory / "config.json"
        if not path.is_file():
            return None
        try:
            config = read_json_bounded(path, CONFIG_MAX_BYTES)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"config.json in {self.directory} is not valid JSON ({exc})",
                hint="fix or re-download it",
            ) from None
        if not isinstance(config, dict):
            raise CheckpointError(f"config.json in {self.directory} is not a JSON object")
        return config

    def weight_files(self) -> list[Path]:
        """The safetensors files holding the weights, sorted (the index file is not included)."""
        return list(self._files)

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(file)
            if mapped is None:
                with open(file, "rb") as fh:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[file] = mapped
            return mapped

    def load(self, name: str, *, copy: bool = False) -> torch.Tensor:
        """Return tensor `name` as a zero-copy view of the mapped file (or an owned copy).

        Args:
            name: tensor name, e.g. ``"model.norm.weight"``.
            copy: return a tensor that owns its memory (safe to modify in place).

        Returns:
            A CPU tensor with the file's dtype and shape. Without ``copy`` it is backed by a
            read-only mapping: reading is free of copies, writing into it crashes the process.
        """
        import torch

        try:
            info = self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor '{name}' in {self.directory}") from None
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        mapped = self._map(info.file)
        with warnings.catch_warnings():
            # torch warns that the buffer is read-only; that is the point (see class docstring).
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapped, dtype=dtype, count=info.numel, offset=info.start)
        tensor = flat.view(info.shape)
        return tensor.clone() if copy else tensor

    def close(self) -> None:
        """Forget the mappings; each is unmapped once no loaded tensor refers to it any more."""
        # mmap.close() would unmap memory that tensors from `load` still point at (torch holds
        # a reference to the mmap object, not a buffer export), so only drop our references.
        with self._lock:
            self._maps.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.directory)!r}, {len(self.tensors)} tensors)"


# --------------------------------------------------------------------------- writing weights


def reference_order(
    layout: list[tuple[str, str, tuple[int, ...]]],
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Order a layout as ``safetensors.torch.save_file`` orders tensors in a file.

    The reference sorts by dtype (widest first, in its enum order) and then by name. Writing
    an unsharded layout in this order gives a file byte-identical to ``save_file``'s.
    """
    return sorted(layout, key=lambda entry: (-_DTYPE_RANK[entry[1]], entry[0]))


def plan_shards(
    layout: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Split a layout into shards of at most `max_shard_bytes` tensor bytes, keeping its order.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for entry in layout:
        size = math.prod(entry[2]) * DTYPE_SIZES[entry[1]]
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face shard names: ``model.safetensors`` alone, else ``model-0000i-of-0000N``."""
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """The 8-byte length + JSON header (space-padded to 8 bytes) and each tensor's data offset."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offsets = []
    cursor = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [cursor, cursor + size],
        }
        offsets.append(cursor)
        cursor += size
    # Compact separators and raw UTF-8 match serde_json, which the reference writer uses.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, offsets


@dataclass
class _Shard:
    path: Path
    header: bytes
    data_start: int
    fd: int = -1
    sha256: Any = None
    xxh128: Any = None  # for the store's publish record: checked cheaply when read back
    direct: _DirectFile | None = None  # the file's staged O_DIRECT writes, when in use


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int


_STOP = object()


class CheckpointWriter:
    """Write a model's tensors straight into (sharded) safetensors files, hashing as it goes.

    The shard layout and every header are fixed at construction; `write` must then be called
    once per tensor in layout order. Bytes are written and hashed by a background thread
    (bounded queue of `queue_size` tensors) so computation overlaps I/O; `on_written`, if
    given, is called with each tensor once its bytes are written and hashed (on that
    thread), so its memory may be reused. Writers given the same `lane` (a semaphore) hash
    and write at most that many tensors at once between them. With `direct`, the files are
    written with O_DIRECT, bypassing the page cache (same bytes; a filesystem that refuses
    it gets ordinary writes). The writer keeps a reference to each tensor until its bytes
    are on their way to disk: do not modify a tensor in place after passing it to `write`
    (pass a fresh tensor, or call `drain()` first).

    Example:
        >>> writer = CheckpointWriter(out, [("w", "BF16", (2, 2))])
        >>> writer.write("w", torch.zeros(2, 2, dtype=torch.bfloat16))
        >>> digests = writer.finish()   # {"model.safetensors": "<sha256 hex>"}
    """

    def __init__(
        self,
        directory: Path,
        layout: list[tuple[str, str, tuple[int, ...]]],
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
        *,
        background: bool = True,
        queue_size: int = 4,
        on_written: Callable[[torch.Tensor], None] | None = None,
        lane: threading.Semaphore | None = None,
        direct: bool = False,
    ):
        self.directory = Path(directory)
        layout = [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        seen: set[str] = set()
        for name, dtype, shape in layout:
            if name in seen:
                raise ValueError(f"tensor '{name}' appears twice in the layout")
            seen.add(name)
            if dtype not in DTYPE_SIZES:
                raise ValueError(f"tensor '{name}' has unsupported dtype {dtype!r}")
            if not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor '{name}' has an invalid shape {shape!r}")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        # transformers refuses files whose metadata lacks format=pt, so it is always present.
        self.metadata = {"format": "pt", **(metadata or {})}
        self.layout = layout
        self.total_size = sum(math.prod(s) * DTYPE_SIZES[d] for _, d, s in layout)

        groups = plan_shards(layout, max_shard_bytes)
        names = shard_file_names(len(groups))
        self._shards: list[_Shard] = []
        self._slots: list[_Slot] = []
        for index, (file_name, entries) in enumerate(zip(names, groups, strict=True)):
            header, offsets = _encode_header(entries, self.metadata)
            self._shards.append(_Shard(self.directory / file_name, header, len(header)))
            for (name, dtype, shape), offset in zip(entries, offsets, strict=True):
                nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
                self._slots.append(_Slot(name, dtype, shape, index, len(header) + offset, nbytes))
        self.weight_map = {slot.name: self._shards[slot.shard].path.name for slot in self._slots}
        self._next = 0
        self._opened = -1
        self._finished = False
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._pending = 0  # bytes handed to write() and not yet on their way to disk
        self._pending_lock = threading.Lock()
        self.xxh128: dict[str, str] = {}  # file name → "xxh128:<hex>", filled by finish()
        self._on_written = on_written
        self._lane = lane
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._io: ThreadPoolExecutor | None = None  # the direct writes' thread

        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._slots:
            self._open_shard(0)  # an empty model is still one valid file
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_size))
            self._thread = threading.Thread(
                target=self._drain_queue, name="mergebuild-writer", daemon=True
            )
            self._thread.start()

    @property
    def files(self) -> list[Path]:
        """The weight files this writer produces, in order (the index is not included)."""
        return [shard.path for shard in self._shards]

    # -- public verbs

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` for writing at its place; it must be the next tensor of the layout.

        Raises:
            ValueError: `name` is not the next tensor, or dtype/shape disagree with the layout.
            OSError: an earlier write failed (e.g. ENOSPC), re-raised as-is.
        """
        if self._finished or self._closed:
            raise ValueError("write() after finish() or abort()")
        self._raise_pending_error()
        if self._next >= len(self._slots):
            raise ValueError(f"write('{name}'): every tensor of the layout was already written")
        slot = self._slots[self._next]
        if name != slot.name:
            raise ValueError(f"expected tensor '{slot.name}' next (layout order), got '{name}'")
        dtype = safetensors_code(tensor.dtype)
        if dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor '{name}' is {dtype} {list(tensor.shape)}, layout says "
                f"{slot.dtype} {list(slot.shape)}"
            )
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.resolve_conj().resolve_neg().contiguous()
        self._next += 1
        if self._queue is None:
            self._write_slot(slot, data)
            if self._on_written is not None:
                self._on_written(data)
        else:
            with self._pending_lock:
                self._pending += slot.nbytes
            while True:
                try:
                    self._queue.put((slot, data), timeout=0.5)
                    break
                except queue.Full:
                    self._raise_pending_error()

    @property
    def pending_bytes(self) -> int:
        """Bytes of tensors handed to `write` that the I/O thread has not written yet."""
        return self._pending

    def settle(self) -> None:
        """Wait until every tensor handed to `write` so far is written (or failed)."""
        if self._queue is not None and self._thread is not None:
            self._queue.join()

    def finish(self) -> dict[str, str]:
        """Flush, fsync and close every file, write the index; return {file name: sha256 hex}.

        The index ``model.safetensors.index.json`` is written (and listed) only when sharded.
        """
        if self._finished:
            raise ValueError("finish() called twice")
        if self._closed:
            raise ValueError("finish() after abort()")
        try:
            self._stop_thread()
            self._raise_pending_error()
            if self._next != len(self._slots):
                missing = len(self._slots) - self._next
                raise ValueError(
                    f"finish() before every tensor was written: {missing} missing, "
                    f"next is '{self._slots[self._next].name}'"
                )
            digests: dict[str, str] = {}
            faults.point("writer.before_fsync")
            for shard in self._shards:
                if shard.direct is not None:
                    shard.direct.close()
                    shard.direct = None
                os.fsync(shard.fd)
                os.close(shard.fd)
                shard.fd = -1
                digests[shard.path.name] = shard.sha256.hexdigest()
                self.xxh128[shard.path.name] = "xxh128:" + shard.xxh128.hexdigest()
            self._close_io()
            if len(self._shards) > 1:
                index = {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": dict(sorted(self.weight_map.items())),
                }
                payload = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
                fd = os.open(
                    self.directory / INDEX_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
                )
                try:
                    _write_all(fd, memoryview(payload), 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                digests[INDEX_NAME] = hashlib.sha256(payload).hexdigest()
                self.xxh128[INDEX_NAME] = "xxh128:" + xxhash.xxh3_128_hexdigest(payload)
            fsync_directory(self.directory)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        self._closed = True
        return dict(sorted(digests.items()))

    def abort(self) -> None:
        """Stop writing and close every file without finishing; partial files stay on disk."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = _Aborted()
        self._stop_thread()
        for shard in self._shards:
            if shard.direct is not None:
                shard.direct.release()
                shard.direct = None
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1
        self._close_io()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.abort()

    # -- internals (the I/O thread runs _drain_queue -> _write_slot)

    def _raise_pending_error(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _close_io(self) -> None:
        if self._io is not None:
            self._io.shutdown()
            self._io = None

    def _drain_queue(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    try:
                        with self._lane or contextlib.nullcontext():
                            self._write_slot(*item)
                        if self._on_written is not None:
                            self._on_written(item[1])
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                        self._error = exc
                with self._pending_lock:
                    self._pending -= item[0].nbytes
            finally:
                del item
                self._queue.task_done()

    def _open_shard(self, index: int) -> None:
        if index and self._shards[index - 1].direct is not None:
            # The previous file is complete (tensors come in layout order): write its
            # staged tail now, so at most one file's buffers are held at once.
            previous = self._shards[index - 1]
            previous.direct.close()
            previous.direct = None
        shard = self._shards[index]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        shard.fd = -1
        if self._direct:
            try:
                shard.fd = os.open(shard.path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:  # a filesystem without direct I/O: write through the cache
                if exc.errno != errno.EINVAL:
                    raise
        if shard.fd < 0:
            shard.fd = os.open(shard.path, flags, 0o644)
        else:
            if self._io is None:  # one thread writes the staged buffers of this writer
                self._io = ThreadPoolExecutor(1, thread_name_prefix="mergebuild-direct")
            shard.direct = _DirectFile(shard.fd, self._io)
        self._opened = index
        shard.sha256 = hashlib.sha256(shard.header)
        shard.xxh128 = xxhash.xxh3_128(shard.header)
        if shard.direct is not None:
            shard.direct.append_bytes(shard.header)
        else:
            _write_all(shard.fd, memoryview(shard.header), 0)

    def _write_slot(self, slot: _Slot, tensor: torch.Tensor) -> None:
        while self._opened < slot.shard:
            self._open_shard(self._opened + 1)
        shard = self._shards[slot.shard]
        if slot.nbytes == 0:
            return
        # A view of the tensor's memory without copying; `tensor` stays referenced meanwhile.
        address = tensor.data_ptr()
        view = memoryview((ctypes.c_ubyte * slot.nbytes).from_address(address)).cast("B")
        direct = shard.direct
        if direct is not None and direct.position != slot.offset:
            raise ValueError(f"tensor '{slot.name}' is not where the file has got to")

        def put(begin: int, end: int) -> None:
            """Hash bytes [begin, end) of the tensor and write them (or stage them, through
            O_DIRECT, in the stream's aligned buffer)."""
            chunk = view[begin:end]
            shard.sha256.update(chunk)
            shard.xxh128.update(chunk)
            if direct is not None:
                direct.append(address + begin, end - begin)
            else:
                _write_all(shard.fd, chunk, slot.offset + begin)

        begin = 0
        if faults.ARMED:  # a reliability test may stop us half-way through this tensor
            begin = slot.nbytes // 2
            put(0, begin)
            if direct is not None:
                direct.flush_whole()
            faults.point("writer.mid_tensor")
        for start in range(begin, slot.nbytes, _IO_CHUNK):
            put(start, min(slot.nbytes, start + _IO_CHUNK))
        if direct is None:
            _start_writeback(shard.fd, slot.offset, slot.nbytes)


class _DirectFile:
    """One file written front to back with O_DIRECT, bypassing the page cache.

    Direct I/O wants aligned memory, offsets and lengths, so bytes are staged in two
    page-aligned buffers: while one is written on ``io`` (a thread), the other fills.
    ``close`` writes the last partial block padded with zeros, then truncates the file to
    its true length. Where the filesystem refuses an aligned direct write (EINVAL), the
    file falls back to ordinary writes through the page cache.
    """

    _BLOCK = 4096
    _SIZE = 2 * 2**20

    def __init__(self, fd: int, io: ThreadPoolExecutor):
        self.fd, self.io = fd, io
        self.buffers = [mmap.mmap(-1, self._SIZE) for _ in range(2)]
        self.views = [memoryview(b) for b in self.buffers]
        # A buffer's address (the ctypes view made for it is dropped at once, so the
        # mapping can still be closed).
        self.addresses = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self.buffers]
        self.current = 0  # the buffer being filled
        self.start = 0  # file offset of its first byte
        self.used = 0
        self.pending: Future | None = None  # the other buffer's write, while in flight
        self.cached = False  # fell back to writes through the page cache

    @property
    def position(self) -> int:
        """The file offset the next appended byte goes to."""
        return self.start + self.used

    def append_bytes(self, data: bytes) -> None:
        holder = ctypes.create_string_buffer(data, len(data))
        self.append(ctypes.addressof(holder), len(data))

    def append(self, address: int, nbytes: int) -> None:
        """Copy ``nbytes`` at ``address`` into the stream (ctypes.memmove runs without the
        GIL), handing each buffer that fills to ``io``."""
        while nbytes:
            n = min(nbytes, self._SIZE - self.used)
            ctypes.memmove(self.addresses[self.current] + self.used, address, n)
            self.used += n
            address += n
            nbytes -= n
            if self.used == self._SIZE:
                self._wait()
                self.pending = self.io.submit(self._write, self.current, self._SIZE,
                                              self.start)
                self.current ^= 1
                self.start += self._SIZE
                self.used = 0

    def flush_whole(self) -> None:
        """Write the staged whole blocks now, keeping the partial last block staged."""
        self._wait()
        whole = self.used - self.used % self._BLOCK
        if whole:
            self._write(self.current, whole, self.start)
            kept = self.used - whole
            view = self.views[self.current]
            view[:kept] = view[whole:self.used]
            self.start += whole
            self.used = kept

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _write(self, index: int, nbytes: int, offset: int) -> None:
        data = self.views[index][:nbytes]
        try:
            _write_all(self.fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self.cached:
                raise
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.cached = True
            _write_all(self.fd, data, offset)

    def close(self) -> None:
        """Write what is staged (the last block padded with zeros), cut the file to its
        length, free the buffers."""
        self._wait()
        length = self.position
        if self.used:
            padded = -(-self.used // self._BLOCK) * self._BLOCK
            self.views[self.current][self.used:padded] = bytes(padded - self.used)
            self._write(self.current, padded, self.start)
        if os.fstat(self.fd).st_size != length:
            os.ftruncate(self.fd, length)
        self.release()

    def release(self) -> None:
        """Free the buffers (after the write in flight, whatever its outcome)."""
        if self.pending is not None:
            with contextlib.suppress(OSError):
                self._wait()
        for view, buffer in zip(self.views, self.buffers, strict=True):
            view.release()
            # A failed write's traceback may still hold a slice of it: the mapping then
            # goes when that error does.
            with contextlib.suppress(BufferError):
                buffer.close()
        self.views, self.buffers = [], []


class _Aborted(Exception):
    """Marks a writer that was aborted; queued tensors are dropped, nothing is raised."""


def _sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (Linux; Python's os lacks it), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a tensor's bytes to disk now, without waiting for them: the fsync at
    the end then waits for the last tensors only (not for every output's whole size, with the
    cores idle), and the dirty pages of a sweep's outputs do not pile up until the kernel
    throttles the writers. A hint: where the call is missing or fails, nothing changes."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        if written == 0:  # pwrite should raise ENOSPC itself; never loop forever
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = data[written:]
        offset += written
