"""The card a build is presented with: its own card with the Mergefile's ``card:`` block and
the parents' licences applied, kept beside the object (never in it), keyed by its content."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebuild.io.atomic import write_bytes_atomic
from mergebuild.provenance.card import apply_card, card_attestation, licence_warnings
from mergebuild.provenance.statement import (
    CARD_ATTESTATION_FILE,
    CARD_FILE,
    read_statement,
    statement_digest,
)

__all__ = ["PresentedCard", "present_card"]


@dataclass(frozen=True)
class PresentedCard:
    """The card that goes out with a build (``export``, ``push``, ``path --card``).

    Attributes:
        text: the card (Markdown with Hub front matter).
        path: where it is kept: the build's own ``README.md`` when nothing applies, else
            ``cards/<build digest>/<card sha256>/README.md`` in the store.
        attestation: the ``card.json`` binding ``text`` to the build (None for the build's own).
        warnings: licence warnings (differing or unknown parents' licences).
    """

    text: str
    path: Path
    attestation: Mapping[str, Any] | None
    warnings: tuple[str, ...]


def present_card(cards: Path, build: Path, node: str, card: Mapping[str, Any],
                 licences: Mapping[str, str | None]) -> PresentedCard:
    """The card of ``build`` with ``card`` (a ``CardSpec.to_json()``) and ``licences``
    (``{parent: licence or None}``) applied, written once under ``cards`` (the store's card
    folder): the object stays as it was published, so it still verifies, and editing only
    ``card:`` rebuilds nothing."""
    build = Path(build)
    own = (build / CARD_FILE).read_text(encoding="utf-8")
    warnings = tuple(licence_warnings(licences))
    if not card and not licences:
        return PresentedCard(own, build / CARD_FILE, None, warnings)
    text = apply_card(own, card, licences)
    digest = statement_digest(read_statement(build))
    attestation = card_attestation(text, digest, node, card, licences)
    sha256 = attestation["subject"][0]["digest"]["sha256"]
    folder = Path(cards) / digest.split(":", 1)[-1][:32] / sha256[:32]
    if not (folder / CARD_ATTESTATION_FILE).is_file():  # content-addressed: written once
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / CARD_FILE, text.encode("utf-8"))
        write_bytes_atomic(folder / CARD_ATTESTATION_FILE,
                           (json.dumps(attestation, indent=2, sort_keys=True) + "\n").encode())
    return PresentedCard(text, folder / CARD_FILE, attestation, warnings)

