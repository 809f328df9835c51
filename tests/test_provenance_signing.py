"""provenance/signing.py: DSSE v1 PAE and envelopes, Ed25519 keys from a file or the environment."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from mergebuild.errors import SigningError
from mergebuild.provenance.signing import (
    KEY_ENV,
    PAYLOAD_TYPE,
    SIGNATURE_FILE,
    check_signature,
    generate_keypair,
    load_private_key,
    load_public_key,
    pae,
    sign_directory,
)


def test_pae_is_dssev1_with_ascii_decimal_lengths():
    # The DSSE protocol's own example.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")
    assert pae(PAYLOAD_TYPE, b"") == b"DSSEv1 28 application/vnd.in-toto+json 0 "


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "k")


def _model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "provenance.json").write_text('{"_type": "https://in-toto.io/Statement/v1"}')
    return model


def test_envelope_carries_provenance_and_verifies_with_the_public_key(tmp_path, keys):
    model = _model(tmp_path)
    sign_directory(model, load_private_key(keys[0]))
    envelope = json.loads((model / SIGNATURE_FILE).read_text())
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == (model / "provenance.json").read_bytes()
    assert len(base64.b64decode(envelope["signatures"][0]["sig"])) == 64  # Ed25519
    assert check_signature(model, load_public_key(keys[1])) is None
    (model / "provenance.json").write_text('{"_type": "forged"}')
    assert check_signature(model, load_public_key(keys[1])) == (
        "provenance.json is not the statement that was signed")


def test_a_tampered_signature_or_payload_type_fails(tmp_path, keys):
    model = _model(tmp_path)
    sign_directory(model, load_private_key(keys[0]))
    envelope = json.loads((model / SIGNATURE_FILE).read_text())
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 1
    bad = dict(envelope, signatures=[{"sig": base64.b64encode(bytes(sig)).decode()}])
    (model / SIGNATURE_FILE).write_text(json.dumps(bad))
    assert "is not signed by this key" in check_signature(model, load_public_key(keys[1]))
    (model / SIGNATURE_FILE).write_text(json.dumps(dict(envelope, payloadType="text/plain")))
    assert "not application/vnd.in-toto+json" in check_signature(model,
                                                                 load_public_key(keys[1]))
    (model / SIGNATURE_FILE).write_text("[1, 2")
    assert "is not a DSSE envelope" in check_signature(model, load_public_key(keys[1]))


def test_private_key_from_the_environment_as_pem_or_path(tmp_path, keys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, keys[0].read_text())
    assert load_private_key().public_key() == load_private_key(keys[0]).public_key()
    monkeypatch.setenv(KEY_ENV, str(keys[0]))
    assert load_private_key().public_key() == load_private_key(keys[0]).public_key()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SigningError, match="no signing key"):
        load_private_key()


def test_keys_of_the_wrong_kind_are_refused(tmp_path, keys):
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(keys[1])
    with pytest.raises(SigningError, match="not a PEM public key"):
        load_public_key(keys[0])
    with pytest.raises(SigningError, match="exists; not overwriting"):
        generate_keypair(tmp_path / "k")
    shutil.rmtree(tmp_path / "model", ignore_errors=True)
