"""Hugging Face layouts: the files of a model directory by role, and the hub cache's folders."""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT adapters ("model+lora" references)

# The Hugging Face hub cache: <cache>/models--<org>--<name>/snapshots/<40-hex commit>/<file>,
# where snapshot files link into the repo folder's blobs/.
_REPO_PREFIX = "models--"
_SNAPSHOTS = "snapshots"
_SNAPSHOT_PATH = re.compile(r"/models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/"
                            r"(?P<commit>[0-9a-f]{40})/?$")


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    """A repo's folder in the hub cache: ``org/name`` → ``<cache>/models--org--name``."""
    return cache_dir / (_REPO_PREFIX + repo_id.replace("/", "--"))


def snapshot_path(cache_dir: Path, repo_id: str, commit: str) -> Path:
    """Where the files of ``repo_id`` at ``commit`` live in the hub cache."""
    return repo_cache_dir(cache_dir, repo_id) / _SNAPSHOTS / commit


def snapshot_repo_dir(directory: Path) -> Path | None:
    """The repo folder (holding ``blobs/``) of a cache snapshot directory; None for others."""
    if directory.parent.name == _SNAPSHOTS and directory.parent.parent.name.startswith(
        _REPO_PREFIX
    ):
        return directory.parent.parent
    return None


def parse_snapshot_path(path: str) -> tuple[str, str] | None:
    """(repo id, commit) of a path that is a hub cache snapshot directory, else None."""
    match = _SNAPSHOT_PATH.search(path)
    if match is None:
        return None
    return f"{match['org']}/{match['name']}", match["commit"]
