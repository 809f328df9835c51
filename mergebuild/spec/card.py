"""The ``card:`` block: Hugging Face card metadata and text, checked offline against the Hub's
vocabularies; a top-level block gives defaults, a node's block overrides them field by field."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from mergebuild.errors import MergefileError
from mergebuild.spec.yaml_lines import LineDict

CARD_KEYS = ("license", "license_name", "license_link", "language", "datasets",
             "pipeline_tag", "tags", "introduction")
# A source's card only says what its files may not: its licence.
SOURCE_CARD_KEYS = ("license",)

# The licence identifiers the Hub accepts (huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
llama3.3 llama4 gemma unknown other
""".split())
# The Hub's task ids (huggingface.co/tasks), the values ``pipeline_tag`` may take.
PIPELINE_TAGS = frozenset("""
text-generation text2text-generation fill-mask feature-extraction sentence-similarity
text-classification token-classification question-answering table-question-answering
zero-shot-classification translation summarization text-ranking image-text-to-text
video-text-to-text audio-text-to-text any-to-any visual-question-answering
document-question-answering image-to-text text-to-image image-to-image image-classification
image-segmentation object-detection depth-estimation unconditional-image-generation
video-classification text-to-video image-to-video zero-shot-image-classification mask-generation
zero-shot-object-detection text-to-3d image-to-3d image-feature-extraction keypoint-detection
visual-document-retrieval audio-classification automatic-speech-recognition text-to-speech
text-to-audio audio-to-audio voice-activity-detection reinforcement-learning robotics
tabular-classification tabular-regression time-series-forecasting graph-ml other
""".split())
# ISO 639-1/2/3 codes (optionally with a region or script), or the Hub's special values.
_LANGUAGE = re.compile(r"^([a-z]{2,3}(-[A-Za-z0-9]{2,8})*|code|multilingual)$")
_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TAG = re.compile(r"^[^\s,][^\n,]{0,99}$")


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


@dataclass(frozen=True)
class CardSpec:
    """What a Mergefile says about a model's card; ``None``/empty means "not said here"."""

    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    language: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    tags: tuple[str, ...] = ()
    introduction: str | None = None

    def over(self, defaults: CardSpec | None) -> CardSpec:
        """This block over the top-level ``defaults``: each field said here wins; tags add up."""
        if defaults is None:
            return self
        merged = {f.name: getattr(self, f.name) or getattr(defaults, f.name)
                  for f in fields(self)}
        merged["tags"] = tuple(dict.fromkeys((*defaults.tags, *self.tags)))
        return replace(self, **merged)

    def to_json(self) -> dict[str, Any]:
        """The fields said, JSON-ready (lists for tuples), in declaration order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def parse_card(raw: Any, file: str, line: int, node: str | None,
               allowed: tuple[str, ...] = CARD_KEYS) -> CardSpec:
    """Read one ``card:`` block, checking every value against the Hub's vocabularies."""

    def fail(message: str, key: str | None = None, hint: str | None = None) -> MergefileError:
        at = raw.line_of(key) if key and isinstance(raw, LineDict) else line
        return MergefileError(message, file=file, line=at, node=node, hint=hint)

    if not isinstance(raw, Mapping):
        raise fail("'card' must be a mapping", hint=f"keys: {', '.join(allowed)}")
    for key in raw:
        if key not in allowed:
            hint = _did_you_mean(str(key), allowed) or f"card keys: {', '.join(allowed)}"
            raise fail(f"unknown card key '{key}'", str(key), hint)

    def text(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(f"card '{key}' must be a non-empty string", key)
        return value.strip()

    def strings(key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
        value = raw.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise fail(f"card '{key}' must be a string or a list of strings", key)
        for item in items:
            if not pattern.match(item):
                raise fail(f"card '{key}': '{item}' is not {what}", key)
        return tuple(dict.fromkeys(items))

    license = text("license")
    if license is not None and license not in HUB_LICENSES:
        hint = _did_you_mean(license, sorted(HUB_LICENSES)) or (
            "use a Hub licence id (apache-2.0, mit, llama3.1, cc-by-4.0…) or 'other' with "
            "license_name and license_link")
        raise fail(f"card 'license': '{license}' is not a Hugging Face licence id", "license",
                   hint)
    if license == "other" and not (raw.get("license_name") and raw.get("license_link")):
        raise fail("card 'license: other' needs 'license_name' and 'license_link'", "license")
    pipeline_tag = text("pipeline_tag")
    if pipeline_tag is not None and pipeline_tag not in PIPELINE_TAGS:
        hint = _did_you_mean(pipeline_tag, sorted(PIPELINE_TAGS)) or "e.g. text-generation"
        raise fail(f"card 'pipeline_tag': '{pipeline_tag}' is not a Hugging Face task",
                   "pipeline_tag", hint)
    return CardSpec(
        license=license, license_name=text("license_name"), license_link=text("license_link"),
        language=strings("language", _LANGUAGE, "an ISO 639 language code (en, fr, code…)"),
        datasets=strings("datasets", _DATASET, "a dataset id (name or org/name)"),
        pipeline_tag=pipeline_tag,
        tags=strings("tags", _TAG, "a tag (one line, no commas)"),
        introduction=text("introduction"),
    )
