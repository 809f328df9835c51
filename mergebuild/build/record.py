"""The BuildRecord a build's provenance is written from: its parents, the spec as the user
wrote it, the Mergefile excerpt that rebuilds it, and the builder's versions."""

from __future__ import annotations

import hashlib
import platform
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergebuild import ENGINE_VERSION, __version__
from mergebuild.build.job import adapted_model_dir
from mergebuild.methods.registry import Method
from mergebuild.plan.lockfile import adapter_entry
from mergebuild.plan.recipe import global_parameters, parent_parameters
from mergebuild.plan.staleness import NodeState
from mergebuild.provenance.secrets import portable_uri
from mergebuild.spec.graph import Dag, build_order
from mergebuild.spec.model import (
    AdaptedSpec,
    Mergefile,
    MergeSpec,
    SearchSpec,
    SourceSpec,
    SweepSpec,
)

if TYPE_CHECKING:
    from mergebuild.build.engine import BuildOutput
    from mergebuild.provenance.statement import BuildRecord


def build_record(mergefile: Mergefile, graph: Dag, spec: MergeSpec, method: Method,
                 states: dict[str, NodeState], key: str, recipe: dict[str, Any],
                 output: BuildOutput, started: str) -> BuildRecord:
    """What ``spec``'s provenance records of the build that produced ``output``."""
    import safetensors
    import torch

    from mergebuild.provenance.statement import BuildRecord, ParentRef, read_statement

    roles: dict[str, str] = {}
    if spec.base:
        roles[spec.base] = "base"
    for ref in spec.parent_refs():
        roles.setdefault(ref, "slice" if spec.slices is not None else "model")
    parents = []
    for ref in spec.parent_refs():
        p = states[ref]
        if p.kind == "source":
            src = p.source
            assert src is not None
            parents.append(ParentRef(
                name=ref, role=roles[ref], kind="hub" if src.kind == "hub" else "local",
                uri=portable_uri(src.uri, mergefile.directory), digest=src.digest, revision=src.revision, commit=src.commit,
                files=dict(src.files),
            ))
        elif p.kind == "adapted":  # the merge as built, and the LoRA read over it
            node = mergefile.nodes[ref]
            assert isinstance(node, AdaptedSpec) and p.adapter is not None
            model, entry = states[node.model], adapter_entry(ref)
            parents.append(ParentRef(
                name=node.model, role=roles[ref], kind="node",
                uri=f"mergebuild:node/{node.model}", digest=model.digest or "",
                statement=read_statement(adapted_model_dir(mergefile, ref, states)),
                method=model.method, adapter=entry,
            ))
            parents.append(ParentRef(
                name=entry, role="adapter", kind="lora",
                uri=portable_uri(p.adapter.uri, mergefile.directory),
                digest=p.adapter.digest, revision=p.adapter.revision,
                commit=p.adapter.commit, files=dict(p.adapter.files),
                applies_to=node.model, adapted_digest=p.digest,
            ))
        else:
            assert p.path is not None
            # A sweep is the variant its select: chose; the record says which, and why.
            selection = p.selection.as_json() if p.selection is not None else None
            if selection is not None and p.study is not None:  # a search: its whole study
                selection["study"] = p.study.as_json()
            built_by = (states[p.selection.winner].method if p.selection is not None
                        else p.method)
            parents.append(ParentRef(
                name=ref, role=roles[ref], kind="node", uri=f"mergebuild:node/{ref}",
                digest=p.digest or "", statement=read_statement(p.path), method=built_by,
                selection=selection,
            ))
    return BuildRecord(
        node=spec.name, key=key, digest=output.digest, method=method.name, recipe=recipe,
        spec=user_spec(mergefile, spec, method), mergefile_digest=mergefile_digest(mergefile),
        mergefile_excerpt=excerpt(mergefile, graph, spec.name, selected_variants(states)),
        parents=tuple(parents),
        outputs=output.files,
        builder={"mergebuild": __version__, "torch": torch.__version__,
                 "safetensors": safetensors.__version__,
                 "python": platform.python_version()},
        device=output.device, engine_version=ENGINE_VERSION, started=started,
        finished=utc_now(), invocation_id=secrets.token_hex(8),
        # With the excerpt: a variant is written there under its sweep's name.
        rebuild_command=(f"mergebuild -f {mergefile.path.name} make "
                         f"{group_of(mergefile, spec.name) or spec.name}"),
    )


def user_spec(mergefile: Mergefile, spec: MergeSpec, method: Method) -> dict[str, Any]:
    """The node as a mergekit-style config: method, parents and their parameters."""
    out: dict[str, Any] = {"merge_method": method.name,
                           "parameters": global_parameters(method, spec)}
    if spec.base:
        out["base_model"] = spec.base
    if spec.slices is not None:
        out["slices"] = [{"sources": [
            {"model": s.ref, "layer_range": list(s.layer_range),
             "parameters": parent_parameters(method, spec, s.parameters)}
            for s in sl.sources]} for sl in spec.slices]
    else:
        out["models"] = [{"model": p.ref,
                          "parameters": parent_parameters(method, spec, p.parameters)}
                         for p in spec.models]
    for key, value in (("dtype", spec.dtype or mergefile.defaults.dtype),
                       ("tokenizer_source", spec.tokenizer_source),
                       ("chat_template", spec.chat_template)):
        if value is not None:
            out[key] = value
    return out


def mergefile_digest(mergefile: Mergefile) -> str:
    return "sha256:" + hashlib.sha256(mergefile.text.encode()).hexdigest()


def excerpt(mergefile: Mergefile, graph: Dag, node: str,
            selected: Mapping[str, str] | None = None) -> str:
    """The YAML of ``node`` and its ancestors, with the ``defaults:`` they are built with:
    enough to rebuild it, to the same digest, in an empty directory.

    A sweep's variant (a search's trial) is written as the merge it is — its values set, no
    ``sweep:``/``search:``/``select:`` — under the sweep's name, which its children name
    (``blend[t=0.35]`` is not a name a Mergefile can hold): ``node`` itself when it is one,
    and for each sweep it builds on, the variant ``selected`` maps it to; the other variants
    are left out. Evals and checks judge a build and do not make it: they are left out too.
    """
    chosen = {variant: group for group, variant in (selected or {}).items()}
    if (group := group_of(mergefile, node)) is not None:
        chosen[node] = group
    names = build_order(graph, [node])
    models: dict[str, Any] = {}
    for name in names:
        spec = mergefile.nodes[name]
        if isinstance(spec, SourceSpec):
            if not spec.implicit:
                models[name] = {"source": _display_uri(spec, mergefile.directory)}
        elif isinstance(spec, MergeSpec):  # an adapted reference is written in its child
            if group_of(mergefile, name) is not None and name not in chosen:
                continue  # a variant its sweep did not select
            # The card is presentation, kept beside the object: the weights' record omits it.
            models[chosen.get(name, name)] = {k: v for k, v in spec.plain().items()
                                              if k not in _NOT_BUILT}
    # libyaml's dumper when present: an excerpt grows with the chain's depth.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    defaults = mergefile.defaults.plain()
    document = {"version": 1, **({"defaults": defaults} if defaults else {}), "models": models}
    return yaml.dump(document, Dumper=dumper, sort_keys=False)


# A node's keys that say how a build is presented or judged, not what it is.
_NOT_BUILT = ("card", "evals", "checks")


def group_of(mergefile: Mergefile, node: str) -> str | None:
    """The sweep whose variant (the search whose trial) ``node`` is; None for other nodes."""
    group = mergefile.nodes.get(node.split("[", 1)[0]) if "[" in node else None
    if isinstance(group, SearchSpec) or (isinstance(group, SweepSpec)
                                         and node in group.variants):
        return group.name
    return None


def selected_variants(states: Mapping[str, NodeState]) -> dict[str, str]:
    """{sweep or search: the variant it stands for} of every resolved one in ``states``."""
    return {name: s.selection.winner for name, s in states.items()
            if s.selection is not None and s.digest is not None}


def _display_uri(spec: SourceSpec, base: Path) -> str:
    if spec.kind != "local":
        return spec.uri
    shown = portable_uri(Path(spec.uri).absolute().as_uri(), base)
    return shown.removeprefix("file://")


def utc_now() -> str:
    """Now, as provenance and pins record it (ISO 8601, milliseconds, UTC)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
