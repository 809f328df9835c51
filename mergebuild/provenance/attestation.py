"""The evaluation attestation: an in-toto Statement (v1) with the test-result predicate (v0.1)
over the model's files: which evals ran (by definition digest), their scores, passed and
failed checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergebuild.provenance.statement import STATEMENT_TYPE

__all__ = ["TEST_RESULT_PREDICATE", "build_attestation"]

TEST_RESULT_PREDICATE = "https://in-toto.io/attestation/test-result/v0.1"


def build_attestation(outputs: Mapping[str, tuple[str, int]], evaluation: Mapping[str, Any]
                      ) -> dict[str, Any]:
    """The statement for a model's files ``outputs`` ({name: (sha256 hex, size)}).

    ``configuration`` lists each eval definition as a resource descriptor (its canonical
    identity's sha256, its kind, parameters, data files' sha256 and the scores measured);
    ``passedTests``/``failedTests`` are each eval that ran and each check, as one line.
    Deterministic: the same model and results give the same bytes (no times).

    Example:
        >>> build_attestation({"model.safetensors": ("ab…", 10)}, summary)["predicateType"]
        'https://in-toto.io/attestation/test-result/v0.1'
    """
    evals = evaluation.get("evals") or {}
    checks = evaluation.get("checks") or []
    configuration = []
    passed = []
    for name in sorted(evals):
        entry = evals[name]
        algo, _, hexd = str(entry["digest"]).partition(":")
        configuration.append({
            "name": name,
            "digest": {algo: hexd},
            "annotations": {"kind": entry["kind"], "params": entry["params"],
                            "data": entry["data"], "metrics": entry["metrics"],
                            "evaluator": evaluation.get("evaluator")},
        })
        if entry["metrics"]:
            passed.append(f"eval {name}: " + ", ".join(
                f"{metric} {value:.6g}" for metric, value in entry["metrics"].items()))
    failed = [c["check"] for c in checks if not c["passed"]]
    passed += [f"check {c['check']}" for c in checks if c["passed"]]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha.lower()}}
                    for name, (sha, _) in sorted(outputs.items())],
        "predicateType": TEST_RESULT_PREDICATE,
        "predicate": {
            "result": "FAILED" if failed else "PASSED",
            "configuration": configuration,
            "passedTests": passed,
            "warnedTests": [],
            "failedTests": [f"check {line}" for line in failed],
        },
    }
