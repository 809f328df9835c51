"""DSSE-signed in-toto statements: sign a build's provenance with Ed25519, verify with the key.

A signed model directory holds ``provenance.dsse.json``, a DSSE envelope
(https://github.com/secure-systems-lab/dsse, protocol v1) whose payload is the exact bytes of
``provenance.json`` (an in-toto Statement v1, payloadType ``application/vnd.in-toto+json``)
and whose signature is Ed25519 over the envelope's pre-authentication encoding (PAE).
Someone who trusts only the public key checks the signature, that the payload is the
directory's ``provenance.json``, and then every file against that statement: nothing but
the key has to be trusted. ``cryptography`` is the ``signing`` extra.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mergebuild.errors import SigningError
from mergebuild.provenance.integrity import SIGNATURE_FILE
from mergebuild.provenance.statement import PROVENANCE_FILE

PAYLOAD_TYPE = "application/vnd.in-toto+json"
KEY_ENV = "MERGEBUILD_SIGNING_KEY"  # a PEM private key, or the path of one

__all__ = ["KEY_ENV", "PAYLOAD_TYPE", "SIGNATURE_FILE", "check_signature", "generate_keypair",
           "key_id", "load_private_key", "load_public_key", "pae", "sign_directory"]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths as ASCII decimal bytes.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a declared dependency
        raise SigningError("signing needs the 'cryptography' package",
                           hint="pip install 'mergebuild[signing]'") from None
    return serialization, ed25519, InvalidSignature


def load_private_key(path: str | Path | None = None):
    """An Ed25519 private key (PEM, PKCS#8, unencrypted) from ``path``, or when ``path`` is
    None from ``$MERGEBUILD_SIGNING_KEY`` (the PEM itself, or the path of a PEM file)."""
    serialization, ed25519, _ = _crypto()
    if path is None:
        value = os.environ.get(KEY_ENV, "")
        if not value.strip():
            raise SigningError(f"no signing key: pass --sign KEYFILE or set {KEY_ENV}",
                               hint="create one with 'mergebuild keygen NAME'")
        data = value.encode() if "-----BEGIN" in value else _read_key(Path(value), KEY_ENV)
        where = KEY_ENV
    else:
        data, where = _read_key(Path(path), str(path)), str(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where} is not an unencrypted PEM private key ({exc})",
                           hint="create one with 'mergebuild keygen NAME'") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{where} is not an Ed25519 key",
                           hint="create one with 'mergebuild keygen NAME'")
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key (PEM SubjectPublicKeyInfo) from ``path``."""
    serialization, ed25519, _ = _crypto()
    data = _read_key(Path(path), str(path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not a PEM public key ({exc})",
                           hint="pass the .pub file 'mergebuild keygen' wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return key


def _read_key(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the key {where}: {exc.strerror or exc}") from None
    if len(data) > 64 * 1024:
        raise SigningError(f"{where} is not a key file (over 64 KiB)")
    return data


def key_id(public_key: Any) -> str:
    """sha256 of the public key's raw bytes, hex: names the key in an envelope."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(prefix: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub``.

    Refuses to overwrite either file.
    """
    serialization, ed25519, _ = _crypto()
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (private, public):
        if path.exists():
            raise SigningError(f"{path} exists; not overwriting a key",
                               hint="pick another name or remove it first")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise SigningError(f"cannot write {private}: {exc.strerror or exc}") from None
    return private, public


def sign_directory(directory: Path, private_key: Any) -> Path:
    """Sign ``directory``'s ``provenance.json`` into ``provenance.dsse.json`` beside it."""
    payload = (Path(directory) / PROVENANCE_FILE).read_bytes()
    signature = private_key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id(private_key.public_key()),
                        "sig": base64.b64encode(signature).decode("ascii")}],
    }
    path = Path(directory) / SIGNATURE_FILE
    path.write_text(json.dumps(envelope, indent=1) + "\n", encoding="utf-8")
    return path


def _b64(text: str) -> bytes:
    """DSSE allows standard or URL-safe Base64."""
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    return base64.b64decode(text, validate=True)


def check_signature(directory: Path, public_key: Any) -> str | None:
    """Why ``directory``'s envelope does not vouch for its ``provenance.json`` under
    ``public_key``, or None when a signature by that key covers exactly those bytes."""
    _, _, invalid = _crypto()
    path = Path(directory) / SIGNATURE_FILE
    try:
        if path.stat().st_size > 64 * 2**20:
            return f"{SIGNATURE_FILE} is over 64 MiB"
        envelope = json.loads(path.read_text(encoding="utf-8"))
        payload_type = envelope["payloadType"]
        payload = _b64(envelope["payload"])
        signatures = [_b64(s["sig"]) for s in envelope["signatures"]]
    except FileNotFoundError:
        return f"not signed (no {SIGNATURE_FILE})"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"{SIGNATURE_FILE} is not a DSSE envelope ({type(exc).__name__})"
    if payload_type != PAYLOAD_TYPE:
        return f"{SIGNATURE_FILE} carries {str(payload_type)[:60]!r}, not {PAYLOAD_TYPE}"
    message = pae(payload_type, payload)
    for signature in signatures:
        try:
            public_key.verify(signature, message)
            break
        except invalid:
            continue
    else:
        return f"{SIGNATURE_FILE} is not signed by this key ({key_id(public_key)[:16]})"
    try:
        provenance = (Path(directory) / PROVENANCE_FILE).read_bytes()
    except OSError:
        return f"no {PROVENANCE_FILE} to compare with the signed statement"
    if provenance != payload:
        return f"{PROVENANCE_FILE} is not the statement that was signed"
    return None
