"""Tests for mergebuild.io.checkpoint: header validation, zero-copy reads, streaming sharded writes."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.io import checkpoint
from mergebuild.io.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    CheckpointWriter,
    read_header,
    reference_order,
)
from mergebuild.io.dtypes import safetensors_code
from mergebuild.errors import CheckpointError


def _sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=gen).to(torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, generator=gen),
        "half": torch.randn(3, 5, generator=gen).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
    }


def _layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, safetensors_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()]


def _write(directory: Path, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, str]:
    layout = _layout(tensors)
    writer = CheckpointWriter(directory, layout, **kwargs)
    for name, _, _ in layout:
        writer.write(name, tensors[name])
    return writer.finish()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A hand-made safetensors file; `header` is a dict (JSON-encoded) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One file written by safetensors itself, with every dtype family and edge shape."""
    tensors = _sample_tensors()
    path = tmp_path_factory.mktemp("reference") / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


# --------------------------------------------------------------------------- read_header


def test_read_header_gives_absolute_offsets_of_reference_file(reference_file):
    path, tensors = reference_file
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert set(infos) == set(tensors)
    raw = path.read_bytes()
    for name, info in infos.items():
        expected = tensors[name]
        assert info.dtype == safetensors_code(expected.dtype)
        assert info.shape == tuple(expected.shape)
        assert info.file == path
        assert info.nbytes == expected.numel() * expected.element_size()
        expected_bytes = expected.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw[info.start : info.end] == expected_bytes


def test_file_shorter_than_length_prefix_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="model.safetensors is 3 bytes, too short"):
        read_header(path)


def test_header_length_beyond_file_is_truncation(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", {"__metadata__": {}}, length=500)
    with pytest.raises(CheckpointError, match="is truncated: header length is 500 bytes"):
        read_header(path)


def test_huge_header_length_is_refused_before_reading(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", b"{}", length=2**63)
    with pytest.raises(CheckpointError, match="declares a 9223372036854775808-byte header"):
        read_header(path)


def test_non_utf8_header_is_refused(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", b'{"\xff\xfe": 1}')
    with pytest.raises(CheckpointError, match="header that is not UTF-8"):
        read_header(path)


def test_non_json_header_is_refused(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", b"{this is not json}")
    with pytest.raises(CheckpointError, match="header that is not valid JSON"):
        read_header(path)


def test_json_array_header_is_refused(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", b"[1, 2, 3]")
    with pytest.raises(CheckpointError, match="header that is not a JSON object"):
        read_header(path)


def test_duplicate_tensor_names_in_header_are_refused(tmp_path):
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    path = _raw_file(tmp_path / "model.safetensors", f'{{"a":{entry},"a":{entry}}}'.encode(), b"x")
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        read_header(path)


def test_unknown_dtype_is_refused(tmp_path):
    header = {"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"xx")
    with pytest.raises(CheckpointError, match="tensor 'w' with unsupported dtype 'Q4_K'"):
        read_header(path)


@pytest.mark.parametrize("shape", [[-1, 2], [2.0], "2", [True]])
def test_invalid_shape_is_refused(tmp_path, shape):
    header = {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"xx")
    with pytest.raises(CheckpointError, match="tensor 'w' with an invalid shape"):
        read_header(path)


@pytest.mark.parametrize("offsets", [[0], [2, 0], [-2, 0], "0,2", [0, 2.5]])
def test_malformed_offsets_are_refused(tmp_path, offsets):
    header = {"w": {"dtype": "U8", "shape": [2], "data_offsets": offsets}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"xx")
    with pytest.raises(CheckpointError, match="tensor 'w' with invalid data_offsets"):
        read_header(path)


def test_offsets_beyond_data_are_truncation(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 5)
    with pytest.raises(
        CheckpointError,
        match="model.safetensors is truncated: header promises 16 bytes of tensor data, "
        "file has 5; re-download or rebuild it",
    ):
        read_header(path)


def test_offsets_inconsistent_with_dtype_and_shape_are_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"span 8 bytes but F32 \[4\] needs 16"):
        read_header(path)


def test_overlapping_offsets_are_refused(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
    }
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 6)
    with pytest.raises(CheckpointError, match="tensor 'b' overlapping"):
        read_header(path)


def test_gap_between_tensors_is_refused(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
    }
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 6)
    with pytest.raises(CheckpointError, match="gap of unused bytes before tensor 'b'"):
        read_header(path)


def test_trailing_bytes_after_data_are_refused(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 5)
    with pytest.raises(CheckpointError, match="3 unexpected trailing bytes"):
        read_header(path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = _raw_file(tmp_path / "model.safetensors", {"__metadata__": {"format": 1}})
    with pytest.raises(CheckpointError, match="__metadata__ that is not a string-to-string"):
        read_header(path)


def test_truncated_real_file_is_refused(tmp_path, reference_file):
    path, _ = reference_file
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is truncated: header promises"):
        read_header(cut)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")


def test_read_header_does_not_import_torch(reference_file):
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from mergebuild.io.checkpoint import read_header; "
        f"read_header(Path({str(reference_file[0])!r})); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- CheckpointReader


def test_reader_loads_same_values_as_safetensors(tmp_path, reference_file):
    path, tensors = reference_file
    (tmp_path / "model.safetensors").symlink_to(path)
    with CheckpointReader(tmp_path) as reader:
        assert list(reader.tensors) == sorted(tensors)
        expected = load_file(path)
        for name in tensors:
            got = reader.load(name)
            assert got.dtype == expected[name].dtype
            assert got.shape == expected[name].shape
            assert torch.equal(got, expected[name])


def test_reader_load_is_zero_copy_view_of_one_mapping(tmp_path, reference_file):
    path, _ = reference_file
    (tmp_path / "model.safetensors").symlink_to(path)
    reader = CheckpointReader(tmp_path)
    a = reader.tensors["lm_head.weight"]
    b = reader.tensors["model.embed_tokens.weight"]
    first, second = reader.load(a.name), reader.load(b.name)
    # Both are views of a single mapping of the file: their addresses differ by the offsets.
    assert second.data_ptr() - first.data_ptr() == b.start - a.start
    assert reader.load(a.name).data_ptr() == first.data_ptr()
    reader.close()
    # Tensors loaded before close() stay valid: the mapping lives as long as they do.
    torch.testing.assert_close(first, load_file(path)["lm_head.weight"])


def test_reader_load_copy_is_writable_and_independent(tmp_path, reference_file):
    path, tensors = reference_file
    (tmp_path / "model.safetensors").symlink_to(path)
    reader = CheckpointReader(tmp_path)
    owned = reader.load("lm_head.weight", copy=True)
    owned.add_(1.0)
    torch.testing.assert_close(reader.load("lm_head.weight"), tensors["lm_head.weight"])


def test_reader_unknown_tensor_is_key_error(tmp_path, reference_file):
    (tmp_path / "model.safetensors").symlink_to(reference_file[0])
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        CheckpointReader(tmp_path).load("missing")


def test_reader_reads_config(tmp_path, reference_file):
    (tmp_path / "model.safetensors").symlink_to(reference_file[0])
    assert CheckpointReader(tmp_path).config is None
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    reader = CheckpointReader(tmp_path)
    assert reader.config == {"model_type": "llama"}
    assert reader.weight_files() == [tmp_path / "model.safetensors"]
    assert reader.metadata == {"model.safetensors": {"format": "pt"}}


def test_reader_refuses_invalid_config(tmp_path, reference_file):
    (tmp_path / "model.safetensors").symlink_to(reference_file[0])
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json in .* is not valid JSON"):
        CheckpointReader(tmp_path)


def test_reader_refuses_pickle_only_directory(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "extra.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(
        CheckpointError,
        match=r"only pickle checkpoints \(extra.pt, pytorch_model.bin\); pickle checkpoints "
        r"are not read \(only safetensors\); convert with",
    ):
        CheckpointReader(tmp_path)


def test_reader_refuses_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights"):
        CheckpointReader(tmp_path)


def test_reader_refuses_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        CheckpointReader(tmp_path / "absent")


def test_reader_refuses_tensor_in_two_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'w' appears in both a.safetensors and b"):
        CheckpointReader(tmp_path)


def test_reader_reports_bad_file_by_name(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(CheckpointError, match="model.safetensors is 4 bytes"):
        CheckpointReader(tmp_path)


def test_index_wins_over_stray_safetensors(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    _write(tmp_path, tensors, max_shard_bytes=16)
    save_file({"a": torch.zeros(4)}, tmp_path / "consolidated.safetensors")
    reader = CheckpointReader(tmp_path)
    assert reader.index_file == tmp_path / INDEX_NAME
    assert [p.name for p in reader.weight_files()] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    torch.testing.assert_close(reader.load("a"), tensors["a"])


def test_index_with_missing_shard_is_refused(tmp_path):
    _write(tmp_path, {"a": torch.arange(4.0), "b": torch.ones(2, 2)}, max_shard_bytes=16)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"references missing shard\(s\): model-00002-of-00002"
    ):
        CheckpointReader(tmp_path)


def test_index_disagreeing_with_shards_is_refused(tmp_path):
    _write(tmp_path, {"a": torch.arange(4.0), "b": torch.ones(2, 2)}, max_shard_bytes=16)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="places 'a' in model-00002-of-00002"):
        CheckpointReader(tmp_path)


def test_index_pointing_outside_directory_is_refused(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="points outside the directory"):
        CheckpointReader(tmp_path)


def test_invalid_index_is_refused(tmp_path):
    (tmp_path / INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="is not a valid index"):
        CheckpointReader(tmp_path)


# --------------------------------------------------------------------------- CheckpointWriter


@pytest.mark.parametrize("background", [True, False])
def test_writer_is_byte_identical_to_save_file(tmp_path, background):
    tensors = _sample_tensors()
    ordered = {name: tensors[name] for name, _, _ in reference_order(_layout(tensors))}
    _write(tmp_path / "ours", ordered, metadata={"format": "pt"}, background=background)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    ours = (tmp_path / "ours" / "model.safetensors").read_bytes()
    assert ours == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_in_any_order_loads_identically(tmp_path):
    tensors = _sample_tensors()
    _write(tmp_path, tensors)  # layout order differs from the reference's dtype-then-name order
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert torch.equal(loaded[name], expected)
    assert list(read_header(tmp_path / "model.safetensors")[0]) == list(tensors)


def test_writer_returns_sha256_of_every_file(tmp_path):
    digests = _write(tmp_path, _sample_tensors(), max_shard_bytes=200)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(digests) == written
    assert INDEX_NAME in digests
    for name, digest in digests.items():
        assert digest == _sha256(tmp_path / name)


def test_sharded_round_trip_with_index(tmp_path):
    tensors = _sample_tensors()
    _write(tmp_path, tensors, max_shard_bytes=200, metadata={"source": "test"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 2
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    loaded: dict[str, torch.Tensor] = {}
    for shard in shard_names:
        shard_tensors = load_file(tmp_path / shard)
        shard_bytes = sum(t.numel() * t.element_size() for t in shard_tensors.values())
        assert shard_bytes <= 200 or len(shard_tensors) == 1
        loaded |= shard_tensors
        assert read_header(tmp_path / shard)[1] == {"format": "pt", "source": "test"}
    with CheckpointReader(tmp_path) as reader:
        for name, expected in tensors.items():
            assert torch.equal(loaded[name], expected)
            assert torch.equal(reader.load(name), expected)


def test_oversized_tensor_gets_its_own_shard(tmp_path):
    tensors = {"small": torch.zeros(2), "big": torch.zeros(100), "tail": torch.zeros(2)}
    _write(tmp_path, tensors, max_shard_bytes=64)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert len({weight_map["small"], weight_map["big"], weight_map["tail"]}) == 3


def test_writer_header_is_padded_to_eight_bytes(tmp_path):
    _write(tmp_path, {"x": torch.zeros(3, dtype=torch.float16)})
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    assert raw[8 : 8 + length].decode().startswith('{"__metadata__":{"format":"pt"}')


def test_writer_rejects_out_of_order_tensor(tmp_path):
    writer = CheckpointWriter(tmp_path, [("a", "F32", (2,)), ("b", "F32", (2,))])
    with pytest.raises(ValueError, match="expected tensor 'a' next \\(layout order\\), got 'b'"):
        writer.write("b", torch.zeros(2))
    writer.abort()


def test_writer_rejects_wrong_dtype(tmp_path):
    writer = CheckpointWriter(tmp_path, [("a", "BF16", (2,))])
    with pytest.raises(ValueError, match=r"tensor 'a' is F32 \[2\], layout says BF16 \[2\]"):
        writer.write("a", torch.zeros(2))
    writer.abort()


def test_writer_rejects_wrong_shape(tmp_path):
    writer = CheckpointWriter(tmp_path, [("a", "F32", (2, 3))])
    with pytest.raises(ValueError, match=r"tensor 'a' is F32 \[3, 2\], layout says F32 \[2, 3\]"):
        writer.write("a", torch.zeros(3, 2))
    writer.abort()


def test_writer_rejects_extra_tensor_and_early_finish(tmp_path):
    writer = CheckpointWriter(tmp_path / "a", [("a", "F32", (2,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="every tensor of the layout was already written"):
        writer.write("b", torch.zeros(2))
    writer.finish()
    early = CheckpointWriter(tmp_path / "b", [("a", "F32", (2,)), ("b", "F32", (2,))])
    early.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 missing, next is 'b'"):
        early.finish()


def test_writer_rejects_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        CheckpointWriter(tmp_path, [("a", "F32", (2,)), ("a", "F32", (2,))])
    with pytest.raises(ValueError, match="unsupported dtype"):
        CheckpointWriter(tmp_path, [("a", "float32", (2,))])


def test_writer_writes_non_contiguous_tensor_values(tmp_path):
    base = torch.arange(6.0).view(2, 3)
    _write(tmp_path, {"t": base.t()})
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], base.t())


def test_writer_splits_large_tensors_into_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_IO_CHUNK", 7)
    tensors = {"t": torch.randn(5, 9), "u": torch.arange(13, dtype=torch.int16)}
    digests = _write(tmp_path, tensors)
    assert digests["model.safetensors"] == _sha256(tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_empty_layout_writes_a_valid_file(tmp_path):
    digests = CheckpointWriter(tmp_path, []).finish()
    assert load_file(tmp_path / "model.safetensors") == {}
    assert digests == {"model.safetensors": _sha256(tmp_path / "model.safetensors")}


@pytest.mark.parametrize("background", [True, False])
def test_disk_full_propagates_as_oserror(tmp_path, monkeypatch, background):
    def full_disk(fd, data, offset):
        if offset > 0:  # let the header through, fail on tensor data
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    monkeypatch.setattr(checkpoint.os, "pwrite", full_disk)
    writer = CheckpointWriter(
        tmp_path, [(f"t{i}", "F32", (4,)) for i in range(8)], background=background
    )
    with pytest.raises(OSError) as caught:
        for i in range(8):
            writer.write(f"t{i}", torch.zeros(4))
        writer.finish()
    assert caught.value.errno == errno.ENOSPC
    writer.abort()


def test_abort_stops_writer_and_allows_no_more_writes(tmp_path):
    writer = CheckpointWriter(tmp_path, [("a", "F32", (2,)), ("b", "F32", (2,))])
    writer.write("a", torch.zeros(2))
    writer.abort()
    assert writer._thread is None
    with pytest.raises(ValueError, match="after finish\\(\\) or abort\\(\\)"):
        writer.write("b", torch.zeros(2))


def test_context_manager_aborts_unfinished_writer(tmp_path):
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path, [("a", "F32", (2,))]) as writer:
        raise RuntimeError("compute failed")
    assert writer._thread is None
    assert all(shard.fd == -1 for shard in writer._shards)


def test_reader_reads_writer_output_zero_copy(tmp_path):
    tensors = {"w": torch.randn(4, 4).to(torch.bfloat16), "e": torch.zeros(0, dtype=torch.bfloat16)}
    _write(tmp_path, tensors)
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.load("w"), tensors["w"])
        assert reader.load("e").shape == (0,)
        assert reader.load("e").dtype == torch.bfloat16


def test_writer_starts_each_tensors_writeback_as_it_is_written(tmp_path, monkeypatch):
    """Every tensor's byte range is handed to sync_file_range(WRITE) once written (so the
    final fsync waits for the last tensors only); the file is the same either way."""
    import sys

    from mergebuild.io import checkpoint

    if sys.platform.startswith("linux"):
        assert checkpoint._SYNC_FILE_RANGE is not None  # resolved from libc
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(checkpoint, "_SYNC_FILE_RANGE",
                        lambda fd, offset, nbytes, flags: calls.append((offset, nbytes, flags)))
    tensors = {"a": torch.ones(3, 5), "b": torch.zeros(0), "c": torch.arange(7.0)}
    layout = [(name, "F32", tuple(t.shape)) for name, t in tensors.items()]
    writer = checkpoint.CheckpointWriter(tmp_path / "out", layout)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    header = 8 + int.from_bytes((tmp_path / "out" / "model.safetensors").read_bytes()[:8],
                                "little")
    assert calls == [(header, 60, 2), (header + 60, 28, 2)]  # the empty tensor writes nothing
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())


def test_writers_sharing_a_lane_write_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Writers given one lane (a fused pass's outputs) hash and write no more tensors at once
    than the lane allows, and each still writes its own file intact."""
    import threading
    import time

    from mergebuild.io import checkpoint

    active, most = [0], [0]
    lock = threading.Lock()
    real = checkpoint.CheckpointWriter._write_slot

    def slow(self, slot, tensor):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.02)  # long enough for the other writers' threads to try meanwhile
        try:
            return real(self, slot, tensor)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(checkpoint.CheckpointWriter, "_write_slot", slow)
    lane = threading.Semaphore(1)
    tensors = {f"t{i}": torch.full((4, 4), float(i)) for i in range(4)}
    layout = [(name, "F32", (4, 4)) for name in tensors]
    writers = [checkpoint.CheckpointWriter(tmp_path / f"w{k}", layout, lane=lane)
               for k in range(3)]
    for name, t in tensors.items():
        for writer in writers:
            writer.write(name, t)
    for writer in writers:
        writer.finish()
    assert most[0] == 1
    for k in range(3):
        loaded = load_file(tmp_path / f"w{k}" / "model.safetensors")
        assert all(torch.equal(loaded[name], t) for name, t in tensors.items())


# --------------------------------------------------------------------------- direct writes


def _direct_tensors() -> dict[str, torch.Tensor]:
    """The sample tensors plus ones that span several small staging buffers."""
    gen = torch.Generator().manual_seed(1)
    return {**_sample_tensors(),
            "big": torch.randn(3001, generator=gen),
            "odd": torch.randn(1237, generator=gen).to(torch.bfloat16)}


def _written_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 4000])
def test_direct_writer_writes_the_same_files_and_digests(tmp_path, monkeypatch, shard_bytes):
    """Through O_DIRECT (staging buffers of two blocks here, so every file crosses several
    of them and ends in a padded partial block) the files, sha256 and xxh128 are those of
    the ordinary writer, sharded or not."""
    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 2 * checkpoint._DirectFile._BLOCK)
    tensors = _direct_tensors()
    plain = CheckpointWriter(tmp_path / "plain", _layout(tensors), max_shard_bytes=shard_bytes)
    direct = CheckpointWriter(tmp_path / "direct", _layout(tensors),
                              max_shard_bytes=shard_bytes, direct=True)
    for writer in (plain, direct):
        for name, t in tensors.items():
            writer.write(name, t)
    assert direct.finish() == plain.finish()
    assert direct.xxh128 == plain.xxh128
    assert _written_files(tmp_path / "direct") == _written_files(tmp_path / "plain")
    assert direct._io is None  # the direct writes' thread is gone


def test_direct_writer_bypasses_the_page_cache_with_aligned_writes(tmp_path, monkeypatch):
    """Every weight file is opened with O_DIRECT and written in whole aligned blocks from
    aligned memory (the last one padded), then cut to its length; nothing else is written."""
    import fcntl

    block = checkpoint._DirectFile._BLOCK
    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 2 * block)
    writes: list[tuple[int, int, int]] = []
    real_pwrite = checkpoint.os.pwrite

    def pwrite(fd, data, offset):
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        address = ctypes.addressof(ctypes.c_char.from_buffer(data)) if isinstance(
            data, memoryview) and not data.readonly else None
        writes.append((offset, len(data), address))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(checkpoint.os, "pwrite", pwrite)
    tensors = _direct_tensors()
    _write(tmp_path, tensors, direct=True)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert writes and all(o % block == 0 and n % block == 0 for o, n, _ in writes)
    assert all(a is not None and a % block == 0 for _, _, a in writes)
    assert sorted(o for o, _, _ in writes) == list(range(0, size + block - 1, block * 2))[
        :len(writes)]
    assert sum(n for _, n, _ in writes) == -(-size // block) * block  # once each, padded
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())


def test_direct_writer_falls_back_where_the_filesystem_refuses_direct_io(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT at open (tmpfs before Linux 6.6), or refuses a
    direct write, gets ordinary writes: the same file, no error."""
    import fcntl

    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 2 * checkpoint._DirectFile._BLOCK)
    tensors = _direct_tensors()
    expected = _write(tmp_path / "plain", tensors)
    real_open, real_pwrite = checkpoint.os.open, checkpoint.os.pwrite

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint.os, "open", refusing_open)
    assert _write(tmp_path / "at-open", tensors, direct=True) == expected
    monkeypatch.setattr(checkpoint.os, "open", real_open)

    refused = []

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(checkpoint.os, "pwrite", refusing_pwrite)
    assert _write(tmp_path / "at-write", tensors, direct=True) == expected
    assert refused == [0]  # refused once; the rest of the file went through the cache
    for name in ("at-open", "at-write"):
        assert _written_files(tmp_path / name) == _written_files(tmp_path / "plain")


def test_direct_writer_disk_full_propagates_and_frees_its_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 2 * checkpoint._DirectFile._BLOCK)
    live = []
    real_init, real_release = checkpoint._DirectFile.__init__, checkpoint._DirectFile.release
    monkeypatch.setattr(checkpoint._DirectFile, "__init__",
                        lambda self, *a: (live.append(self), real_init(self, *a))[1])
    monkeypatch.setattr(checkpoint._DirectFile, "release",
                        lambda self: (live.remove(self), real_release(self))[1])

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "pwrite", full_disk)
    tensors = _direct_tensors()
    writer = CheckpointWriter(tmp_path, _layout(tensors), direct=True)
    with pytest.raises(OSError) as caught:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finish()
    assert caught.value.errno == errno.ENOSPC
    writer.abort()
    assert live == [] and writer._io is None
    assert all(shard.fd == -1 for shard in writer._shards)


def test_direct_writer_holds_one_files_buffers_at_a_time(tmp_path, monkeypatch):
    """A sharded model's finished files give their staging buffers back as the next opens."""
    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 2 * checkpoint._DirectFile._BLOCK)
    live, most = [], [0]
    real_init, real_release = checkpoint._DirectFile.__init__, checkpoint._DirectFile.release

    def init(self, *args):
        live.append(self)
        most[0] = max(most[0], len(live))
        real_init(self, *args)

    monkeypatch.setattr(checkpoint._DirectFile, "__init__", init)
    monkeypatch.setattr(checkpoint._DirectFile, "release",
                        lambda self: (live.remove(self), real_release(self))[1])
    tensors = {f"t{i}": torch.full((700,), float(i)) for i in range(6)}
    _write(tmp_path, tensors, max_shard_bytes=3000, direct=True)
    assert len(json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]) == 6
    assert most[0] == 1 and live == []


def test_direct_writer_stopped_mid_tensor_has_written_only_true_bytes(tmp_path, monkeypatch):
    """The reliability tests' mid-tensor stop: through O_DIRECT the whole blocks staged so
    far reach the file (what a crash there leaves), every byte of them the true one."""
    monkeypatch.setattr(checkpoint._DirectFile, "_SIZE", 4 * checkpoint._DirectFile._BLOCK)

    class Stop(Exception):
        pass

    def point(name):
        if name == "writer.mid_tensor":
            raise Stop

    monkeypatch.setattr(checkpoint.faults, "ARMED", True)
    monkeypatch.setattr(checkpoint.faults, "point", point)
    tensors = {"a": torch.randn(5000), "b": torch.randn(10)}
    writer = CheckpointWriter(tmp_path / "direct", _layout(tensors), background=False,
                              direct=True)
    with pytest.raises(Stop):
        writer.write("a", tensors["a"])
    writer.abort()
    monkeypatch.setattr(checkpoint.faults, "ARMED", False)
    _write(tmp_path / "plain", tensors)
    partial = (tmp_path / "direct" / "model.safetensors").read_bytes()
    whole = (tmp_path / "plain" / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(whole[:8], "little")
    block = checkpoint._DirectFile._BLOCK
    assert len(partial) == (header + 2500 * 4) // block * block
    assert partial == whole[:len(partial)]
