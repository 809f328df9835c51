"""Shared fixtures: real tiny Llama-layout checkpoints, generated once per test run."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

CHAIN = """\
version: 1
defaults:
  dtype: bfloat16
models:
  base:     {{source: {models}/base}}
  instruct: {{source: {models}/instruct}}
  chat:     {{source: {models}/chat}}
  code:     {{source: {models}/code}}
  math:     {{source: {models}/math}}
  base-instruct:
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: instruct
        parameters: {{weight: 1.0}}
  chat-code:
    merge_method: slerp
    base_model: chat
    models: [{{model: chat}}, {{model: code}}]
    parameters: {{t: 0.4}}
  final-model:
    merge_method: ties
    base_model: base
    models:
      - model: base-instruct
        parameters: {{weight: 0.5, density: 0.6}}
      - model: chat-code
        parameters: {{weight: 0.3, density: 0.6}}
      - model: math
        parameters: {{weight: 0.2, density: 0.5}}
"""

# A 6-variant TIES sweep over the demo models (the executors' tests build it locally and on Ray).
TIES_SWEEP = """\
  blend:
    merge_method: ties
    base_model: base
    models:
      - {{model: code, parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: math, parameters: {{weight: 0.5, density: 0.5}}}}
    sweep:
      models.code.density: [0.3, 0.5, 0.7]
      lambda: [0.8, 1.0]
"""


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> dict[str, Path]:
    from mergebuild.sources.demo import generate_demo_models

    return generate_demo_models(tmp_path_factory.mktemp("demo") / "models")


class Workspace:
    """A directory with a Mergefile over the demo models and its own store."""

    def __init__(self, root: Path, models: Path):
        self.root = root
        self.models = models
        self.cache = root / "cache"
        self.mergefile = root / "Mergefile"

    def write(self, text: str) -> Path:
        self.mergefile.write_text(textwrap.dedent(text).format(models=self.models))
        return self.mergefile

    def chain(self) -> Path:
        return self.write(CHAIN)

    def project(self):
        from mergebuild.api import Project

        return Project(self.mergefile, self.cache)


@pytest.fixture
def workspace(tmp_path, demo_models) -> Workspace:
    return Workspace(tmp_path, demo_models["base"].parent)


def outcomes(result) -> dict[str, str]:
    return {r.name: r.outcome for r in result.results}


# --------------------------------------------------------------------------- no skips in CI
# A compatibility test that skips proves nothing: on CI (CI=true, as .ci/run is run) a skip
# for a missing package is a failure, so a broken install step cannot hide behind a green run.


def _fail_skip_on_ci(report) -> None:
    if os.environ.get("CI", "").lower() in ("", "0", "false") or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped on CI: {report.longrepr!r} — .ci/run must install what this "
                       "test needs")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_on_ci(outcome.get_result())
