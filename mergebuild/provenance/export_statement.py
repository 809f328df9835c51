"""The provenance of an export in another format (GGUF): its file's sha256, bound to the build."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.io.atomic import write_bytes_atomic
from mergebuild.provenance.card import join_front_matter, split_front_matter
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import (
    CARD_FILE,
    PROVENANCE_FILE,
    BuildRecord,
    ParentRef,
    build_statement,
    dumps_statement,
    short_digest,
    statement_digest,
)

__all__ = ["GGUF_BUILD_TYPE", "gguf_card", "write_gguf_provenance"]

GGUF_BUILD_TYPE = "https://mergebuild.dev/buildtypes/gguf/v1"


def write_gguf_provenance(directory: Path, source: Mapping[str, Any], gguf: Mapping[str, Any],
                          *, node: str, build_card: str | None) -> dict[str, Any]:
    """Write the card and ``provenance.json`` of a GGUF export into ``directory``.

    The statement's one file output is the GGUF (``gguf["file"]``, its ``sha256`` and
    ``bytes``), its content digest is that sha256, and its one dependency is the source build
    (role ``source``) by content digest, with the build's own statement embedded, so
    ``verify`` re-hashes the GGUF and checks the chain down to every original checkpoint.

    Returns:
        The statement written.
    """
    definition = source["predicate"]["buildDefinition"]
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    recipe = {"format": "gguf", "quant": gguf["quant"], "source": statement_digest(source),
              "gguf": gguf["gguf_version"]}
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    record = BuildRecord(
        node=node, key="sha256:" + hashlib.sha256(canonical).hexdigest(),
        digest=f"sha256:{gguf['sha256']}", method="gguf", recipe=recipe,
        spec={"format": "gguf", "quant": gguf["quant"], "architecture": gguf["architecture"]},
        mergefile_digest=str(definition["externalParameters"].get("mergefile_digest", "")),
        mergefile_excerpt="",
        parents=(ParentRef(name=node, role="source", kind="node", uri=f"mergebuild:node/{node}",
                           digest=statement_digest(source), statement=source,
                           method=definition["externalParameters"].get("method")),),
        outputs={gguf["file"]: (gguf["sha256"], gguf["bytes"])},
        builder={"mergebuild": __version__, "gguf": gguf["gguf_version"],
                 "python": platform.python_version()},
        device="cpu", engine_version="gguf1", started=now, finished=now,
        invocation_id=hashlib.sha256(now.encode()).hexdigest()[:16], rebuild_command="",
    )
    card = gguf_card(node, gguf, statement_digest(source), build_card).encode("utf-8")
    write_bytes_atomic(Path(directory) / CARD_FILE, card)
    statement = build_statement(record, hashlib.sha256(card).hexdigest(), len(card))
    statement["predicate"]["buildDefinition"]["buildType"] = GGUF_BUILD_TYPE
    write_bytes_atomic(Path(directory) / PROVENANCE_FILE, dumps_statement(statement))
    return statement


def gguf_card(node: str, gguf: Mapping[str, Any], source_digest: str,
              build_card: str | None) -> str:
    """The model card of a GGUF export: the build's card, tagged ``gguf``, with a section
    naming the file, its quantisation, its sha256 and how to run it."""
    metadata, body = split_front_matter(build_card or "")
    tags = [t for t in metadata.get("tags") or [] if t != "gguf"]
    metadata["tags"] = ["gguf", *tags]
    if "library_name" in metadata:
        metadata["library_name"] = "gguf"
    fallbacks = gguf.get("f16_fallbacks") or []
    section = [
        f"# {node} (GGUF, {gguf['quant']})",
        "",
        f"`{gguf['file']}` is `{node}` (content digest `{short_digest(source_digest)}`) "
        f"converted for llama.cpp and Ollama by mergebuild with gguf {gguf['gguf_version']}: "
        f"architecture `{gguf['architecture']}`, {gguf['tensor_count']} tensors, 2-D weights "
        f"stored as {gguf['quant'].upper()}"
        + (f" ({len(fallbacks)} kept at F16: rows not a whole quantisation block)"
           if fallbacks else "") + ".",
        "",
        "| File | Quantisation | Bytes | sha256 |",
        "|---|---|---|---|",
        f"| `{gguf['file']}` | {gguf['quant']} | {gguf['bytes']} | `{gguf['sha256']}` |",
        "",
        "Run it with llama.cpp (`llama-cli -m " + gguf["file"] + "`) or Ollama (a Modelfile "
        "with `FROM ./" + gguf["file"] + "`). `mergebuild verify` on this directory re-hashes "
        "the file and checks its chain back to every original checkpoint.",
        "",
    ]
    if body.strip():
        section += ["## The merge this file was converted from", "",
                    body.lstrip().removeprefix(f"# {node}\n").lstrip()]
    return scrub_text(join_front_matter(metadata, "\n".join(section)))
