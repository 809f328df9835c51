"""Write a build's provenance: the model card first, then the statement that covers it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mergebuild import faults
from mergebuild.io.atomic import write_bytes_atomic
from mergebuild.provenance.attestation import build_attestation
from mergebuild.provenance.card import render_card
from mergebuild.provenance.statement import (
    CARD_FILE,
    EVALUATION_FILE,
    PROVENANCE_FILE,
    BuildRecord,
    build_statement,
    dumps_statement,
)

__all__ = ["write_provenance"]


def write_provenance(directory: Path, record: BuildRecord) -> None:
    """Write ``README.md`` (the model card), the evaluation attestation when the record has
    evaluations, and then ``provenance.json`` into ``directory``.

    The statement's subjects are every file of ``record.outputs``, the card, the
    attestation, and the whole-directory subject. Each file is written to a temporary name
    and renamed.
    """
    directory = Path(directory)
    card = render_card(record).encode("utf-8")
    write_bytes_atomic(directory / CARD_FILE, card)
    faults.point("provenance.card_written")
    attached = {}
    if record.evaluation is not None:
        attestation = dumps_statement(build_attestation(record.outputs, record.evaluation))
        write_bytes_atomic(directory / EVALUATION_FILE, attestation)
        attached[EVALUATION_FILE] = (hashlib.sha256(attestation).hexdigest(), len(attestation))
    statement = build_statement(record, hashlib.sha256(card).hexdigest(), len(card), attached)
    write_bytes_atomic(directory / PROVENANCE_FILE, dumps_statement(statement))
    faults.point("provenance.written")
