"""`mergebuild report`: one self-contained HTML page, opened in a real headless Chromium whose
rendered DOM is checked (graph nodes drawn, tables filled) and whose screenshot is saved."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CHAIN
from safetensors.torch import save_file

from mergebuild.cli import main
from mergebuild.provenance.lineage import LineageNode
from mergebuild.verbs.audit_report import (
    Evaluation,
    ReportTarget,
    SearchStudy,
    SearchTrial,
    SweepRow,
    nonfinite_tensors,
    render_report,
)

LICENSED = CHAIN.replace("  base:     {{source: {models}/base}}",
                         "  base:     {{source: {models}/base, card: {{license: apache-2.0}}}}")


def chromium() -> str:
    """The browser: installed by .ci/run (apt-get install chromium); never skipped."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no Chromium: apt-get install -y chromium (.ci/run does)")


def browse(page: Path, screenshot: Path) -> str:
    """The DOM after Chromium rendered ``page`` (offline), and a screenshot of it."""
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-extensions", "--disable-background-networking",
              "--user-data-dir=" + str(screenshot.parent / "chromium-profile")]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    subprocess.run([*common, "--window-size=1280,1600", f"--screenshot={screenshot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    keep = os.environ.get("MERGEBUILD_SCREENSHOTS")
    if keep:  # CI keeps them as artifacts; a reviewer looks at them
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    return dom


def rows(dom: str, table: str) -> list[str]:
    match = re.search(rf'<table data-table="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert match, f"no {table} table in the rendered page"
    return re.findall(r"<tr[^>]*>(.*?)</tr>", match.group(1), re.S)


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def test_report_of_a_three_stage_chain_renders_in_chromium(workspace, tmp_path):
    workspace.write(LICENSED)
    assert run(workspace, "make", "final-model").exit_code == 0
    page = tmp_path / "report.html"
    result = run(workspace, "report", "final-model", "-o", str(page))
    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {page}: 1 target, 0 verification problems, "
                             "1 warning\n")
    text = page.read_text()
    # Self-contained: nothing to fetch (the SVG namespace is a name, not a request).
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert "<link" not in text and "@import" not in text and "url(http" not in text

    dom = browse(page, tmp_path / "report-chain.png")
    drawn = re.findall(r'<g class="node (\w+)" data-name="([^"]+)"', dom)
    assert sorted(name for _, name in drawn) == sorted(
        ["base", "instruct", "chat", "code", "math", "base-instruct", "chat-code",
         "final-model"])
    assert [name for kind, name in drawn if kind == "target"] == ["final-model"]
    assert len(re.findall(r'<g class="edge">', dom)) == 8  # chat is chat-code's base and model
    stages = rows(dom, "stages")
    assert [re.search(r"<b>(.*?)</b>", r).group(1) for r in stages] == [
        "base-instruct", "chat-code", "final-model"]
    assert "ties" in stages[2] and "base-instruct.density=0.6" in stages[2]
    sources = rows(dom, "sources")
    assert len(sources) == 5 and all("xxh128:" in r for r in sources)
    assert 'data-verified="true"' in dom
    licences = rows(dom, "licences")
    assert len(licences) == 4 and "apache-2.0" in licences[0]
    assert re.search(r'<ul class="warnings"><li>the licence of base-instruct, chat-code, math '
                     r"is unknown", dom)
    assert (tmp_path / "report-chain.png").stat().st_size > 20_000


def test_failed_verification_nan_warnings_evaluations_and_sweeps_render(workspace, tmp_path):
    workspace.write(CHAIN)
    assert run(workspace, "make", "chat-code").exit_code == 0
    build = workspace.project().path("chat-code")
    broken = tmp_path / "broken"
    shutil.copytree(build, broken)
    weights = broken / "model.safetensors"
    from mergebuild.io.checkpoint import CheckpointReader

    with CheckpointReader(broken) as reader:
        tensors = {n: reader.load(n).clone() for n in reader.tensors}
    tensors["model.norm.weight"][3] = float("nan")
    tensors["lm_head.weight"][0, :2] = float("inf")
    weights.chmod(0o644)
    save_file(tensors, weights, metadata={"format": "pt"})
    found = nonfinite_tensors(broken)
    assert sorted(found) == ["lm_head.weight: 0 NaN, 2 Inf", "model.norm.weight: 1 NaN, 0 Inf"]
    source = LineageNode("chat", "local", "xxh128:" + "a" * 32, "demo://chat")
    root = LineageNode("chat-code", "node", "sha256:" + "b" * 64, "mergebuild:node/chat-code",
                       method="slerp", params={"t": 0.4}, children=(
                           LineageNode("chat", "local", source.digest, source.uri, role="base"),))
    target = ReportTarget(
        name="chat-code", directory=broken, lineage=root,
        problems=("model.safetensors: modified: sha256 0123…, expected 4567…",), files=7,
        signature="unsigned", card={"license": "mit"}, licences={"chat": "mit"},
        warnings=tuple(f"non-finite values in {f}" for f in found),
        evaluations=(Evaluation("chat-code", "code-skill", 0.62, "code", 0.7, 0.62 / 0.7, True),
                     Evaluation("chat-code", "chat-skill", 0.41, "chat", 0.8, 0.41 / 0.8,
                                False)),
        sweeps=(SweepRow("chat-code", "chat-code[t=0.2]", {"t": 0.2}, 0.55),
                SweepRow("chat-code", "chat-code[t=0.4]", {"t": 0.4}, 0.62, selected=True),
                SweepRow("chat-code", "chat-code[t=0.6]", {"t": 0.6}, 0.58)),
        searches=(SearchStudy(
            "tuned", "tpe", 7, 4, "maximize code-skill", why="trial 1 has the highest", rows=(
                SearchTrial(0, "tuned[t=0.31]", {"t": 0.31}, 0.5),
                SearchTrial(1, "tuned[t=0.52]", {"t": 0.52}, 0.66, selected=True),
                SearchTrial(2, "tuned[t=0.9]", {"t": 0.9}, 0.7,
                            failed="failed: chat-skill accuracy 0.1 < 0.5 (min)"))),))
    page = tmp_path / "report.html"
    page.write_text(render_report([target], title="review", generated="now"))
    dom = browse(page, tmp_path / "report-failures.png")
    assert 'data-verified="false"' in dom and "model.safetensors: modified" in dom
    evaluations = rows(dom, "evaluations")
    assert len(evaluations) == 2 and "88.6%" in evaluations[0] and "FAIL" in evaluations[1]
    board = rows(dom, "sweep")
    assert "★ chat-code[t=0.4]" in board[0] and 'class="selected"' in dom
    assert [re.search(r"t=([\d.]+)", r).group(1) for r in board] == ["0.4", "0.6", "0.2"]
    assert "non-finite values in model.norm.weight: 1 NaN, 0 Inf" in dom
    # a search's study: in the order asked, the winner starred, a failed check said
    assert "tuned</b>: tpe sampler, seed 7, 3 of 4 trials done; maximize code-skill" in dom
    trials = rows(dom, "search")
    assert [re.search(r"tuned\[t=([\d.]+)\]", r).group(1) for r in trials] == [
        "0.31", "0.52", "0.9"]
    assert "★ tuned[t=0.52]" in trials[1] and "passed" in trials[1]
    assert "FAIL" in trials[2] and "chat-skill accuracy 0.1 &lt; 0.5 (min)" in trials[2]


def test_a_tampered_build_fails_the_report(workspace, tmp_path):
    workspace.write(CHAIN)
    assert run(workspace, "make", "chat-code").exit_code == 0
    build = workspace.project().path("chat-code")
    build.chmod(0o755)
    (build / "config.json").chmod(0o644)
    (build / "config.json").write_text((build / "config.json").read_text() + " ")
    page = tmp_path / "r.html"
    result = run(workspace, "report", "chat-code", "-o", str(page), "--no-scan")
    assert result.exit_code == 1
    assert "1 verification problem" in result.output
    assert "config.json: modified" in page.read_text()


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1)
