"""Hugging Face Hub sources: resolve a revision to a commit, read metadata, fetch.

A hub source is identified by its *content*: the digest is the sha256 of the sorted
``{path: LFS sha256 or git blob id}`` of the files a merge needs, so a branch that moves
to a commit with identical files keeps its children fresh. Resolution never reads or
hashes weight bytes: online it asks ``HfApi.model_info(files_metadata=True)``; offline it
reads the standard Hugging Face cache, where LFS blobs are named by their sha256 and small
files by their git blob id.

Offline means ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) in the environment at
call time, huggingface_hub's own import-time constant, ``offline=True``, or a hub that
cannot be reached. The cache directory is read at call time too (``HF_HUB_CACHE``,
``HF_HOME``/hub, then huggingface_hub's constant) and passed explicitly to every
huggingface_hub call, so tests can point it at a temporary directory with monkeypatch.

No token is ever passed, stored or printed here: huggingface_hub finds it the standard
way (``HF_TOKEN``, ``hf auth login``), and error text taken from the hub is scrubbed.

A ``HubResolution`` is also one entry of ``Mergefile.lock`` (``plan/lockfile.py``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.errors import CheckpointError, SourceError
from mergebuild.io.checkpoint import check_tensor_entries, read_header
from mergebuild.io.dtypes import safetensors_code
from mergebuild.io.hf_layout import (
    ADAPTER_CONFIG,
    CONFIG_FILES,
    PICKLE_INDEX,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    repo_cache_dir,
    snapshot_path,
)
from mergebuild.provenance.secrets import scrub_text
from mergebuild.sources.pickle import load_pickle_state_dict

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "HubFile",
    "HubResolution",
    "fetch",
    "hub_cache_dir",
    "is_offline",
    "parse_hub_uri",
    "read_metadata",
    "resolve",
]

HUB_SCHEME = "hf://"

# Files a merge needs besides the weights; everything else in a repo (README, images,
# onnx/, gguf, original/ checkpoints) is neither hashed into the digest nor downloaded.
SIDE_FILES = frozenset({SAFETENSORS_INDEX, *CONFIG_FILES, *TOKENIZER_FILES, ADAPTER_CONFIG})
# Pickles a trainer leaves beside the weights; they are not weights and never needed.
_TRAINING_PICKLES = (
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "scaler.pt",
)

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REPO_PART_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_REVISION_RE = re.compile(r"[A-Za-z0-9._/+-]+")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class HubFile:
    """One file of a hub snapshot, identified without reading it.

    Exactly one of ``sha256`` (LFS files: weights, large tokenizers) and ``blob_id``
    (git oid of small files) is set.
    """

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None

    @property
    def identity(self) -> str:
        """The content id entering the digest: the LFS sha256, else the git blob id."""
        return self.sha256 or self.blob_id or ""

    @property
    def is_weights(self) -> bool:
        return self.path.endswith(".safetensors") or _is_pickle_weights(self.path)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "blob_id": self.blob_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HubFile:
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            sha256=data.get("sha256"),
            blob_id=data.get("blob_id"),
        )


@dataclass(frozen=True)
class HubResolution:
    """A hub source pinned to a commit: the files a merge needs and their content digest."""

    repo_id: str
    requested: str | None
    commit: str
    files: tuple[HubFile, ...]
    digest: str = field(default="")

    def __post_init__(self) -> None:
        files = tuple(sorted(self.files, key=lambda f: f.path))
        object.__setattr__(self, "files", files)
        if not self.digest:
            object.__setattr__(self, "digest", content_digest(files))

    @property
    def uri(self) -> str:
        """The URI the user wrote (``hf://org/name`` or ``hf://org/name@revision``)."""
        return format_hub_uri(self.repo_id, self.requested)

    @property
    def pinned_uri(self) -> str:
        """``hf://org/name@<commit>``: what provenance records."""
        return format_hub_uri(self.repo_id, self.commit)

    @property
    def weight_files(self) -> tuple[HubFile, ...]:
        return tuple(f for f in self.files if f.is_weights)

    @property
    def is_pickle(self) -> bool:
        """True when the weights are pickle files (only possible with ``allow_pickle=True``)."""
        return any(_is_pickle_weights(f.path) for f in self.files)

    def file(self, path: str) -> HubFile | None:
        return next((f for f in self.files if f.path == path), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "commit": self.commit,
            "digest": self.digest,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, node: str | None = None) -> HubResolution:
        """Rebuild a resolution written by :meth:`to_json`; the digest is re-checked."""
        try:
            repo_id, requested = parse_hub_uri(str(data["uri"]), node=node)
            commit = str(data["commit"])
            files = tuple(HubFile.from_json(f) for f in data["files"])
            digest = str(data["digest"])
        except (KeyError, TypeError, ValueError) as error:
            raise SourceError(
                f"malformed hub lock entry ({error.__class__.__name__}: {error})",
                node=node,
                hint="delete the entry from Mergefile.lock to resolve the source again",
            ) from None
        if not _COMMIT_RE.fullmatch(commit):
            raise SourceError(
                f"lock entry for {repo_id} has an invalid commit {commit!r}", node=node
            )
        resolution = cls(repo_id=repo_id, requested=requested, commit=commit, files=files)
        if resolution.digest != digest:
            raise SourceError(
                f"lock entry for {format_hub_uri(repo_id, commit)} does not match its own digest",
                node=node,
                hint="the lock file was edited by hand; delete the entry to resolve the source again",
            )
        return resolution


def content_digest(files: Iterable[HubFile]) -> str:
    """``"sha256:" +`` sha256 of the canonical JSON of ``{path: identity}``."""
    table = {f.path: f.identity for f in files}
    canonical = json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- URIs


def parse_hub_uri(uri: str, *, node: str | None = None) -> tuple[str, str | None]:
    """Split ``hf://org/name@revision`` into ``(repo_id, revision or None)``.

    Example:
        >>> parse_hub_uri("hf://meta-llama/Llama-3.1-8B@main")
        ('meta-llama/Llama-3.1-8B', 'main')
    """
    if not isinstance(uri, str) or not uri.startswith(HUB_SCHEME):
        raise SourceError(
            f"{uri!r} is not a hub URI",
            node=node,
            hint="write hf://org/name or hf://org/name@revision",
        )
    rest = uri[len(HUB_SCHEME) :]
    repo_id, sep, revision = rest.partition("@")
    if not _valid_repo_id(repo_id):
        raise SourceError(
            f"{uri!r} does not name a valid hub repo",
            node=node,
            hint="a repo id is org/name of letters, digits, '-', '_' and '.' (no '--' or '..', at most 96 characters)",
        )
    if not sep:
        return repo_id, None
    if (
        not revision
        or not _REVISION_RE.fullmatch(revision)
        or ".." in revision
        or revision.startswith("/")
    ):
        raise SourceError(
            f"{uri!r} has an invalid revision {revision!r}",
            node=node,
            hint="after '@' write a branch, a tag or a 40-character commit sha",
        )
    return repo_id, revision


def format_hub_uri(repo_id: str, revision: str | None) -> str:
    return f"{HUB_SCHEME}{repo_id}@{revision}" if revision else f"{HUB_SCHEME}{repo_id}"


def _valid_repo_id(repo_id: str) -> bool:
    if (
        not repo_id
        or len(repo_id) > 96
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
    ):
        return False
    parts = repo_id.split("/")
    return len(parts) <= 2 and all(_REPO_PART_RE.fullmatch(p) for p in parts)


# --------------------------------------------------------------------------- environment


def is_offline() -> bool:
    """Whether hub access is disabled, read at call time (huggingface_hub reads it at import)."""
    values = [os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(v is not None for v in values):
        return any((v or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read at call time: HF_HUB_CACHE, HF_HOME/hub, then the default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[name])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_dir(resolution: HubResolution) -> Path:
    """Where the resolution's files live (or will live) in the Hugging Face cache."""
    return snapshot_path(hub_cache_dir(), resolution.repo_id, resolution.commit)


def _download_hint(repo_id: str, revision: str) -> str:
    return f"run once online or `hf download {repo_id} --revision {revision}`"


def _scrub(text: str) -> str:
    """The first line of hub error text, without credentials."""
    text = scrub_text(text)
    return text.splitlines()[0] if text else text


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


# --------------------------------------------------------------------------- file selection


def _is_pickle_weights(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(PICKLE_SUFFIXES):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in _TRAINING_PICKLES)


def select_needed(paths: Iterable[str], *, allow_pickle: bool) -> list[str] | None:
    """The paths a merge needs, or None when the repo has no safetensors weights.

    Only top-level files count. ``consolidated*.safetensors`` (Mistral's native format,
    duplicating the transformers shards) is skipped when other safetensors exist. With
    ``allow_pickle`` and no safetensors, pickle weights and their index are selected.
    """
    top = [p for p in paths if "/" not in p]
    weights = [p for p in top if p.endswith(".safetensors")]
    if any(not p.startswith("consolidated") for p in weights):
        weights = [p for p in weights if not p.startswith("consolidated")]
    side = [p for p in top if p in SIDE_FILES]
    if weights:
        return sorted(weights + side)
    if not allow_pickle:
        return None
    pickles = [p for p in top if _is_pickle_weights(p)]
    if not pickles:
        return None
    return sorted(pickles + side + [p for p in top if p == PICKLE_INDEX])


def _check_weights(
    repo_id: str, revision: str, all_paths: list[str], *, node: str, allow_pickle: bool
) -> list[str]:
    needed = select_needed(all_paths, allow_pickle=allow_pickle)
    if needed is not None:
        return needed
    uri = format_hub_uri(repo_id, revision)
    if any(_is_pickle_weights(p) for p in all_paths if "/" not in p):
        raise SourceError(
            f"{uri} offers only pickle weights (.bin/.pt), which can run code when loaded",
            node=node,
            hint="use a safetensors revision, or set `allow_pickle: true` on the source to load them with torch.load(weights_only=True)",
        )
    raise SourceError(f"{uri} has no safetensors weights at its top level", node=node)


# --------------------------------------------------------------------------- resolve


def resolve(
    repo_id: str,
    revision: str | None,
    *,
    node: str,
    locked_commit: str | None = None,
    offline: bool | None = None,
    allow_pickle: bool = False,
) -> HubResolution:
    """Pin a hub source to a commit and identify the files a merge needs, without downloading.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit sha as the user wrote it (None means ``main``).
        node: the source node's name, for errors.
        locked_commit: a commit from the lock file; when given it is used instead of
            resolving ``revision`` again (``--frozen``).
        offline: force (True) or forbid (False) cache-only resolution; None reads
            ``HF_HUB_OFFLINE``. An unreachable hub falls back to the cache either way.
        allow_pickle: accept repos that offer only pickle weights.

    Returns:
        The resolution; its ``digest`` depends only on file contents, not on the commit.
    """
    parse_hub_uri(format_hub_uri(repo_id, revision), node=node)  # rejects paths like "../x"
    if locked_commit is not None and not _COMMIT_RE.fullmatch(locked_commit):
        raise SourceError(
            f"locked commit {locked_commit!r} for {format_hub_uri(repo_id, revision)} is not a 40-character sha",
            node=node,
            hint="delete the entry from Mergefile.lock",
        )
    target = locked_commit or revision or "main"
    if offline is None:
        offline = is_offline()
    if offline:
        return _resolve_from_cache(
            repo_id,
            revision,
            target,
            node=node,
            allow_pickle=allow_pickle,
            reason="HF_HUB_OFFLINE=1",
        )

    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    uri = format_hub_uri(repo_id, target)
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, revision=target, files_metadata=True)
    except RevisionNotFoundError:
        raise SourceError(
            f"{uri}: the revision does not exist on the hub",
            node=node,
            hint="check the branch, tag or commit after '@'",
        ) from None
    except GatedRepoError:
        return _resolve_from_cache(
            repo_id,
            revision,
            target,
            node=node,
            allow_pickle=allow_pickle,
            reason="gated repo",
            missing_message=f"{uri} is gated and the cached token (if any) has no access",
            missing_hint=f"accept the terms on https://huggingface.co/{repo_id} and log in with `hf auth login` or HF_TOKEN",
        )
    except RepositoryNotFoundError:
        return _resolve_from_cache(
            repo_id,
            revision,
            target,
            node=node,
            allow_pickle=allow_pickle,
            reason="repo not found",
            missing_message=f"{uri} does not exist on the hub, or is private and no token with access is set",
            missing_hint="check the repo id, or log in with `hf auth login` or HF_TOKEN",
        )
    except _network_errors() as error:
        reason = f"hub unreachable: {_scrub(f'{error.__class__.__name__}: {error}')}"
        return _resolve_from_cache(
            repo_id, revision, target, node=node, allow_pickle=allow_pickle, reason=reason
        )
    return _resolution_from_model_info(
        info, repo_id, revision, locked_commit, node=node, allow_pickle=allow_pickle
    )


def _resolution_from_model_info(
    info: Any,
    repo_id: str,
    revision: str | None,
    locked_commit: str | None,
    *,
    node: str,
    allow_pickle: bool,
) -> HubResolution:
    target = locked_commit or revision or "main"
    uri = format_hub_uri(repo_id, target)
    commit = getattr(info, "sha", None)
    siblings = getattr(info, "siblings", None)
    if not commit or not _COMMIT_RE.fullmatch(commit) or siblings is None:
        raise SourceError(
            f"{uri}: the hub returned no commit or file list", node=node, hint="try again later"
        )
    if locked_commit and commit != locked_commit:
        raise SourceError(f"{uri}: the hub answered with commit {commit}", node=node)
    by_path = {s.rfilename: s for s in siblings}
    needed = _check_weights(repo_id, target, list(by_path), node=node, allow_pickle=allow_pickle)
    files = []
    for path in needed:
        sibling = by_path[path]
        lfs = sibling.lfs
        if lfs is not None:
            sha256 = lfs["sha256"] if isinstance(lfs, dict) and "sha256" in lfs else lfs.sha256
            size = lfs["size"] if isinstance(lfs, dict) and "size" in lfs else lfs.size
            files.append(HubFile(path=path, size=int(size), sha256=sha256))
        elif sibling.blob_id:
            files.append(HubFile(path=path, size=int(sibling.size or 0), blob_id=sibling.blob_id))
        else:
            raise SourceError(
                f"{uri}: the hub returned no hash for {path}",
                node=node,
                hint="the file listing lacks metadata; try again later",
            )
    return HubResolution(repo_id=repo_id, requested=revision, commit=commit, files=tuple(files))


def _resolve_from_cache(
    repo_id: str,
    requested: str | None,
    target: str,
    *,
    node: str,
    allow_pickle: bool,
    reason: str,
    missing_message: str | None = None,
    missing_hint: str | None = None,
) -> HubResolution:
    """Resolve from the local cache: refs/<name> or snapshots/<sha>, identities from blob names."""
    uri = format_hub_uri(repo_id, target)

    def missing(what: str) -> SourceError:
        message = missing_message or (
            f"{uri} is not in the local Hugging Face cache and the hub is unreachable ({reason})"
        )
        if what:
            message += f"; {what}"
        return SourceError(message, node=node, hint=missing_hint or _download_hint(repo_id, target))

    repo_dir = repo_cache_dir(hub_cache_dir(), repo_id)
    if _COMMIT_RE.fullmatch(target):
        commit = target
    else:
        ref = repo_dir / "refs" / target
        try:
            commit = ref.read_text().strip()
        except OSError:
            raise missing("") from None
        if not _COMMIT_RE.fullmatch(commit):
            raise missing(f"refs/{target} is corrupt")
    snapshot = snapshot_path(hub_cache_dir(), repo_id, commit)
    if not snapshot.is_dir():
        raise missing("")

    tree = _read_tree_cache(repo_dir, commit)
    if tree is not None:
        needed = _check_weights(repo_id, target, list(tree), node=node, allow_pickle=allow_pickle)
        files = tuple(_file_from_tree_entry(path, tree[path]) for path in needed)
    else:
        present = [p.name for p in snapshot.iterdir() if p.is_file()]
        if select_needed(present, allow_pickle=True) is None:
            # Only side files cached (e.g. config.json read while planning): weights unknown.
            raise missing(f"the cached snapshot {commit} holds no weights")
        needed = _check_weights(repo_id, target, present, node=node, allow_pickle=allow_pickle)
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            if index_name in needed:
                shards = _index_shards(snapshot / index_name, uri, node=node)
                absent = sorted(shards - set(present))
                if absent:
                    raise missing(f"the cached snapshot {commit} lacks {', '.join(absent[:3])}")
        files = tuple(_file_from_cache(snapshot / path, path) for path in needed)
    return HubResolution(repo_id=repo_id, requested=requested, commit=commit, files=files)


def _read_tree_cache(repo_dir: Path, commit: str) -> dict[str, dict[str, Any]] | None:
    """huggingface_hub's cached tree listing (``trees/<commit>.json``, format 1), if any."""
    try:
        data = json.loads((repo_dir / "trees" / f"{commit}.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format_version") != 1
        or not isinstance(data.get("files"), dict)
    ):
        return None
    return data["files"]


def _file_from_tree_entry(path: str, entry: Mapping[str, Any]) -> HubFile:
    if entry.get("lfs_sha256"):
        return HubFile(
            path=path, size=int(entry.get("lfs_size") or entry["size"]), sha256=entry["lfs_sha256"]
        )
    return HubFile(path=path, size=int(entry["size"]), blob_id=entry["blob_id"])


def _file_from_cache(link: Path, path: str) -> HubFile:
    """Identify a cached file by the name of the blob its snapshot symlink points to."""
    size = link.stat().st_size
    if link.is_symlink():
        blob = Path(os.path.realpath(link)).name
        if _SHA256_RE.fullmatch(blob):
            return HubFile(path=path, size=size, sha256=blob)
        return HubFile(path=path, size=size, blob_id=blob)
    # A cache without symlinks (Windows without developer mode) copies files into the
    # snapshot: there is no blob name, so hash the way the hub identifies the file.
    if path.endswith((".safetensors", ".model", *PICKLE_SUFFIXES)):
        digest = hashlib.sha256()
        with open(link, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        return HubFile(path=path, size=size, sha256=digest.hexdigest())
    return HubFile(path=path, size=size, blob_id=git_blob_id(link.read_bytes()))


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob with these bytes (what the hub reports for small files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _index_shards(index: Path, uri: str, *, node: str) -> set[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SourceError(
            f"{uri}: {index.name} is unreadable ({error.__class__.__name__})", node=node
        ) from None


# --------------------------------------------------------------------------- metadata


def read_metadata(
    resolution: HubResolution, *, node: str, offline: bool | None = None
) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """Read config.json and every tensor's (dtype, shape) without downloading weights.

    Cached files are read directly (only the safetensors header bytes); otherwise
    config.json is downloaded into the cache and headers come from the hub by range
    requests (``HfApi.get_safetensors_metadata``). dtypes are safetensors names
    ("BF16", "F32", ...). A repo without config.json gives ``{}``.

    Returns:
        ``(config, {tensor_name: (dtype, shape)})``.
    """
    if offline is None:
        offline = is_offline()
    snapshot = snapshot_dir(resolution)
    uri = resolution.pinned_uri

    config: dict = {}
    if resolution.file("config.json") is not None:
        config_path = snapshot / "config.json"
        if not config_path.is_file():
            config_path = _download_small(resolution, "config.json", node=node, offline=offline)
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise SourceError(
                f"{uri}: config.json is unreadable ({error.__class__.__name__})", node=node
            ) from None
        if not isinstance(config, dict):
            raise SourceError(f"{uri}: config.json is not a JSON object", node=node)

    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    remote: list[HubFile] = []
    for weight in resolution.weight_files:
        path = snapshot / weight.path
        if not path.is_file():
            remote.append(weight)
            continue
        if resolution.is_pickle:
            table = _pickle_tensor_table(path, uri, node=node)
        else:
            infos, _ = read_header(path, node=node, header_only=True)
            table = {name: (info.dtype, info.shape) for name, info in infos.items()}
        _merge_tables(tensors, table, weight.path, uri, node=node)
    if remote:
        if resolution.is_pickle:
            raise SourceError(
                f"{uri}: shapes of pickle weights are known only after download",
                node=node,
                hint="fetch the source first, or use a safetensors revision",
            )
        if offline:
            raise SourceError(
                f"{uri}: {remote[0].path} is not in the local Hugging Face cache and the hub is unreachable",
                node=node,
                hint=_download_hint(resolution.repo_id, resolution.commit),
            )
        for path, table in _remote_tensor_tables(resolution, remote, node=node).items():
            _merge_tables(tensors, table, path, uri, node=node)
    return config, tensors


def _merge_tables(
    into: dict[str, tuple[str, tuple[int, ...]]],
    table: Mapping[str, tuple[str, tuple[int, ...]]],
    file: str,
    uri: str,
    *,
    node: str,
) -> None:
    for name, info in table.items():
        if name in into:
            raise CheckpointError(
                f"{uri}: tensor {name!r} appears in more than one file (again in {file})", node=node
            )
        into[name] = info


def _pickle_tensor_table(
    path: Path, uri: str, *, node: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Shapes of a cached pickle checkpoint, loaded safely onto the meta device (no data read)."""
    state = load_pickle_state_dict(path, node=node, uri=uri, shapes_only=True)
    return {name: (_dtype_code_or_name(t.dtype), tuple(t.shape)) for name, t in state.items()}


def _dtype_code_or_name(dtype: Any) -> str:
    """The safetensors code of a pickled tensor's dtype; one without a code keeps torch's name."""
    try:
        return safetensors_code(dtype)
    except ValueError:
        return str(dtype)


def _download_small(resolution: HubResolution, filename: str, *, node: str, offline: bool) -> Path:
    uri = resolution.pinned_uri
    if offline:
        raise SourceError(
            f"{uri}: {filename} is not in the local Hugging Face cache and the hub is unreachable",
            node=node,
            hint=_download_hint(resolution.repo_id, resolution.commit),
        )
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(
            resolution.repo_id, filename, revision=resolution.commit, cache_dir=str(hub_cache_dir())
        )
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one user-facing line
        raise SourceError(
            f"{uri}: cannot download {filename} ({_scrub(f'{error.__class__.__name__}: {error}')})",
            node=node,
            hint=_download_hint(resolution.repo_id, resolution.commit),
        ) from None
    return Path(path)


def _remote_tensor_tables(
    resolution: HubResolution, wanted: list[HubFile], *, node: str
) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    import huggingface_hub

    uri = resolution.pinned_uri
    try:
        metadata = huggingface_hub.HfApi().get_safetensors_metadata(
            resolution.repo_id, revision=resolution.commit
        )
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one user-facing line
        raise SourceError(
            f"{uri}: cannot read safetensors headers from the hub ({_scrub(f'{error.__class__.__name__}: {error}')})",
            node=node,
            hint=_download_hint(resolution.repo_id, resolution.commit),
        ) from None
    tables = {}
    for weight in wanted:
        file_meta = metadata.files_metadata.get(weight.path)
        if file_meta is None:
            raise SourceError(f"{uri}: the hub returned no header for {weight.path}", node=node)
        # The hub parsed the header; check it as strictly as a local file's before use.
        entries = {
            name: {"dtype": info.dtype, "shape": _as_list(info.shape),
                   "data_offsets": _as_list(info.data_offsets)}
            for name, info in file_meta.tensors.items()
        }
        check_tensor_entries(
            entries, Path(weight.path), max_data_bytes=max(weight.size - 8, 0), node=node
        )
        tables[weight.path] = {
            name: (entry["dtype"], tuple(entry["shape"])) for name, entry in entries.items()
        }
    return tables


def _as_list(value: Any) -> Any:
    """huggingface_hub gives tuples where the header has JSON arrays; anything else stays."""
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- fetch


def fetch(
    resolution: HubResolution,
    *,
    node: str,
    progress: Callable[[str, int, int], None] | None = None,
    offline: bool | None = None,
) -> Path:
    """Download the resolution's files at exactly its commit into the standard HF cache.

    Files already cached are not downloaded again, and huggingface_hub resumes partial
    downloads. Each file's size and blob name are then checked against the resolution.

    Args:
        progress: called as ``progress(label, done, total)`` while downloading; labels are
            huggingface_hub's bar descriptions prefixed with the repo id, and a total may
            grow as files start.

    Returns:
        The snapshot directory (``.../models--org--name/snapshots/<commit>``).
    """
    snapshot = snapshot_dir(resolution)
    uri = resolution.pinned_uri
    absent = [f.path for f in resolution.files if not (snapshot / f.path).is_file()]
    if absent:
        if offline is None:
            offline = is_offline()
        if offline:
            raise SourceError(
                f"{uri} is not in the local Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE=1); "
                f"missing {', '.join(absent[:3])}",
                node=node,
                hint=_download_hint(resolution.repo_id, resolution.commit),
            )
        import huggingface_hub

        try:
            huggingface_hub.snapshot_download(
                resolution.repo_id,
                revision=resolution.commit,
                cache_dir=str(hub_cache_dir()),
                allow_patterns=[f.path for f in resolution.files],
                tqdm_class=_progress_bar_class(progress, resolution.repo_id) if progress else None,
            )
        except Exception as error:  # noqa: BLE001 - any hub failure becomes one user-facing line
            raise SourceError(
                f"{uri}: download failed ({_scrub(f'{error.__class__.__name__}: {error}')})",
                node=node,
                hint="run make again to resume the download",
            ) from None
    verify_snapshot(resolution, node=node)
    return snapshot


def verify_snapshot(resolution: HubResolution, *, node: str) -> None:
    """Check every needed file is cached with the resolved size and blob name (no hashing)."""
    snapshot = snapshot_dir(resolution)
    uri = resolution.pinned_uri
    hint = f"delete {repo_cache_dir(hub_cache_dir(), resolution.repo_id)} (or `hf cache delete`) and fetch again"
    for expected in resolution.files:
        link = snapshot / expected.path
        if not link.is_file():
            raise SourceError(
                f"{uri}: {expected.path} is missing after download", node=node, hint=hint
            )
        size = link.stat().st_size
        if size != expected.size:
            raise SourceError(
                f"{uri}: {expected.path} is {size} bytes in the cache, the hub says {expected.size}",
                node=node,
                hint=hint,
            )
        if not link.is_symlink():
            continue
        blob = Path(os.path.realpath(link)).name
        if expected.sha256 and _SHA256_RE.fullmatch(blob) and blob != expected.sha256:
            raise SourceError(
                f"{uri}: cached {expected.path} has sha256 {blob[:12]}…, the hub says {expected.sha256[:12]}…",
                node=node,
                hint=hint,
            )
        if expected.blob_id and _COMMIT_RE.fullmatch(blob) and blob != expected.blob_id:
            raise SourceError(
                f"{uri}: cached {expected.path} has git oid {blob[:12]}…, the hub says {expected.blob_id[:12]}…",
                node=node,
                hint=hint,
            )


def _progress_bar_class(progress: Callable[[str, int, int], None], repo_id: str) -> type:
    """A tqdm class that draws nothing and forwards every update to ``progress``."""
    from tqdm.auto import tqdm

    class _CallbackBar(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            self._label = f"{repo_id}: {kwargs.get('desc') or 'download'}"
            self._done = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            self._label = f"{repo_id}: {desc or 'download'}"

        set_description_str = set_description

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            self.n = self._done  # huggingface_hub reads .n to grow totals
            progress(self._label, self._done, int(self.total or 0))
            return None

    return _CallbackBar
