"""Ship a built model: copy it out of the store as a directory or one GGUF file, or push it.

Both verify the bytes against ``provenance.json`` first: a release never carries a build
that is not exactly the one that was recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.errors import MergebuildError, StoreError
from mergebuild.provenance.integrity import verify_directory
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import (
    CARD_ATTESTATION_FILE,
    CARD_FILE,
    read_statement,
    short_digest,
    statement_digest,
)

if TYPE_CHECKING:
    from mergebuild.verbs.card import PresentedCard


EXPORT_MARKER = ".mergebuild-export"  # written into every export: --force may replace it


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    files: int
    bytes: int


@dataclass(frozen=True)
class Protected:
    """Directories an export must never replace or write into, each with why.

    ``store``: the store (nothing inside it either); ``roots``: directories that must not
    be replaced, nor any directory above them (the Mergefile's, each local source's, the
    current directory).
    """

    store: Path | None = None
    roots: Sequence[tuple[Path, str]] = ()


def check_destination(dest: Path, *, force: bool, protected: Protected,
                      node: str | None = None) -> None:
    """Refuse a destination ``export`` must not write: inside or above the store, the
    current directory or one above it, a directory holding a Mergefile or a source (or
    above one), and a non-empty directory that no export wrote (even with ``force``).

    Raises:
        MergebuildError: one line naming the destination and why; nothing was touched.
    """
    real = Path(os.path.realpath(dest))

    def refuse(why: str) -> MergebuildError:
        return MergebuildError(f"refusing to export to {dest}: {why}", node=node,
                               hint="pick a new or empty directory, or one a previous "
                               "export wrote")

    if protected.store is not None:
        store = Path(os.path.realpath(protected.store))
        if real == store or real.is_relative_to(store):
            raise refuse(f"it is {'' if real == store else 'inside '}the store {store}")
        if store.is_relative_to(real):
            raise refuse(f"it holds the store {store}")
    roots = [*protected.roots, (Path.cwd(), "the current directory")]
    for root, what in roots:
        root = Path(os.path.realpath(root))
        if root.is_relative_to(real):
            raise refuse(f"it {'is' if root == real else 'holds'} {what}")
    if real.is_dir():
        if (real / "Mergefile").exists():
            raise refuse("it holds a Mergefile")
        if any(real.iterdir()):
            if not force:
                raise MergebuildError(f"{dest} is not empty", node=node,
                                      hint="pass --force to replace an earlier export, or "
                                      "pick an empty directory")
            if not (real / EXPORT_MARKER).is_file():
                raise refuse(f"it is not empty and no export wrote it (no {EXPORT_MARKER})")


def check_published(statement: dict, published_digest: str | None, node: str | None,
                    doing: str) -> None:
    """A store object ships only as the store published it: its statement must state the
    digest recorded at publish (a consistent rewrite of weights and provenance is caught)."""
    stated = statement_digest(statement)
    if published_digest is None or stated != published_digest:
        what = ("the store holds no record of publishing it" if published_digest is None else
                f"its provenance states {short_digest(stated)}, the store published "
                f"{short_digest(published_digest)}")
        raise StoreError(f"refusing to {doing}: the build is not what the store published "
                         f"({what})", node=node,
                         hint="make rebuilds a corrupt store object")


def export_build(build: Path, dest: Path, *, force: bool = False,
                 node: str | None = None, card: PresentedCard | None = None,
                 protected: Protected = Protected(), published_digest: str | None = None,
                 in_store: bool = False, sign_key: Any = None,
                 attached: tuple[Path, ...] = ()) -> ExportResult:
    """Copy a built model directory (weights, config, tokenizer, card, provenance) to ``dest``.

    The copy is made in a temporary sibling of ``dest``, verified against the provenance,
    and renamed into place; its files are ordinary writable files. A ``card`` presented with
    the build (the Mergefile's ``card:`` applied) replaces its own ``README.md``, with the
    ``card.json`` that binds it to the build. ``attached`` files kept beside the build (the
    attestation of evals run after it) are copied in too.

    Raises:
        MergebuildError: ``dest`` is a file, or a non-empty directory without ``force``.
        StoreError: the build does not match its provenance.
    """
    build, dest = Path(build), Path(dest).absolute()
    statement = read_statement(build)  # a mergebuild build, not any directory
    if in_store:
        check_published(statement, published_digest, node, "export")

    def fill(staging: Path) -> tuple[int, int]:
        files, size = _copy_tree(build, staging)
        if card is not None and card.attestation is not None:
            size -= (staging / CARD_FILE).stat().st_size
            for name in (CARD_FILE, CARD_ATTESTATION_FILE):
                shutil.copyfile(card.path.parent / name, staging / name)
                os.chmod(staging / name, 0o644)
                size += (staging / name).stat().st_size
            files += 1
        for path in attached:
            shutil.copyfile(path, staging / path.name)
            files, size = files + 1, size + path.stat().st_size
        return files, size

    return _export(dest, force, node, fill, protected=protected, statement=statement,
                   source=build, sign_key=sign_key)


def export_gguf_build(build: Path, dest: Path, *, quant: str = "f16", force: bool = False,
                      node: str | None = None, card: str | None = None,
                      protected: Protected = Protected(), published_digest: str | None = None,
                      in_store: bool = False, sign_key: Any = None) -> ExportResult:
    """Convert a verified build into one GGUF file for llama.cpp/Ollama, in ``dest``.

    ``dest`` receives ``<node>-<quant>.gguf``, a model card, and a ``provenance.json`` whose
    subject is the GGUF (its sha256) and whose one dependency is the source build (its
    content digest, its own statement embedded): ``mergebuild verify DEST`` re-hashes the
    GGUF and checks that chain, and ``mergebuild lineage DEST`` shows the whole tree.

    Raises:
        MergebuildError: ``dest`` is a file, or a non-empty directory without ``force``.
        StoreError: the build does not match its provenance.
        SourceError: the architecture or tokenizer cannot be converted (one line naming it).
    """
    build, dest = Path(build), Path(dest).absolute()
    statement = read_statement(build)
    problems = verify_directory(build)
    if problems:
        raise StoreError(f"the build does not match its provenance: {problems[0]}", node=node,
                         hint="run 'mergebuild verify'; make rebuilds a corrupt store object")
    if in_store:
        check_published(statement, published_digest, node, "export")
    name = node or str(statement["predicate"]["buildDefinition"]["externalParameters"]
                       .get("node") or build.name)

    def fill(staging: Path) -> tuple[int, int]:
        from mergebuild.io.gguf import export_gguf
        from mergebuild.provenance.export_statement import write_gguf_provenance

        result = export_gguf(build, staging / f"{name}-{quant}.gguf", quant,  # type: ignore[arg-type]
                             node=node, name=name)
        write_gguf_provenance(staging, statement, result.record(), node=name,
                              build_card=card if card is not None else _read_card(build))
        files = [p for p in staging.iterdir() if p.is_file()]
        for path in files:
            os.chmod(path, 0o644)
        return len(files), sum(p.stat().st_size for p in files)

    return _export(dest, force, node, fill, protected=protected, statement=statement,
                   source=build, sign_key=sign_key)


def _read_card(build: Path) -> str | None:
    try:
        return (build / CARD_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _export(dest: Path, force: bool, node: str | None,
            fill: Callable[[Path], tuple[int, int]], *, protected: Protected,
            statement: dict, source: Path, sign_key: Any = None) -> ExportResult:
    """The export guard and the atomic publish shared by every format: ``fill`` writes the
    export into a staging sibling of ``dest``, which is verified, marked as an export
    (``--force`` may replace only such a directory), optionally signed, and renamed into
    place."""
    if dest.exists() and not dest.is_dir():
        raise MergebuildError(f"{dest} exists and is not a directory", node=node,
                              hint="pick another destination")
    check_destination(dest, force=force, protected=protected, node=node)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    except OSError as exc:
        raise StoreError(f"cannot write beside {dest}: {exc.strerror or exc}", node=node) from None
    try:
        files, size = fill(staging)
        problems = verify_directory(staging)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"the build does not match its provenance: {problems[0]}{more}",
                             node=node, hint="run 'mergebuild verify'; make rebuilds a "
                             "corrupt store object")
        marker = {"node": node, "digest": statement_digest(statement),
                  "from": str(source), "files": files}
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if sign_key is not None:
            from mergebuild.provenance.signing import sign_directory

            sign_directory(staging, sign_key)
            files += 1
        os.chmod(staging, 0o755)
        _replace_dir(staging, dest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(f"cannot export to {dest}: {exc.strerror or exc}", node=node) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(directory=dest, files=files, bytes=size)


def _copy_tree(src: Path, dst: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(exist_ok=True)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            target = dst / rel / name
            shutil.copyfile(Path(dirpath) / name, target)  # contents only: writable copy
            os.chmod(target, 0o644)
            files += 1
            size += target.stat().st_size
    return files, size


def _replace_dir(staging: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(staging, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(old / dest.name, dest)  # put the old one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def push_build(build: Path, repo_id: str, *, private: bool = False,
               revision: str | None = None, node: str | None = None,
               card: PresentedCard | None = None, published_digest: str | None = None,
               in_store: bool = False, sign_key: Any = None,
               attached: tuple[Path, ...] = ()) -> str:
    """Verify a built model and upload it to the Hugging Face Hub as ``repo_id``.

    Creates the repo (and the ``revision`` branch) when missing. The token comes from
    ``huggingface_hub``'s usual places (``HF_TOKEN``, ``hf auth login``) and is never
    printed.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    build = Path(build)
    statement = read_statement(build)
    problems = verify_directory(build)
    if problems:
        raise StoreError(f"refusing to push: the build does not match its provenance: "
                         f"{problems[0]}", node=node, hint="run 'mergebuild verify'")
    if in_store:
        check_published(statement, published_digest, node, "push")
    api = HfApi()
    digest = short_digest(statement_digest(statement))
    with tempfile.TemporaryDirectory(prefix=".push-") as folder:
        if sign_key is not None or attached:  # push a (signed) copy with what travels along
            upload = Path(folder) / "model"
            export_build(build, upload, node=node, card=card, sign_key=sign_key,
                         attached=attached)
        else:
            upload = _with_card(build, card, Path(folder))
        return _upload(api, upload, repo_id, private=private, revision=revision,
                       message=f"mergebuild: {node or build.name} ({digest})", node=node)


def _with_card(build: Path, card: PresentedCard | None, folder: Path) -> Path:
    """``build`` itself, or, with a presented card, a folder of links to its files with the
    card and its ``card.json`` in place of its own README (nothing is copied)."""
    if card is None or card.attestation is None:
        return build
    for path in build.rglob("*"):
        rel = path.relative_to(build)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts) \
                and rel.as_posix() != CARD_FILE:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), folder / rel)
    for name in (CARD_FILE, CARD_ATTESTATION_FILE):
        os.symlink(card.path.parent.resolve() / name, folder / name)
    return folder


def _upload(api: Any, folder: Path, repo_id: str, *, private: bool, revision: str | None,
            message: str, node: str | None) -> str:
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), revision=revision,
            commit_message=message, ignore_patterns=[".*"],
        )
    except (OSError, ValueError, *_network_errors()) as exc:
        lines = scrub_text(str(exc)).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        raise MergebuildError(f"cannot push to {repo_id}: {first}",
                              node=node, hint="check the repo id and your Hugging Face login "
                              "(hf auth login or HF_TOKEN)") from None
    return str(getattr(commit, "commit_url", None) or commit)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the network is down or the Hub refuses: its HTTP
    client's transport and timeout errors (httpx or httpx2, requests in older releases)
    derive from neither OSError nor ValueError."""
    errors: list[type[BaseException]] = []
    for module, names in (("httpx", ("TransportError", "HTTPError")),
                          ("httpx2", ("TransportError", "HTTPError")),
                          ("requests", ("RequestException",)),
                          ("huggingface_hub.errors", ("HfHubHTTPError", "OfflineModeIsEnabled"))):
        try:
            loaded = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(errors)
