"""Credential scrubbing: the one rule set for everything we write or print that may hold a secret."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["REDACTED", "portable_uri", "scrub_secrets", "scrub_text"]

REDACTED = "[REDACTED]"

# Where huggingface_hub reads a token from; its exact value is removed wherever it appears.
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Hugging Face user and organisation tokens. Real ones carry 30+ characters after the prefix;
# a shorter floor would also hit names such as "hf_checkpoints" in paths.
_TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"api_org_[A-Za-z0-9]{20,}"),
)
_URL_CREDENTIALS = re.compile(r"((?:https?|ssh|git\+https?|git\+ssh)://)[^/@\s]+@")
# ``user:password@`` after any scheme (``hf://user:PASS@org/x``); without the colon,
# ``hf://gpt2@main`` is a repo and its revision, not a credential.
_SCHEME_USER_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:'\"]*:[^/@\s'\"]*@")
_TOKEN_FLAG = re.compile(r"(--(?:hf[-_])?token(?:=|\s+))\S+")
_TOKEN_QUERY = re.compile(r"(?i)([?&](?:access_token|token|api_key|apikey|password)=)[^&#\s]+")
_AUTH_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*(?:(?:bearer|basic|token)\s+)?)[^\s,;'\"]+"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_YAML_SECRET_LINE = re.compile(
    r"(?im)^(\s*-?\s*[\w-]*(?:token|secret|password|passwd|api_key|apikey)\s*:[ \t]*)(\S.*)$"
)
# Text in which none of the patterns above can match (each needs one of these, under the
# same case folding): most of what is printed, scrubbed with one search instead of ten.
_MAYBE_SECRET = re.compile(
    r"(?i)hf_|api_org_|://|--|authorization|bearer|token|secret|passw|api_?key"
)
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:token|secret|password|passwd|api_?key|auth|authorization|credentials?)"
    r"(?:$|[_-])"
)


def scrub_text(text: str) -> str:
    """Remove anything that looks like a credential from free text.

    Removes the token in ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN`` (read at call time), Hugging
    Face tokens (``hf_…``, ``api_org_…``), URL user-info (``user:pass@``), ``--token``
    arguments, ``token=`` query parameters, ``Authorization:``/``Bearer`` credentials and the
    values of secret-looking YAML keys.
    """
    for name in _TOKEN_ENV:
        token = os.environ.get(name)
        if token:
            text = text.replace(token, REDACTED)
    if not _MAYBE_SECRET.search(text):
        return text
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = _URL_CREDENTIALS.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _SCHEME_USER_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _TOKEN_FLAG.sub(lambda m: m.group(1) + REDACTED, text)
    text = _TOKEN_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _YAML_SECRET_LINE.sub(lambda m: m.group(1) + REDACTED, text)


def scrub_secrets(value: Any) -> Any:
    """Return a JSON-ready copy of ``value`` with credentials removed.

    Strings are scrubbed with :func:`scrub_text`; string values under keys such as ``token``,
    ``hf_token`` or ``api_key`` are replaced whole (``tokenizer`` and friends are left
    alone). Tuples become lists, other non-JSON values become their ``str``.
    """
    if isinstance(value, Mapping):
        clean: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if isinstance(v, str) and v and _SECRET_KEY.search(key.lower()):
                clean[key] = REDACTED
            else:
                clean[key] = scrub_secrets(v)
        return clean
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return scrub_text(str(value))



def portable_uri(uri: str, base: Path) -> str:
    """A local source's ``file://`` URI as a build records it, so that a pushed model does
    not reveal where its builder keeps files: ``./…`` relative to ``base`` (the Mergefile's
    directory) when inside it, else ``~/…`` when inside the home directory, else unchanged.
    Other URIs (``hf://…``, ``demo://…``) are returned as they are."""
    if not uri.startswith("file://"):
        return uri
    path = Path(unquote(urlparse(uri).path))
    for root, prefix in ((Path(base), "./"), (Path.home(), "~/")):
        for candidate in dict.fromkeys((root, root.resolve())):
            try:
                relative = path.relative_to(candidate)
            except ValueError:
                continue
            return prefix + relative.as_posix() if relative.parts else prefix.rstrip("/")
    return uri
