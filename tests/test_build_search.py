"""Making a search: a seeded study is reproducible, and resumable from the store (builds and
evaluations counted, never timed); every trial an ordinary build; children get the best."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from mergebuild import cli
from mergebuild.api import Project
from mergebuild.build import engine
from mergebuild.evaluate import loading
from mergebuild.provenance.statement import read_statement
from mergebuild.sources.skills import SKILL_DATA

SEARCHED = """\
version: 1
evals:
  math-skill: {{kind: accuracy, data: math.jsonl, max_new_tokens: 6}}
models:
  base: {{source: demo://base}}
  math: {{source: demo://math, evals: [math-skill]}}
  code: {{source: demo://code}}
  tuned:
    merge_method: linear
    models:
      - {{model: math, parameters: {{weight: 0.5}}}}
      - {{model: code, parameters: {{weight: 0.5}}}}
    search:
      sampler: {sampler}
      trials: {trials}
      seed: {seed}
      space: {{models.math.weight: [0.1, 1.0], models.code.weight: [0.0, 0.6]}}
    select: {{maximize: math-skill}}
  after:
    merge_method: linear
    models: [{{model: tuned, parameters: {{weight: 1.0}}}}]
    dtype: float32
"""


@pytest.fixture
def searched(tmp_path, monkeypatch):
    """write(root, **search) writes a Mergefile in ``root``; ``counts`` holds the engine's
    builds and the models loaded for evaluation."""
    lines = (SKILL_DATA / "math.jsonl").read_text().splitlines()[:12]
    counts = {"builds": 0, "loads": 0}
    real_build, real_load = engine.run_build, loading.load_model

    def build(*args, **kwargs):
        counts["builds"] += 1
        return real_build(*args, **kwargs)

    def load(*args, **kwargs):
        counts["loads"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine, "run_build", build)
    monkeypatch.setattr(loading, "load_model", load)
    monkeypatch.setattr("mergebuild.evaluate.accuracy.load_model", load)

    def write(root, sampler="tpe", trials=3, seed=0):
        root.mkdir(exist_ok=True)
        (root / "math.jsonl").write_text("\n".join(lines) + "\n")
        (root / "Mergefile").write_text(SEARCHED.format(sampler=sampler, trials=trials,
                                                        seed=seed))
        return Project(root / "Mergefile", root / "cache")

    write.counts = counts  # type: ignore[attr-defined]
    write.root = tmp_path  # type: ignore[attr-defined]
    return write


def _trials(project: Project, node: str = "tuned") -> list[str]:
    return [t.name for t in project.study(node).trials]


def _built(result) -> int:
    return sum(1 for r in result.results if r.outcome == "built")


def test_more_trials_reuse_every_trial_and_match_a_fresh_study(searched):
    counts = searched.counts
    first = searched(searched.root / "a", trials=3)
    made = first.make(["tuned"], device="cpu")
    assert made.ok and _built(made) == 3 and counts["builds"] == 3
    # math, once, and each trial on the eval select reads
    assert made.evaluations_run == 4 and counts["loads"] == 4
    three = _trials(first)
    assert len(set(three)) == 3 and all(t.startswith("tuned[math.weight=") for t in three)

    again = searched(searched.root / "a", trials=3).make(["tuned"], device="cpu")
    assert _built(again) == 0 and again.evaluations_run == 0 and counts["builds"] == 3

    before = dict(counts)
    more = searched(searched.root / "a", trials=5)
    states = {s.name: s for s in more.plan(["tuned"])}
    assert states["tuned"].status == "stale"
    assert states["tuned"].reasons[0].startswith("3 of 5 trials done, best tuned[")
    made = more.make(["tuned"], device="cpu")
    # exactly the two new trials: two builds, two evaluation runs; the three replayed
    assert made.ok and _built(made) == 2 and made.evaluations_run == 2
    assert counts["builds"] - before["builds"] == 2 and counts["loads"] - before["loads"] == 2
    five = _trials(more)
    assert five[:3] == three and len(set(five)) == 5

    # A fresh store with trials: 5 runs the very same study: reproducible from the seed.
    fresh = searched(searched.root / "b", trials=5)
    fresh.make(["tuned"], device="cpu")
    assert _trials(fresh) == five
    assert fresh.study("tuned").best.digest == more.study("tuned").best.digest
    assert fresh.path("tuned").name == more.path("tuned").name  # the same key


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
def test_each_sampler_runs_and_a_seed_decides_the_trials(searched, sampler):
    project = searched(searched.root / sampler, sampler=sampler, trials=3)
    made = project.make(["tuned"], device="cpu")
    study = project.study("tuned")
    assert made.ok and study.complete and len(study.trials) == 3
    assert project.path("tuned") == project.path(study.best.name)
    # Another seed asks for other values (the plan shows the first trial, nothing runs).
    other = searched(searched.root / f"{sampler}-seed", sampler=sampler, trials=3, seed=1)
    assert other.study("tuned").next.name != study.trials[0].name
    # The same seed, replayed in another process's worth of state: the same first trial.
    same = searched(searched.root / f"{sampler}-again", sampler=sampler, trials=3)
    assert same.study("tuned").next.name == study.trials[0].name


def test_trials_are_ordinary_builds_and_children_get_the_best(searched):
    project = searched(searched.root / "c", trials=3)
    states = {s.name: s for s in project.plan(["after"])}
    assert states["after"].status == "stale" and states["after"].digest is None
    made = project.make(["after"], device="cpu")
    assert made.ok
    study = project.study("tuned")
    best = study.best
    # each trial has its own key and directory, under its readable name
    paths = {t.name: project.path(t.name) for t in study.trials}
    assert len({p.name for p in paths.values()}) == 3
    assert project.path("tuned") == paths[best.name]
    # the child was built from the selected trial, and its provenance says which and why
    statement = read_statement(project.path("after"))
    dependency = next(d for d in statement["predicate"]["buildDefinition"]
                      ["resolvedDependencies"] if d["name"] == "tuned")
    assert dependency["digest"]["sha256"] == best.digest.removeprefix("sha256:")
    # the study is recorded with the search: sampler, seed, space, every trial, the winner
    record = project.store.refs_of(project.mergefile.path).read("tuned")
    history = record["study"]["history"]
    assert [t["name"] for t in history] == [t.name for t in study.trials]
    assert all(set(t) >= {"params", "key", "digest", "value"} for t in history)
    assert record["study"]["sampler"] == "tpe" and record["study"]["seed"] == 0
    assert record["study"]["best"] == best.name and record["key"] == paths[best.name].name
    assert record["study"]["why"].startswith(f"trial {best.number} has the highest")
    # pin and make --check take the search for its best trial
    assert project.pin("tuned", "best")[1]["key"] == paths[best.name].name
    assert project.check("tuned", device="cpu").ok
    # a trial's excerpt (in its provenance) is the merge it is, under the search's name: its
    # values, no search; a child's holds the best trial so, and rebuilds the child's bytes
    written = yaml.safe_load(project.excerpt(best.name))["models"]["tuned"]
    assert "search" not in written and "select" not in written
    assert written["models"][0]["parameters"]["weight"] == best.point["models.math.weight"]
    child = yaml.safe_load(project.excerpt("after"))
    assert sorted(child["models"]) == ["after", "code", "math", "tuned"]
    assert child["models"]["tuned"] == written
    again = searched.root / "c-again"
    again.mkdir()
    (again / "Mergefile").write_text(yaml.safe_dump(child, sort_keys=False))
    rebuilt = Project(again / "Mergefile", again / "cache")
    assert rebuilt.make(["after"], device="cpu").ok
    assert (read_statement(rebuilt.path("after"))["predicate"]["buildDefinition"]
            ["internalParameters"]["digest"]) == (read_statement(project.path("after"))
                                                  ["predicate"]["buildDefinition"]
                                                  ["internalParameters"]["digest"])
    # the release-review page shows the study: every trial in the order asked, the winner
    page = searched.root / "c" / "report.html"
    assert cli.invoke(["-f", str(project.mergefile.path), "--cache-dir",
                       str(searched.root / "c" / "cache"), "report", "after", "-o",
                       str(page), "--no-scan"]) == 0
    html = page.read_text()
    assert ('<p data-search="tuned"><b>tuned</b>: tpe sampler, seed 0, 3 of 3 trials done; '
            "maximize math-skill<br>") in html
    table = re.search(r'<table data-table="search">.*?<tbody>(.*?)</tbody>', html, re.DOTALL)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row)
             for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(1))]
    assert [(c[0], c[1].removeprefix("&#9733; "), c[3]) for c in cells] == [
        (str(t.number), t.name, f"{t.value:.4g}") for t in study.trials]
    assert [c[1].startswith("&#9733; ") for c in cells] == [
        t.name == best.name for t in study.trials]
    assert f"<tr class=selected><td>{best.number}</td><td>&#9733; {best.name}</td>" in html
    # the child's provenance carries the whole study: why this trial, what else was tried
    selection = dependency["annotations"]["selection"]
    assert selection["selected"] == best.name
    assert [t["name"] for t in selection["study"]["history"]] == [t.name for t in study.trials]
    assert selection["study"]["sampler"] == "tpe" and "density" not in selection["study"]["space"]


def test_gc_drops_losing_trials_and_a_resumed_study_does_not_rebuild_them(searched):
    project = searched(searched.root / "gc", trials=3)
    project.make(["tuned"], device="cpu")
    study = project.study("tuned")
    losers = [t.name for t in study.trials if t.name != study.best.name]
    paths = {t.name: project.path(t.name) for t in study.trials}
    project.collect_garbage(keep_variants=True)
    assert all(path.is_dir() for path in paths.values())
    project.collect_garbage()
    assert paths[study.best.name].is_dir()
    assert not any(paths[name].exists() for name in losers)
    # a trial is a node: a new Project finds it by name (the study replayed from the store)
    again = searched(searched.root / "gc", trials=3)
    assert again.path(study.best.name) == paths[study.best.name]
    states = {s.name: s for s in again.plan(["tuned"])}
    assert {states[name].status for name in losers} == {"dropped"}
    assert states["tuned"].status == "fresh"
    # one more trial: the dropped ones are replayed from their scores, not rebuilt
    counts, before = searched.counts, dict(searched.counts)
    more = searched(searched.root / "gc", trials=4)
    made = more.make(["tuned"], device="cpu")
    assert made.ok and _built(made) == 1 and made.evaluations_run == 1
    assert counts["builds"] - before["builds"] == 1
    assert [t.name for t in more.study("tuned").trials][:3] == [t.name for t in study.trials]


def test_cli_make_plan_and_metrics(searched, capsys):
    searched(searched.root / "cli", trials=3)
    args = ["-f", str(searched.root / "cli" / "Mergefile"), "--cache-dir",
            str(searched.root / "cli" / "cache")]
    assert cli.invoke([*args, "make", "tuned", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("built tuned[") == 3 and "selected tuned → tuned[" in err
    assert cli.invoke([*args, "plan", "tuned"]) == 0
    out = capsys.readouterr()
    assert "3 of 3 trials done, best tuned[" in out.out + out.err
    assert cli.invoke([*args, "plan", "tuned", "--json"]) == 0
    planned = {s["node"]: s for s in json.loads(capsys.readouterr().out)}
    assert planned["tuned"]["study"]["done"] == 3
    assert planned["tuned"]["selection"]["selected"] == planned["tuned"]["study"]["best"]
    assert cli.invoke([*args, "metrics", "tuned"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tuned: tpe search (seed 0), 3 of 3 trials done, best tuned[")
    assert lines[1].startswith("tuned → tuned[") and "(maximize math-skill)" in lines[1]
    places = [line.split()[0] for line in lines[3:]]
    assert places == ["1", "2", "3"] and "* tuned[" in lines[3]
    assert cli.invoke([*args, "metrics", "tuned", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["search"]["done"] == 3 and len(row["search"]["history"]) == 3
    assert [r["place"] for r in row["leaderboard"]] == [1, 2, 3]
    assert row["selected"] == row["search"]["best"] == row["leaderboard"][0]["variant"]
    # a trial is a node the CLI knows by its name, in a new process
    best = row["search"]["best"]
    assert cli.invoke([*args, "path", best]) == 0
    assert capsys.readouterr().out.strip().endswith(
        next(t["key"] for t in row["search"]["history"] if t["name"] == best))


def test_trials_failing_their_checks_are_not_ranked(searched):
    root = searched.root / "checks"
    project = searched(root, trials=2)
    mergefile = root / "Mergefile"
    # a bound no trial meets: each is built and scored, then kept out of the ranking
    mergefile.write_text(mergefile.read_text().replace(
        "    select: {maximize: math-skill}",
        "    select: {maximize: math-skill}\n    checks: {math-skill: {min: 2.0}}"))
    project = Project(mergefile, root / "cache")
    made = project.make(["tuned"], device="cpu", keep_going=True)
    assert _built(made) == 2 and not made.ok
    failed = next(r for r in made.results if r.name == "tuned")
    # refused as a sweep none of whose variants passes: the best failing trial named
    assert failed.outcome == "failed"
    assert failed.detail.startswith("no trial passed its checks; the best failing is tuned[")
    study = project.study("tuned")
    assert study.complete and study.best is None
    # each trial keeps its value (shown), and why it is out of the ranking
    assert all(t.value is not None and t.excluded == f"failed: math-skill accuracy "
               f"{t.value:.4g} < 2 (min)" for t in study.trials)
    state = next(s for s in project.plan(["tuned"]) if s.name == "tuned")
    assert state.status == "stale" and state.reasons == [failed.detail]
    assert _built(project.make(["tuned"], device="cpu", keep_going=True)) == 0
    board = project.leaderboard("tuned")
    assert board.selected is None and board.refused == failed.detail
    assert {r.failed for r in board.rows} == {t.excluded for t in study.trials}
