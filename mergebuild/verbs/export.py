"""Ship a built model: copy it out of the store as a plain directory, or push it to the Hub.

Both verify the bytes against ``provenance.json`` first: a release never carries a build
that is not exactly the one that was recorded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import MergebuildError, StoreError
from mergebuild.provenance.integrity import verify_directory
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import read_statement, short_digest, statement_digest


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    files: int
    bytes: int


def export_build(build: Path, dest: Path, *, force: bool = False,
                 node: str | None = None) -> ExportResult:
    """Copy a built model directory (weights, config, tokenizer, card, provenance) to ``dest``.

    The copy is made in a temporary sibling of ``dest``, verified against the provenance,
    and renamed into place; its files are ordinary writable files.

    Raises:
        MergebuildError: ``dest`` is a file, or a non-empty directory without ``force``.
        StoreError: the build does not match its provenance.
    """
    build, dest = Path(build), Path(dest).absolute()
    read_statement(build)  # a mergebuild build, not any directory
    if dest.exists() and not dest.is_dir():
        raise MergebuildError(f"{dest} exists and is not a directory", node=node,
                              hint="pick another destination")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise MergebuildError(f"{dest} is not empty", node=node,
                              hint="pass --force to replace it, or pick an empty directory")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    except OSError as exc:
        raise StoreError(f"cannot write beside {dest}: {exc.strerror or exc}", node=node) from None
    try:
        files, size = _copy_tree(build, staging)
        problems = verify_directory(staging)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"the build does not match its provenance: {problems[0]}{more}",
                             node=node, hint="run 'mergebuild verify'; make rebuilds a "
                             "corrupt store object")
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
               revision: str | None = None, node: str | None = None) -> str:
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
    api = HfApi()
    digest = short_digest(statement_digest(statement))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(build), revision=revision,
            commit_message=f"mergebuild: {node or build.name} ({digest})",
            ignore_patterns=[".*"],
        )
    except (OSError, ValueError) as exc:
        lines = scrub_text(str(exc)).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        raise MergebuildError(f"cannot push to {repo_id}: {first}",
                              node=node, hint="check the repo id and your Hugging Face login "
                              "(hf auth login or HF_TOKEN)") from None
    return str(getattr(commit, "commit_url", None) or commit)
