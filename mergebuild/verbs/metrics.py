"""Scores, retention and check verdicts of built nodes, read from the store (no evaluation
runs); the retention chart; and ``mergebuild eval``, which scores nodes already built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebuild.build.evaluation import Evaluations
from mergebuild.build.events import Reporter
from mergebuild.errors import MergebuildError
from mergebuild.evaluate.definition import EVALUATOR_VERSION
from mergebuild.plan.evaluations import (
    CheckOutcome,
    RetentionRow,
    apply_checks,
    eval_digests,
    required_evals,
    retained_ancestors,
    retention,
)
from mergebuild.plan.selection import choose, rank, retention_range
from mergebuild.plan.selection import measure as measure_of
from mergebuild.plan.staleness import NodeState
from mergebuild.provenance.lineage import LineageNode
from mergebuild.sources.resolve import materialize
from mergebuild.spec.graph import Dag, topological_order
from mergebuild.spec.model import Mergefile, SearchSpec, SweepSpec
from mergebuild.spec.sweep import format_value
from mergebuild.store.objects import Store
from mergebuild.store.results import ResultStore

__all__ = ["Leaderboard", "LeaderboardRow", "NodeMetrics", "collect_metrics", "evaluate_nodes",
           "leaderboard", "leaderboard_json", "metrics_json", "plot_leaderboard",
           "plot_retention", "with_scores"]

Scores = dict[str, dict[str, float]]


@dataclass(frozen=True)
class NodeMetrics:
    """What the store knows of one node's current model: its scores per eval, what it
    retains of each scored ancestor, its checks, and the scores of its previous build."""

    node: str
    digest: str | None
    scores: Scores
    retention: list[RetentionRow] = field(default_factory=list)
    checks: list[CheckOutcome] = field(default_factory=list)
    previous_digest: str | None = None
    previous: Scores = field(default_factory=dict)


class _Known:
    """Scores by node from the store, for the digests the plan gives."""

    def __init__(self, mergefile: Mergefile, graph: Dag, store: Store,
                 states: Mapping[str, NodeState]) -> None:
        self.mergefile, self.graph, self.states = mergefile, graph, states
        self.results = ResultStore(store)
        self.digests = eval_digests(mergefile)

    def digest(self, node: str) -> str | None:
        state = self.states.get(node)
        return state.digest if state is not None and state.status in (
            "source", "fresh", "dropped") else None

    def at(self, digest: str | None, names: Mapping[str, str]) -> Scores:
        """{eval: metrics} stored for model ``digest``, for eval ``names`` {name: digest}."""
        out: Scores = {}
        if digest is None:
            return out
        for name, eval_digest in names.items():
            record = self.results.read(digest, eval_digest, EVALUATOR_VERSION)
            if record is not None:
                out[name] = {k: float(v) for k, v in record["metrics"].items()}
        return out

    def scores(self, node: str) -> Scores:
        state = self.states.get(node)
        if state is not None and state.selection is not None and state.digest is not None:
            node = state.selection.winner  # a sweep is scored as the variant it selected
        names = required_evals(self.mergefile, self.graph, node)
        return self.at(self.digest(node), {n: self.digests[n] for n in names})

    def previous(self, node: str) -> tuple[str | None, Scores]:
        """The scores of the build before the current one, as the node's history has them."""
        current = self.digest(node)
        for entry in reversed(self.results.history(node)):
            if entry.get("digest") != current:
                return entry["digest"], self.at(entry["digest"], entry.get("evals") or {})
        return None, {}


def scored_nodes(mergefile: Mergefile, graph: Dag) -> list[str]:
    """The nodes that are scored on something, in build order."""
    return [n for n in topological_order(graph)
            if n in mergefile.nodes and required_evals(mergefile, graph, n)]


def collect_metrics(mergefile: Mergefile, graph: Dag, store: Store,
                    states: list[NodeState], nodes: list[str]) -> list[NodeMetrics]:
    """Each node's `NodeMetrics` (``states``: a plan covering the nodes and their ancestors)."""
    known = _Known(mergefile, graph, store, {s.name: s for s in states})
    out = []
    for node in nodes:
        previous_digest, previous = known.previous(node)
        out.append(NodeMetrics(
            node=node, digest=known.digest(node), scores=known.scores(node),
            retention=retention(mergefile, graph, node, known.scores),
            checks=apply_checks(mergefile, graph, node, known.scores),
            previous_digest=previous_digest, previous=previous))
    return out


def metrics_json(table: list[NodeMetrics], diff: bool = False) -> list[dict[str, Any]]:
    """The table as plain JSON (``mergebuild metrics --json``)."""
    rows = []
    for m in table:
        row: dict[str, Any] = {
            "node": m.node, "digest": m.digest, "scores": m.scores,
            "retention": [{"ancestor": r.ancestor, "eval": r.eval, "metric": r.metric,
                           "ancestor_value": r.ancestor_value, "value": r.value,
                           "retained": r.ratio} for r in m.retention],
            "checks": [{"check": c.describe(), "passed": c.passed} for c in m.checks],
        }
        if diff:
            row["previous"] = {"digest": m.previous_digest, "scores": m.previous}
        rows.append(row)
    return rows


@dataclass(frozen=True)
class LeaderboardRow:
    """One variant of a sweep: its place, swept values, the value its sweep's ``select:``
    ranks by (``worst``: retention's lowest share), every stored score, and the checks it
    failed (``failed``: it is kept out of the ranking, placed after those that passed)."""

    place: int
    variant: str
    point: Mapping[str, Any]  # swept path as written → value
    value: float | None
    worst: float | None
    scores: Scores
    selected: bool
    failed: str | None = None  # e.g. "failed: code-skill accuracy 0.4 < 0.5 (min)"


@dataclass(frozen=True)
class Leaderboard:
    """A sweep's variants ranked by its ``select:`` (grid order without one).

    ``selected`` is the variant the sweep stands for once every variant is built and
    scored (None until then: the ranking is of what is known so far).
    """

    sweep: str
    goal: str | None  # "maximize" | "minimize"
    metric: str | None  # as written: an eval, EVAL.METRIC or retention
    measure: str | None  # what the value is, e.g. "code-skill accuracy"
    rows: tuple[LeaderboardRow, ...]
    selected: str | None
    why: str | None
    refused: str | None = None  # why nothing is selected: no variant passed its checks

    @property
    def paths(self) -> list[str]:
        return list(self.rows[0].point) if self.rows else []


def leaderboard(mergefile: Mergefile, graph: Dag, store: Store,
                states: list[NodeState], sweep: str) -> Leaderboard:
    """``sweep``'s leaderboard from the store's scores (``states``: a plan of the sweep)."""
    spec = mergefile.nodes[sweep]
    assert isinstance(spec, SweepSpec)
    by_name = {s.name: s for s in states}
    known = _Known(mergefile, graph, store, by_name)
    points = dict(zip(spec.variants, spec.points, strict=True))
    state = by_name.get(sweep)
    resolved = state.selection if state is not None and state.digest is not None else None
    if spec.select is None:
        rows = tuple(LeaderboardRow(place=i, variant=v, point=points[v], value=None,
                                    worst=None, scores=known.scores(v), selected=False)
                     for i, v in enumerate(spec.variants, start=1))
        return Leaderboard(sweep, None, None, None, rows, None, None)
    selection = choose(mergefile, graph, sweep, known.scores)
    rows = []
    for ranked in selection.ranking:
        rows.append(LeaderboardRow(
            place=ranked.place, variant=ranked.variant, point=points[ranked.variant],
            value=ranked.value, worst=selection.worst.get(ranked.variant),
            scores=known.scores(ranked.variant),
            selected=resolved is not None and resolved.winner == ranked.variant,
            failed=ranked.failed))
    return Leaderboard(sweep, spec.select.goal, spec.select.metric, selection.measure,
                       tuple(rows), resolved.winner if resolved else None,
                       resolved.why() if resolved else None, _refused(state))


def search_leaderboard(mergefile: Mergefile, graph: Dag, store: Store,
                       states: list[NodeState], search: str) -> Leaderboard:
    """A search's trials as a sweep's leaderboard (``states``: a plan of the search, whose
    state holds the study): ranked by the values told to the sampler, ties to the earlier
    trial; a trial kept out of the ranking (a failed check) after the rest, marked."""
    by_name = {s.name: s for s in states}
    state = by_name[search]
    spec = mergefile.nodes[search]
    assert isinstance(spec, SearchSpec)
    known = _Known(mergefile, graph, store, by_name)
    study = state.study
    trials = {t.name: t for t in study.trials} if study is not None else {}
    resolved = state.selection if state.digest is not None else None
    values = {name: t.value for name, t in trials.items()}
    failed = {name: t.excluded for name, t in trials.items() if t.excluded is not None}
    rows = []
    for ranked in rank(spec.select, list(trials), values, failed):
        worst = None
        if spec.select.metric == "retention" and ranked.value is not None:
            found = retention_range(mergefile, graph, ranked.variant, known.scores)
            worst = None if found is None else found[1]
        rows.append(LeaderboardRow(
            place=ranked.place, variant=ranked.variant, point=trials[ranked.variant].point,
            value=ranked.value, worst=worst, scores=known.scores(ranked.variant),
            selected=resolved is not None and resolved.winner == ranked.variant,
            failed=ranked.failed))
    measure = measure_of(mergefile, spec.select, list(trials), known.scores)
    return Leaderboard(search, spec.select.goal, spec.select.metric, measure, tuple(rows),
                       resolved.winner if resolved else None,
                       resolved.why() if resolved else None, _refused(state))


def _refused(state: NodeState | None) -> str | None:
    """Why a sweep or search planned with its scores all known selects nothing."""
    if state is None or state.selection is None or state.digest is not None:
        return None
    return state.selection.refused()


def leaderboard_json(board: Leaderboard) -> dict[str, Any]:
    """The leaderboard as plain JSON (``mergebuild metrics SWEEP --json``)."""
    return {
        "node": board.sweep, "select": ({"goal": board.goal, "metric": board.metric,
                                          "measure": board.measure} if board.goal else None),
        "selected": board.selected, "why": board.why, "refused": board.refused,
        "leaderboard": [{"place": r.place, "variant": r.variant, "point": dict(r.point),
                         "value": r.value, "min": r.worst, "selected": r.selected,
                         "failed": r.failed, "scores": r.scores} for r in board.rows],
    }


def plot_leaderboard(board: Leaderboard, path: Path) -> Path:
    """The select objective against each swept parameter, one subplot per swept path (the
    selected variant ringed); PNG or SVG by ``path``'s suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in board.rows if r.value is not None]
    if board.goal is None or not shown:
        raise MergebuildError(f"nothing to plot: no variant of '{board.sweep}' has a value of "
                              "its select: yet" if board.goal else
                              f"nothing to plot: '{board.sweep}' has no select:",
                              node=board.sweep,
                              hint=f"run 'mergebuild make {board.sweep}'" if board.goal
                              else "add select: {maximize: EVAL} to the sweep")
    paths = board.paths
    fig, axes = plt.subplots(1, len(paths), figsize=(max(5.5, 4.2 * len(paths)), 3.8), squeeze=False)
    for ax, swept in zip(axes[0], paths, strict=True):
        values = [r.point[swept] for r in shown]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:  # categories, in the order the grid lists them
            order = list(dict.fromkeys(format_value(r.point[swept]) for r in board.rows))
            xs = [float(order.index(format_value(v))) for v in values]
            ax.set_xticks(range(len(order)), order)
        ax.scatter(xs, [r.value for r in shown], color="tab:blue")
        for x, row in zip(xs, shown, strict=True):
            if row.selected:
                ax.scatter([x], [row.value], s=160, facecolors="none", edgecolors="tab:red",
                           linewidths=2, label=f"selected: {row.variant}")
        ax.set_xlabel(swept)
        ax.set_ylabel(str(board.measure))
        if any(r.selected for r in shown):
            ax.legend(fontsize="small")
    fig.suptitle(f"{board.sweep}: {board.goal} {board.measure}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_nodes(mergefile: Mergefile, graph: Dag, store: Store,
                   states: list[NodeState], nodes: list[str], reporter: Reporter,
                   device: str | None = None) -> Evaluations:
    """Run each node's pending evals on its current model (a built node or an available
    source; nothing is built), and, for a retain check, its scored ancestors' own evals."""
    by_name = {s.name: s for s in states}
    evaluations = Evaluations(mergefile, graph, store, reporter, device)
    wanted: dict[str, None] = {}
    for node in nodes:
        wanted.update(dict.fromkeys(retained_ancestors(mergefile, graph, node)))
        wanted.setdefault(node)
    for node in wanted:
        state = by_name[node]
        if state.status not in ("source", "fresh") or state.digest is None:
            why = "; ".join(state.reasons) or state.status
            raise MergebuildError(f"not built ({why}); 'eval' builds nothing", node=node,
                                  hint=f"run 'mergebuild make {node}'")
        evaluations.know(node, state.digest)
        if any(t.status == "pending" for t in state.evaluations):
            directory = (materialize(state.source, store) if state.source is not None
                         else state.path)
            evaluations.ensure(node, state.digest, directory)
    return evaluations


def plot_retention(table: list[NodeMetrics], path: Path, retain: Mapping[str, float]) -> Path:
    """A bar chart of what each node keeps of each ancestor's eval (%), one group per node,
    with each node's retain threshold as a dashed line; PNG or SVG by ``path``'s suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in table if any(r.ratio is not None for r in m.retention)]
    if not shown:
        raise MergebuildError("nothing to plot: no node has scores to compare with an "
                              "ancestor's", hint="run 'mergebuild make' or 'mergebuild eval'")
    labels = sorted({f"{r.eval} ({r.ancestor})" for m in shown for r in m.retention})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shown) * max(1, len(labels)) / 2), 4.5))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = []
        for m in shown:
            ratio = next((r.ratio for r in m.retention
                          if f"{r.eval} ({r.ancestor})" == label), None)
            values.append(100 * ratio if ratio is not None and ratio != float("inf") else 0)
        ax.bar([x + i * width for x in range(len(shown))], values, width, label=label)
    for x, m in enumerate(shown):
        if m.node in retain:
            ax.hlines(100 * retain[m.node], x - width / 2, x + 0.8 - width / 2,
                      colors="black", linestyles="dashed")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shown))], [m.node for m in shown])
    ax.set_ylabel("retained (% of the ancestor's score)")
    ax.set_title("What each merge keeps of its ancestors' skills")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def with_scores(node: LineageNode, store: Store) -> LineageNode:
    """The lineage tree with each stage's stored scores: what each node name was scored on
    as these very bytes (its history in the store), for ``lineage``'s scores per stage."""
    results = ResultStore(store)
    children = tuple(with_scores(child, store) for child in node.children)
    scores: Scores = {}
    for entry in results.history(node.name):
        if entry.get("digest") == node.digest:
            for name, eval_digest in (entry.get("evals") or {}).items():
                record = results.read(node.digest, eval_digest, EVALUATOR_VERSION)
                if record is not None:
                    scores[name] = {k: float(v) for k, v in record["metrics"].items()}
    return replace(node, children=children, scores=scores)


def added_evaluations(store: Store, node: str, build: Path) -> tuple[Path, ...]:
    """The attestation of the evals ``node``'s build was scored on after it was built (those
    its object's own attestation does not list), written beside it in the store keyed by its
    digest and content; ``()`` when there are none. Export and push carry it along."""
    import hashlib
    import json

    from mergebuild.io.atomic import write_bytes_atomic
    from mergebuild.provenance.attestation import build_attestation
    from mergebuild.provenance.statement import (
        ADDED_EVALUATION_FILE,
        DESCRIPTIVE_FILES,
        DIRECTORY_SUBJECT,
        EVALUATION_FILE,
        dumps_statement,
        read_statement,
        subject_files,
    )

    statement = read_statement(build)
    digest = statement["predicate"]["buildDefinition"]["internalParameters"]["digest"]
    inside: set[str] = set()
    if (build / EVALUATION_FILE).is_file():
        own = json.loads((build / EVALUATION_FILE).read_text(encoding="utf-8"))
        inside = {f"{algo}:{hexd}" for c in own["predicate"]["configuration"]
                  for algo, hexd in c["digest"].items()}
    results = ResultStore(store)
    evals: dict[str, Any] = {}
    for entry in results.history(node):
        if entry.get("digest") != digest:
            continue
        for name, eval_digest in (entry.get("evals") or {}).items():
            record = results.read(digest, eval_digest, EVALUATOR_VERSION)
            if record is None or f"sha256:{eval_digest}" in inside:
                continue
            identity = record["definition"]
            evals[name] = {"digest": f"sha256:{eval_digest}", "kind": identity["kind"],
                           "params": identity["params"], "data": identity["data"],
                           "declared": False, "metrics": record["metrics"]}
    if not evals:
        return ()
    outputs = {name: (sha, size or 0) for name, (sha, size) in subject_files(statement).items()
               if name not in DESCRIPTIVE_FILES and name != DIRECTORY_SUBJECT}
    data = dumps_statement(build_attestation(
        outputs, {"evaluator": EVALUATOR_VERSION, "evals": evals, "checks": []}))
    folder = (results.root / "attested" / digest.replace(":", "-")
              / hashlib.sha256(data).hexdigest()[:16])
    path = folder / ADDED_EVALUATION_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    return (path,)
