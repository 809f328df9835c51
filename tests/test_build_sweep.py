"""Making a sweep: every variant built in one pass, each equal to the same merge written alone."""

from __future__ import annotations

import os

import pytest
from conftest import outcomes

from mergebuild.build import engine
from mergebuild.errors import CorruptParentError
from mergebuild.io.hashing import file_xxh128

SWEEP = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {models}/base}}
  chat: {{source: {models}/chat}}
  code: {{source: {models}/code}}
  math: {{source: {models}/math}}
  blend:
    merge_method: ties
    base_model: base
    models:
      - {{model: code, parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: math, parameters: {{weight: 0.5, density: 0.5}}}}
    sweep:
      models.code.density: [0.3, 0.7]
      density: [0.5, 0.9]  # shadowed by every entry's own density: the same recipes
    parameters: {{lambda: 0.8}}
"""

ALONE = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {models}/base}}
  code: {{source: {models}/code}}
  math: {{source: {models}/math}}
  alone:
    merge_method: ties
    base_model: base
    models:
      - {{model: code, parameters: {{weight: 0.5, density: 0.7}}}}
      - {{model: math, parameters: {{weight: 0.5, density: 0.5}}}}
    parameters: {{lambda: 0.8}}
"""


def _weights(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}


def test_sweep_builds_its_variants_in_one_pass(workspace, monkeypatch):
    passes: list[int] = []
    real = engine.run_builds

    def counted(jobs, out_dirs, progress=None):
        passes.append(len(jobs))
        return real(jobs, out_dirs, progress)

    monkeypatch.setattr(engine, "run_builds", counted)
    workspace.write(SWEEP)
    project = workspace.project()
    result = project.make(["blend"])
    names = project.mergefile.nodes["blend"].variants
    assert len(names) == 4
    # The node-level density is shadowed: two names per recipe, each recipe built once.
    assert passes == [2]
    got = outcomes(result)
    assert sorted(got.values()) == ["built", "built", "reused", "reused"]
    assert got["blend[code.density=0.3,density=0.9]"] == "reused"
    assert (project.path("blend[code.density=0.3,density=0.9]")
            == project.path("blend[code.density=0.3,density=0.5]"))
    # Each variant is the merge written alone, byte for byte.
    variant = project.path("blend[code.density=0.7,density=0.5]")
    workspace.write(ALONE)
    alone = workspace.project()
    alone.make(["alone"])
    assert _weights(alone.path("alone")) == _weights(variant)
    assert alone.path("alone") == variant  # the same recipe: the same key, one object


def test_a_second_make_builds_nothing_and_new_points_build_alone(workspace, monkeypatch):
    workspace.write(SWEEP)
    workspace.project().make(["blend"])
    passes: list[int] = []
    real = engine.run_builds
    monkeypatch.setattr(engine, "run_builds",
                        lambda jobs, outs, progress=None: passes.append(len(jobs))
                        or real(jobs, outs, progress))
    again = workspace.project().make(["blend"])
    assert set(outcomes(again).values()) <= {"fresh"} and passes == []
    workspace.write(SWEEP.replace("[0.3, 0.7]", "[0.3, 0.7, 0.9]"))
    more = workspace.project()
    result = more.make()  # the sweep is a default target
    assert passes == [1]  # only the new recipe (two new names)
    assert sum(1 for o in outcomes(result).values() if o == "built") == 1
    states = {s.name: s for s in more.plan(["blend"])}
    assert states["blend"].kind == "sweep" and states["blend"].status == "fresh"


OVER_A_MERGE = """\
version: 1
defaults: {{dtype: bfloat16}}
models:
  base: {{source: {models}/base}}
  instruct: {{source: {models}/instruct}}
  code: {{source: {models}/code}}
  tuned:
    merge_method: task_arithmetic
    base_model: base
    models: [{{model: instruct, parameters: {{weight: 1.0}}}}]
  blend:
    merge_method: ties
    base_model: base
    models:
      - {{model: tuned, parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: code, parameters: {{weight: 0.5, density: 0.5}}}}
    sweep:
      models.code.density: [0.3, 0.7]
"""


def _count_parent_hashes(monkeypatch) -> list[int]:
    hashed: list[int] = []
    real = engine._ParentHasher._hash_mapped

    def counted(self, mapped):
        hashed.append(len(mapped))
        return real(self, mapped)

    monkeypatch.setattr(engine._ParentHasher, "_hash_mapped", counted)
    return hashed


def test_a_pass_hashes_a_store_parent_once_and_records_each_output(workspace, monkeypatch):
    workspace.write(OVER_A_MERGE)
    workspace.project().make(["tuned"])
    hashed = _count_parent_hashes(monkeypatch)
    project = workspace.project()
    result = project.make(["blend"])
    assert sorted(outcomes(result).values()) == ["built", "built", "fresh"]
    parent = project.path("tuned") / "model.safetensors"
    assert hashed == [parent.stat().st_size]  # one parent, one weight file, hashed once
    for name in project.mergefile.nodes["blend"].variants:
        path = project.path(name)
        record = project.store.read_published(path.name)
        weights = path / "model.safetensors"
        assert record.files["model.safetensors"] == (weights.stat().st_size,
                                                     file_xxh128(weights))


def test_a_corrupt_store_parent_stops_the_pass_before_any_variant_is_published(
        workspace, monkeypatch):
    workspace.write(OVER_A_MERGE)
    workspace.project().make(["tuned"])
    project = workspace.project()
    parent = project.path("tuned")
    real = engine.run_builds

    def damaged_after_planning(jobs, out_dirs, progress=None):
        weights = parent / "model.safetensors"
        os.chmod(weights, 0o644)  # objects are read-only
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        return real(jobs, out_dirs, progress)

    monkeypatch.setattr(engine, "run_builds", damaged_after_planning)
    with pytest.raises(CorruptParentError) as caught:
        project.make(["blend"])
    assert (caught.value.parent, caught.value.file) == ("tuned", "model.safetensors")
    assert not parent.exists()
    (moved,) = project.store.quarantined_objects()
    assert moved.name.startswith(parent.name)
    assert [d.name for d in project.store.iter_objects()] == []
    assert not list((workspace.cache / "tmp").iterdir())


# --------------------------------------------------------------------------- select:
# A sweep with select: over the skill family: SLERP from chat (t=0) to code (t=1). Each
# eval reads the first 20 examples of the shipped sets, so an evaluation takes a moment.
SELECTED = """\
version: 1
evals:
  chat-skill: {{kind: accuracy, data: chat.jsonl, max_new_tokens: 8}}
  code-skill: {{kind: accuracy, data: code.jsonl, max_new_tokens: 8}}
  fluency: {{kind: perplexity, data: text.txt, window: 128, stride: 64}}
models:
  chat: {{source: demo://chat, evals: [chat-skill]}}
  code: {{source: demo://code, evals: [code-skill]}}
  blend:
    merge_method: slerp
    base_model: chat
    models: [{{model: chat}}, {{model: code}}]
    parameters: {{t: 0.5}}
    sweep:
      t: {grid}
    select: {{{goal}: {metric}}}
  final:
    merge_method: linear
    models: [{{model: blend, parameters: {{weight: 1.0}}}}]
    dtype: float32
"""


@pytest.fixture
def selecting(tmp_path):
    """write(grid, goal, metric) → a Project over the SELECTED Mergefile in tmp_path."""
    from mergebuild.api import Project
    from mergebuild.sources.skills import SKILL_DATA

    for name, count in (("chat.jsonl", 20), ("code.jsonl", 20), ("text.txt", 12)):
        lines = (SKILL_DATA / name).read_text().splitlines()[:count]
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    def write(grid: str = "[0.0, 1.0]", goal: str = "maximize", metric: str = "code-skill"):
        (tmp_path / "Mergefile").write_text(SELECTED.format(grid=grid, goal=goal,
                                                            metric=metric))
        return Project(tmp_path / "Mergefile", tmp_path / "cache")
    write.root = tmp_path
    return write


def _expected_winner(project, goal: str, value) -> str:
    """The variant the stored scores say wins: best value, the first in grid order on a tie."""
    variants = project.mergefile.nodes["blend"].variants
    values = {v: value(project, v) for v in variants}
    best = (max if goal == "maximize" else min)(values.values())
    return next(v for v in variants if values[v] == best)


def _accuracy(eval_name: str):
    return lambda project, node: project.scores(node)[eval_name]["accuracy"]


def _parent_digest(build, name: str) -> tuple[str, dict]:
    import json

    statement = json.loads((build / "provenance.json").read_text())
    (parent,) = [d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]
                 if d["name"] == name]
    algorithm, value = next(iter(parent["digest"].items()))
    return f"{algorithm}:{value}", parent["annotations"]


def test_select_picks_the_best_scored_variant_and_children_build_on_it(selecting):
    project = selecting()
    before = {s.name: s for s in project.plan(["final"])}
    assert before["blend"].status == "stale"
    assert before["blend"].reasons == [("2 of 2 variants to build; then selects by maximize "
                                        "code-skill")]
    assert before["final"].reasons == ["waits for blend's selection", "new node"]
    assert [t.eval for t in before["blend[t=1.0]"].evaluations] == ["code-skill"]

    result = project.make(["final"], device="cpu")
    assert outcomes(result) == {"blend[t=0.0]": "built", "blend[t=1.0]": "built",
                                "final": "built"}
    # chat and code on their own evals, each variant on the eval select reads
    assert result.evaluations_run == 4
    winner = _expected_winner(project, "maximize", _accuracy("code-skill"))
    assert project.path("blend") == project.path(winner)
    digest = project.store.read_published(project.path(winner).name).digest
    parent, annotations = _parent_digest(project.path("final"), "blend")
    assert parent == digest
    assert annotations["selection"]["selected"] == winner
    assert annotations["selection"]["ranking"][0]["variant"] == winner
    assert project.lineage("blend").name == winner
    (stage,) = project.lineage("final").children
    assert (stage.name, stage.digest) == (winner, digest)
    assert stage.scores["code-skill"] == project.scores(winner)["code-skill"]

    states = {s.name: s for s in project.plan(["final"])}
    value = project.scores(winner)["code-skill"]["accuracy"]
    assert states["blend"].selection.headline() == (
        f"blend → {winner} (maximize code-skill: {value:.4g}, best of 2)")

    again = project.make(["final"], device="cpu")
    assert set(outcomes(again).values()) == {"fresh"}
    assert again.evaluations_run == 0 and again.count("built") == 0

    checked = project.check("blend", device="cpu")  # make --check: the selected variant
    assert (checked.node, checked.ok, checked.differences) == (winner, True, ())


def test_widening_the_grid_builds_and_scores_only_the_new_variant(selecting):
    selecting().make(["final"], device="cpu")
    project = selecting("[0.0, 0.5, 1.0]")
    result = project.make(["final"], device="cpu")
    got = outcomes(result)
    assert got["blend[t=0.5]"] == "built"
    assert got["blend[t=0.0]"] == got["blend[t=1.0]"] == "fresh"
    assert result.evaluations_run == 1
    winner = _expected_winner(project, "maximize", _accuracy("code-skill"))
    assert project.path("blend") == project.path(winner)


def test_minimize_reads_a_new_eval_of_every_variant(selecting):
    selecting().make(["final"], device="cpu")
    project = selecting(goal="minimize", metric="fluency")
    states = {s.name: s for s in project.plan(["final"])}
    # fluency is new to the variants: two evaluations, then the selection
    assert states["blend"].status == "pending"
    assert states["blend"].reasons == ["selection (minimize fluency) waits for 2 evaluations"]
    assert states["final"].reasons[0] == "waits for blend's selection"
    result = project.make(["final"], device="cpu")
    assert result.evaluations_run == 2
    winner = _expected_winner(project, "minimize",
                              lambda p, v: p.scores(v)["fluency"]["perplexity"])
    assert project.path("blend") == project.path(winner)
    assert selecting(goal="minimize", metric="fluency").make(
        ["final"], device="cpu").evaluations_run == 0


def test_a_changed_selection_rebuilds_children_saying_why(selecting):
    first = selecting()
    first.make(["final"], device="cpu")
    was = first.plan(["blend"])[-1].selection.winner
    project = selecting(goal="minimize")  # the same scores, read the other way round
    now = _expected_winner(project, "minimize", _accuracy("code-skill"))
    assert now != was  # chat (t=0) writes no code; code (t=1) does
    final = next(s for s in project.plan(["final"]) if s.name == "final")
    assert final.status == "stale"
    assert final.reasons == [f"selected variant changed: {was} → {now}"]
    result = project.make(["final"], device="cpu")
    assert result.evaluations_run == 0 and outcomes(result)["final"] == "built"
    digest = project.store.read_published(project.path(now).name).digest
    assert _parent_digest(project.path("final"), "blend")[0] == digest


def test_retention_selects_the_variant_keeping_most_of_its_parents(selecting):
    project = selecting(metric="retention")
    assert project.make(["final"], device="cpu").evaluations_run == 6  # 2 parents, 2 × 2

    def mean_share(project, variant):
        shares = [project.scores(variant)[e]["accuracy"] / project.scores(p)[e]["accuracy"]
                  for p, e in (("chat", "chat-skill"), ("code", "code-skill"))]
        return sum(shares) / len(shares)

    winner = _expected_winner(project, "maximize", mean_share)
    assert project.path("blend") == project.path(winner)
    board = project.leaderboard("blend")
    assert board.selected == winner
    assert board.rows[0].value == pytest.approx(mean_share(project, winner))
    assert board.rows[0].worst == pytest.approx(min(
        project.scores(winner)[e]["accuracy"] / project.scores(p)[e]["accuracy"]
        for p, e in (("chat", "chat-skill"), ("code", "code-skill"))))


def test_gc_drops_the_losers_unless_asked_and_they_are_not_rebuilt(selecting):
    project = selecting()
    project.make(["final"], device="cpu")
    winner = project.plan(["blend"])[-1].selection.winner
    (loser,) = [v for v in project.mergefile.nodes["blend"].variants if v != winner]
    loser_dir = project.path(loser)

    kept = project.collect_garbage(keep_variants=True)
    assert kept.removed == () and loser_dir.exists()
    removed = selecting().collect_garbage()
    assert [(g.path, g.why) for g in removed.removed if g.kind == "object"] == [
        (loser_dir, (f"{loser} lost blend's selection (its scores are kept; gc "
                     "--keep-variants keeps it)"))]
    assert not loser_dir.exists() and project.path(winner).exists()

    after = selecting()
    states = {s.name: s for s in after.plan(["final"])}
    assert states[loser].status == "dropped"
    assert states["blend"].selection.winner == winner
    again = after.make(["final"], device="cpu")
    assert again.count("built") == 0 and again.evaluations_run == 0
    assert after.path("final").exists()


def test_a_pinned_loser_survives_gc(selecting):
    project = selecting()
    project.make(["final"], device="cpu")
    winner = project.plan(["blend"])[-1].selection.winner
    (loser,) = [v for v in project.mergefile.nodes["blend"].variants if v != winner]
    project.pin(loser, "keep-me")
    _, record = project.pin("blend")  # a sweep's build is its selected variant's
    assert (record["node"], record["path"]) == (winner, str(project.path(winner)))
    report = selecting().collect_garbage()
    assert [g for g in report.removed if g.kind == "object"] == []
    assert project.path(loser).exists()


def test_metrics_leaderboard_and_plot_from_a_real_make(selecting):
    from cli_process import run_cli

    root = selecting.root
    selecting()
    made = run_cli(["make", "final", "--device", "cpu"], cwd=root, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    project = selecting()
    winner = project.plan(["blend"])[-1].selection.winner
    assert f"selected blend → {winner} (maximize code-skill: " in made.stderr

    planned = run_cli(["plan", "final"], cwd=root)
    (row,) = [line for line in planned.stdout.splitlines() if line.startswith("blend ")]
    assert f"→ {winner} (maximize code-skill: " in row

    shown = run_cli(["metrics", "blend"], cwd=root)
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"blend → {winner} (maximize code-skill): ")
    assert lines[1].split() == ["#", "variant", "t", "objective", "chat-skill", "code-skill"
                                ] or lines[1].split() == ["#", "variant", "t", "objective",
                                                          "code-skill"]
    assert lines[2].split()[:3] == ["1", "*", winner]

    import json

    board = json.loads(run_cli(["metrics", "blend", "--json"], cwd=root).stdout)[0]
    assert board["selected"] == winner
    values = [r["value"] for r in board["leaderboard"]]
    assert values == sorted(values, reverse=True)
    assert values[0] == project.scores(winner)["code-skill"]["accuracy"]

    plotted = run_cli(["metrics", "blend", "--plot", "board.png"], cwd=root)
    assert plotted.returncode == 0 and "wrote board.png" in plotted.stdout
    assert (root / "board.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    kept = run_cli(["gc", "--keep-variants", "--dry-run"], cwd=root)
    assert kept.returncode == 0 and "would free 0 B in 0 items" in kept.stdout
    dropped = run_cli(["gc", "--dry-run"], cwd=root)
    assert "lost blend's selection" in dropped.stdout

    path = run_cli(["path", "blend"], cwd=root)
    assert path.stdout.strip() == str(project.path(winner))

    page = run_cli(["report", "final", "-o", "report.html"], cwd=root)
    assert page.returncode == 0
    html = (root / "report.html").read_text()
    assert "Sweep leaderboards" in html
    assert f"<tr class=selected><td>1</td><td>&#9733; {winner}</td>" in html


def test_a_misspelt_select_eval_is_one_line_with_a_suggestion(selecting):
    from cli_process import run_cli

    from mergebuild.errors import MergefileError

    with pytest.raises(MergefileError):
        selecting(metric="code-skil")  # writes the Mergefile, then fails to read it
    run = run_cli(["plan"], cwd=selecting.root)
    assert run.returncode == 2  # MergefileError's exit code, as for every Mergefile mistake
    (line,) = run.error_lines
    assert "unknown eval 'code-skil'" in line and "did you mean 'code-skill'?" in line


def test_a_removed_loser_selected_again_is_rebuilt_without_evaluating(selecting):
    project = selecting()
    project.make(["final"], device="cpu")
    winner = project.plan(["blend"])[-1].selection.winner
    (loser,) = [v for v in project.mergefile.nodes["blend"].variants if v != winner]
    project.collect_garbage()
    flipped = selecting(goal="minimize")  # the stored scores now select the removed one
    states = {s.name: s for s in flipped.plan(["final"])}
    assert (states[loser].status, states[loser].reasons) == (
        "stale", ["selected by blend; removed by gc"])
    assert states["blend"].reasons == [f"selected {loser}, which gc removed: rebuilt"]
    result = flipped.make(["final"], device="cpu")
    assert outcomes(result) == {loser: "built", winner: "fresh", "final": "built"}
    assert result.evaluations_run == 0
    assert flipped.path("blend") == flipped.path(loser)


def _with_checks(selecting, checks: str):
    """The SELECTED Mergefile with ``checks:`` on the sweep (each variant's own gates)."""
    project = selecting()
    mergefile = selecting.root / "Mergefile"
    mergefile.write_text(mergefile.read_text().replace(
        "    select: {maximize: code-skill}\n",
        f"    select: {{maximize: code-skill}}\n    checks: {checks}\n"))
    from mergebuild.api import Project

    return Project(mergefile, project.store.root)


def test_a_variant_failing_its_checks_is_not_ranked_and_the_best_passing_one_is_selected(
        selecting, capsys):
    from mergebuild.build.events import Reporter
    from mergebuild.report import PlainReporter, leaderboard_lines

    # code (t=1.0) writes code best but keeps no chat skill: its check keeps it out.
    project = _with_checks(selecting, "{chat-skill: {min: 0.5}}")
    result = project.make(["final"], device="cpu", reporter=PlainReporter(show_plan=False))
    assert result.ok
    assert outcomes(result) == {"blend[t=0.0]": "built", "blend[t=1.0]": "built",
                                "final": "built"}
    assert project.scores("blend[t=1.0]")["code-skill"]["accuracy"] > \
        project.scores("blend[t=0.0]")["code-skill"]["accuracy"]
    assert project.path("blend") == project.path("blend[t=0.0]")
    err = capsys.readouterr().err
    chat = project.scores("blend[t=1.0]")["chat-skill"]["accuracy"]
    # reported as failed checks are, one line each, and the make goes on
    assert "excluded blend[t=1.0] from blend's selection: 1 check failed" in err
    assert (f"check failed: blend[t=1.0]: chat-skill accuracy {chat:.4g} < 0.5 (min)"
            in err.splitlines())
    assert "failed blend" not in err

    state = next(s for s in project.plan(["final"]) if s.name == "blend")
    assert state.status == "fresh" and state.selection.winner == "blend[t=0.0]"
    assert state.selection.why().endswith("best of 1; 1 failed its checks")
    board = project.leaderboard("blend")
    assert [(r.variant, r.selected, r.failed) for r in board.rows] == [
        ("blend[t=0.0]", True, None),
        ("blend[t=1.0]", False, f"failed: chat-skill accuracy {chat:.4g} < 0.5 (min)")]
    lines = leaderboard_lines(board)
    assert lines[1].split()[-1] == "checks"
    assert lines[2].split()[-1] == "passed"
    assert lines[3].endswith(f"failed: chat-skill accuracy {chat:.4g} < 0.5 (min)")
    (target,) = project.report(["final"], scan=False)  # the page marks it too
    assert [(r.variant, r.selected, r.failed) for r in target.sweeps] == [
        (r.variant, r.selected, r.failed) for r in board.rows]
    again = project.make(["final"], device="cpu", reporter=Reporter())
    assert again.ok and again.count("built") == 0 and again.evaluations_run == 0


def test_a_sweep_none_of_whose_variants_passes_fails_naming_the_best_failing_one(selecting):
    from cli_process import run_cli

    selecting().make(["blend"], device="cpu")
    project = _with_checks(selecting, "{code-skill: {min: 0.95}}")
    best = project.scores("blend[t=1.0]")["code-skill"]["accuracy"]
    refused = (f"no variant passed its checks; the best failing is blend[t=1.0] (code-skill "
               f"accuracy {best:.4g}, failed: code-skill accuracy {best:.4g} < 0.95 (min))")
    state = next(s for s in project.plan(["final"]) if s.name == "blend")
    assert (state.status, state.reasons) == ("stale", [refused])

    made = run_cli(["make", "final", "--device", "cpu"], cwd=selecting.root, timeout=300)
    assert made.returncode == 1
    assert [line for line in made.stderr.splitlines() if line.startswith("failed ")] == [
        f"failed blend: {refused}"]
    assert "final" not in made.stdout
    kept_going = project.make(["final"], device="cpu", keep_going=True)
    assert {n: o for n, o in outcomes(kept_going).items() if o != "fresh"} == {
        "blend": "failed", "final": "skipped"}
    assert kept_going.evaluations_run == 0 and kept_going.count("built") == 0


def _card_rebuild(build) -> tuple[dict, str]:
    """The excerpt and the command of a build's card's "How to rebuild"."""
    import re

    import yaml

    card = (build / "README.md").read_text()
    excerpt = re.search(r"excerpt holds this node.*?```yaml\n(.*?)```", card, re.DOTALL)
    command = re.search(r"Then run:\s*```sh\n(.*?)\n```", card, re.DOTALL)
    return yaml.safe_load(excerpt.group(1)), command.group(1)


def test_the_excerpts_of_a_variant_and_of_a_child_rebuild_them(selecting, tmp_path):
    import yaml

    from mergebuild.api import Project
    from mergebuild.provenance.statement import read_statement

    project = selecting()
    project.make(["final"], device="cpu")
    winner = project.plan(["blend"])[-1].selection.winner
    (loser,) = [v for v in project.mergefile.nodes["blend"].variants if v != winner]

    def digest(build) -> str:
        return read_statement(build)["predicate"]["buildDefinition"]["internalParameters"][
            "digest"]

    # A variant's excerpt is the merge it is, under the sweep's name: its t set, no grid.
    written, command = _card_rebuild(project.path(loser))
    assert command == "mergebuild -f Mergefile make blend"
    t = project.mergefile.nodes["blend"].points[
        project.mergefile.nodes["blend"].variants.index(loser)]["t"]
    assert sorted(written["models"]) == ["blend", "chat", "code"]
    assert written["models"]["blend"] == {"merge_method": "slerp", "base_model": "chat",
                                          "models": [{"model": "chat"}, {"model": "code"}],
                                          "parameters": {"t": t}}
    # A child's: the variant its sweep selected, under the sweep's name its child reads.
    child, command = _card_rebuild(project.path("final"))
    assert command == "mergebuild -f Mergefile make final"
    assert sorted(child["models"]) == ["blend", "chat", "code", "final"]
    assert child["models"]["blend"]["parameters"] == {
        "t": project.mergefile.nodes["blend"].points[
            project.mergefile.nodes["blend"].variants.index(winner)]["t"]}
    assert yaml.safe_load(project.excerpt("final")) == child  # the API's, from a plan
    # Following each excerpt in an empty directory gives the very same bytes.
    for name, excerpt, build in (("blend", written, project.path(loser)),
                                 ("final", child, project.path("final"))):
        folder = tmp_path / f"again-{name}"
        folder.mkdir()
        (folder / "Mergefile").write_text(yaml.safe_dump(excerpt, sort_keys=False))
        again = Project(folder / "Mergefile", folder / "cache")
        assert again.make([name], device="cpu").ok
        assert digest(again.path(name)) == digest(build)
