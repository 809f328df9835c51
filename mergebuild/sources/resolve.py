"""Resolve source nodes to content digests (local dirs via the stat cache, demo models, hub)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from mergebuild import faults
from mergebuild.errors import SourceError
from mergebuild.io.hashing import canonical_json, manifest_digest
from mergebuild.io.hf_layout import (
    CONFIG_FILES,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
)
from mergebuild.io.json_limits import CONFIG_MAX_BYTES, TOKENIZER_MAX_BYTES
from mergebuild.sources.pickle import load_pickle_state_dict
from mergebuild.spec.model import SourceSpec
from mergebuild.store.objects import Store

# demo://NAME models are the trained skill family (sources/skills.py): small Llama models with
# real, measurable skills, so an example's evals mean something.
DEMO_MODELS = ("base", "instruct", "chat", "code", "math")


@dataclass(frozen=True)
class ResolvedSource:
    """A source node with its identity; ``directory`` is None until fetched/generated."""

    name: str
    kind: str  # "local" | "demo" | "hub"
    uri: str
    digest: str
    directory: Path | None
    files: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    commit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def model_files(directory: Path) -> list[Path]:
    """The files of a model directory that define it: weights, index, config, tokenizer."""
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix == ".safetensors"]
    for name in (SAFETENSORS_INDEX, *CONFIG_FILES, *TOKENIZER_FILES):
        p = directory / name
        if p.is_file():
            files.append(p)
    return sorted(files)


def check_model_directory(directory: Path, node: str, allow_pickle: bool = False) -> None:
    """Fail with a one-line SourceError if ``directory`` cannot be a merge input."""
    if not directory.exists():
        raise SourceError(f"source directory {directory} does not exist", node=node,
                          hint="fix the path in the Mergefile or create the model there")
    if not directory.is_dir():
        raise SourceError(f"source {directory} is not a directory", node=node,
                          hint="point 'source:' at a Hugging Face model directory")
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        check_side_files(directory, node)
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if allow_pickle:
            raise SourceError(
                f"{directory} holds only pickle weights; loading them is not supported yet",
                node=node, hint="convert them to safetensors first",
            )
        raise SourceError(
            f"{directory} holds only pickle weights (.bin/.pt), which can run code when loaded",
            node=node, hint="convert them to safetensors (e.g. with the safetensors convert tool)",
        )
    raise SourceError(f"no weights (*.safetensors) in {directory}", node=node,
                      hint="point 'source:' at a Hugging Face model directory")


def check_side_files(directory: Path, node: str) -> None:
    """A model directory needs its config.json (a merge of it would not load without one),
    and its config and tokenizer files must be of a size a model's are."""
    config = directory / "config.json"
    if not config.is_file():
        raise SourceError(f"no config.json in {directory}: a merge of it would not load",
                          node=node, hint="copy the model's config.json beside its weights")
    for name in (*CONFIG_FILES, *TOKENIZER_FILES):
        path = directory / name
        limit = CONFIG_MAX_BYTES if name in CONFIG_FILES else TOKENIZER_MAX_BYTES
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size > limit:
            raise SourceError(f"{name} in {directory} is {size} bytes, over its {limit}-byte "
                              "limit", node=node, hint="is it really the model's own file?")


def resolve_local(spec: SourceSpec, store: Store) -> ResolvedSource:
    directory = Path(spec.uri)
    check_model_directory(directory, spec.name, spec.allow_pickle)
    files: dict[str, str] = {}
    for path in model_files(directory):
        try:
            files[path.name] = store.stat_cache.digest(path)
            faults.point("sources.digest")
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}", node=spec.name) from None
    return ResolvedSource(
        name=spec.name, kind="local", uri=directory.as_uri(), digest=manifest_digest(files, "xxh128"),
        directory=directory, files=files,
    )


def _demo_identity(name: str) -> str:
    # The generator's own source (and, for a model, its shipped weights) is the demo's
    # identity: change either, and every demo-derived build becomes stale, without
    # generating anything to plan.
    if name in DEMO_MODELS:
        from mergebuild.sources.skills import WEIGHTS_DIR

        generator = (Path(__file__).parent / "skills.py").read_bytes()
        weights = xxhash.xxh3_128_hexdigest((WEIGHTS_DIR / f"{name}.safetensors").read_bytes())
        text = canonical_json({"skills": name, "generator": xxhash.xxh3_128_hexdigest(generator),
                               "weights": weights})
    else:
        source = (Path(__file__).parent / "demo.py").read_bytes()
        text = canonical_json({"demo": name, "generator": xxhash.xxh3_128_hexdigest(source)})
    return "xxh128:" + xxhash.xxh3_128_hexdigest(text.encode())


def resolve_demo(spec: SourceSpec, store: Store) -> ResolvedSource:
    name = spec.uri[len("demo://"):].strip("/")
    if name not in DEMO_MODELS:
        from mergebuild.sources.demo import DEMO_ADAPTERS

        if name in DEMO_ADAPTERS:
            raise SourceError(f"demo://{name} is a LoRA adapter, not a model", node=spec.name,
                              hint=f"apply it after '+', e.g. base+demo://{name}")
        raise SourceError(f"unknown demo model '{name}'", node=spec.name,
                          hint=f"demo models: {', '.join(DEMO_MODELS)}")
    return _demo_source(spec.name, spec.uri, name, store)


def _demo_source(node: str, uri: str, name: str, store: Store) -> ResolvedSource:
    """A demo model or adapter: identity from the generator, directory under store/demo/."""
    digest = _demo_identity(name)
    root = store.demo / digest.split(":", 1)[1][:16]
    return ResolvedSource(name=node, kind="demo", uri=uri, digest=digest,
                          directory=root / name, extra={"demo_root": str(root)})


def resolve_demo_adapter(uri: str, name: str, store: Store) -> ResolvedSource:
    """A demo LoRA (``demo://style-lora``): identified, like demo models, by the generator."""
    from mergebuild.sources.demo import DEMO_ADAPTERS

    adapter = uri[len("demo://"):].strip("/")
    if adapter not in DEMO_ADAPTERS:
        raise SourceError(f"unknown demo adapter '{adapter}'", node=name,
                          hint=f"demo adapters: {', '.join(DEMO_ADAPTERS)}")
    return _demo_source(name, uri, adapter, store)


def live_demo_dirs(store: Store) -> set[str]:
    """The names of the directories under ``store/demo/`` the current demo generator writes
    (every other one there is from an older generator); empty when the store has none."""
    if not store.demo.is_dir():
        return set()
    from mergebuild.sources.demo import DEMO_ADAPTERS

    return {Path(_demo_source(n, f"demo://{n}", n, store).extra["demo_root"]).name
            for n in (*DEMO_MODELS, *DEMO_ADAPTERS)}


def materialize_demo(source: ResolvedSource) -> Path:
    """Write the demo model (from the shipped weights) or adapter on first use (milliseconds)."""
    from mergebuild.sources.demo import generate_demo_adapters
    from mergebuild.sources.skills import generate_skill_models

    assert source.directory is not None
    root = Path(source.extra["demo_root"])
    if source.directory.name in DEMO_MODELS:
        generate_skill_models(root, (source.directory.name,))
    else:
        generate_demo_adapters(root)
    return source.directory


def resolve_hub_source(spec: SourceSpec, store: Store, *, locked: Any = None,
                       frozen: bool = False, lock_name: str = "Mergefile.lock"
                       ) -> ResolvedSource:
    """Pin a hub source to a commit: from the hub (or the HF cache offline), or from the lock.

    With ``frozen`` the lock entry (a ``hub.HubResolution`` made for the same URI) is the
    resolution and the hub is not asked; a source missing from the lock is an error.
    """
    from mergebuild.sources.hub import parse_hub_uri, resolve

    repo_id, revision = parse_hub_uri(spec.uri, node=spec.name)
    if frozen:
        if locked is None:
            raise SourceError(f"{spec.uri} is not locked in {lock_name} (--frozen)",
                              node=spec.name,
                              hint="run 'mergebuild make' without --frozen once to lock it")
        if locked.is_pickle and not spec.allow_pickle:
            raise SourceError(f"{locked.pinned_uri} offers only pickle weights (.bin/.pt), "
                              "which can run code when loaded", node=spec.name,
                              hint="set `allow_pickle: true` on the source to load them "
                                   "with torch.load(weights_only=True)")
        resolution = locked
    else:
        resolution = resolve(repo_id, revision, node=spec.name, allow_pickle=spec.allow_pickle)
    files = {f.path: (f"sha256:{f.sha256}" if f.sha256 else f"git:{f.blob_id}")
             for f in resolution.files}
    return ResolvedSource(
        name=spec.name, kind="hub", uri=f"hf://{repo_id}", digest=resolution.digest,
        directory=None, files=files, revision=revision, commit=resolution.commit,
        extra={"resolution": resolution},
    )


def resolve_source(spec: SourceSpec, store: Store, *, locked: Any = None, frozen: bool = False,
                   lock_name: str = "Mergefile.lock", adapter_locked: Any = None
                   ) -> ResolvedSource:
    """A source's identity, without reading weight bytes whenever the stat cache allows.

    ``locked`` / ``frozen`` / ``lock_name`` concern hub sources only (see resolve_hub_source);
    ``adapter_locked`` is the lock entry of a hub-hosted LoRA adapter (``model+hf://…``).
    """
    if spec.adapter is not None:
        return _resolve_adapted(spec, store, adapter_locked, locked=locked, frozen=frozen,
                                lock_name=lock_name)
    if spec.kind == "local":
        return resolve_local(spec, store)
    if spec.kind == "demo":
        return resolve_demo(spec, store)
    return resolve_hub_source(spec, store, locked=locked, frozen=frozen, lock_name=lock_name)


def resolve_adapter(uri: str, name: str, store: Store, *, locked: Any = None,
                    frozen: bool = False, lock_name: str = "Mergefile.lock") -> ResolvedSource:
    """A LoRA adapter's identity: a local directory through the stat cache, or a hub repo
    pinned to a commit (``locked`` / ``frozen`` as for hub sources). ``name`` is the node
    errors name (the ``model+lora`` reference)."""
    from mergebuild.io.lora import ADAPTER_FILES, check_adapter_directory

    if uri.startswith("hf://"):
        return resolve_hub_source(SourceSpec(name=name, uri=uri, line=0), store, locked=locked,
                                  frozen=frozen, lock_name=lock_name)
    if uri.startswith("demo://"):
        return resolve_demo_adapter(uri, name, store)
    directory = Path(uri)
    check_adapter_directory(directory, name)
    files = {}
    for file in ADAPTER_FILES:
        try:
            files[file] = store.stat_cache.digest(directory / file)
        except OSError as exc:
            raise SourceError(f"cannot read {directory / file}: {exc.strerror}",
                              node=name) from None
    return ResolvedSource(name=name, kind="local", uri=directory.as_uri(),
                          digest=manifest_digest(files, "xxh128"), directory=directory,
                          files=files)


def adapted_digest(model_digest: str, adapter_digest: str) -> str:
    """The identity of a model read through a LoRA: its digest combined with the adapter's."""
    identity = canonical_json({"model": model_digest, "lora": adapter_digest})
    return "xxh128:" + xxhash.xxh3_128_hexdigest(identity.encode())


def _resolve_adapted(spec: SourceSpec, store: Store, adapter_locked: Any, **lock: Any
                     ) -> ResolvedSource:
    """``model+lora``: identity = the model's digest + the adapter's digest."""
    from dataclasses import replace

    model = resolve_source(replace(spec, adapter=None), store, **lock)
    assert spec.adapter is not None
    resolved = resolve_adapter(spec.adapter, spec.name, store, locked=adapter_locked,
                               frozen=lock["frozen"], lock_name=lock["lock_name"])
    adapter = resolved if resolved.kind in ("hub", "demo") else None
    files = {**model.files, **{f"adapter/{k}": v for k, v in resolved.files.items()}}
    return ResolvedSource(
        name=spec.name, kind=model.kind, uri=f"{model.uri}+{spec.adapter}",
        digest=adapted_digest(model.digest, resolved.digest),
        directory=model.directory, files=files, revision=model.revision, commit=model.commit,
        extra={**model.extra, "model": model, "adapter": adapter, "adapter_uri": spec.adapter},
    )


def adapter_directory(source: ResolvedSource) -> Path | None:
    """The local directory of a ``model+lora`` source's adapter (fetched if on the hub)."""
    uri = source.extra.get("adapter_uri")
    if uri is None:
        return None
    adapter = source.extra.get("adapter")
    return Path(uri) if adapter is None else fetch_adapter(adapter)


def fetch_adapter(adapter: ResolvedSource) -> Path:
    """The local directory of a resolved adapter; a hub adapter is fetched (HF cache), a demo
    adapter generated on first use."""
    if adapter.kind == "demo":
        materialize_demo(adapter)
    if adapter.kind != "hub":
        assert adapter.directory is not None
        return adapter.directory
    from mergebuild.sources.hub import fetch

    return fetch(adapter.extra["resolution"], node=adapter.name)


def materialize(source: ResolvedSource, store: Store | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The local directory holding the source's files, generating or fetching it if needed.

    Hub files are fetched into the standard Hugging Face cache (``progress(label, done,
    total)`` while downloading). Pickle weights a source opted into are converted once,
    loaded with ``weights_only=True``, into safetensors under the store.
    """
    if "adapter_uri" in source.extra:  # model+lora: the model's files; the adapter apart
        return materialize(source.extra["model"], store, progress)
    if source.kind == "local":
        assert source.directory is not None
        return source.directory
    if source.kind == "demo":
        return materialize_demo(source)
    from mergebuild.sources.hub import fetch

    resolution = source.extra["resolution"]
    snapshot = fetch(resolution, node=source.name, progress=progress)
    if not resolution.is_pickle:
        return snapshot
    if store is None:
        raise SourceError("pickle weights need a store to be converted into", node=source.name)
    return convert_pickle_snapshot(snapshot, store.root / "converted" /
                                   source.digest.split(":", 1)[-1][:32], node=source.name)


def convert_pickle_snapshot(snapshot: Path, out: Path, *, node: str) -> Path:
    """Write the pickle checkpoint of ``snapshot`` as safetensors (once) beside its side files."""
    if (out / "model.safetensors").is_file():
        return out
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    state: dict[str, Any] = {}
    for path in sorted(snapshot.iterdir()):
        if not path.name.endswith(PICKLE_SUFFIXES) or path.name == "training_args.bin":
            continue
        state.update(load_pickle_state_dict(path, node=node))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "converted_from": "pickle"})
        for path in snapshot.iterdir():
            if path.name in CONFIG_FILES or path.name in TOKENIZER_FILES:
                shutil.copyfile(path, tmp / path.name)
        (tmp / ".mergebuild-converted.json").write_text(json.dumps({"from": str(snapshot)}))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise
    return out
