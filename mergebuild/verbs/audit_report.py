"""``mergebuild report``: one self-contained HTML page for release review (no network: inline
CSS and SVG only) — the lineage drawn, stages, sources, verification, licences and warnings."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.io.dtypes import FLOAT_CODES
from mergebuild.provenance.lineage import LineageNode, format_parameters, hub_id, iter_lineage
from mergebuild.provenance.statement import short_digest

__all__ = ["Evaluation", "ReportTarget", "SearchStudy", "SearchTrial", "SweepRow",
           "nonfinite_tensors", "render_report"]


@dataclass(frozen=True)
class Evaluation:
    """One score of one model: ``retention`` is the score over the ancestor's own (when the
    eval is an ancestor's specialty), ``passed`` a check's verdict (None: no check)."""

    model: str
    eval: str
    score: float
    ancestor: str | None = None
    ancestor_score: float | None = None
    retention: float | None = None
    passed: bool | None = None


@dataclass(frozen=True)
class SweepRow:
    """One variant of a sweep, as its leaderboard lists it."""

    sweep: str
    variant: str
    parameters: Mapping[str, Any]
    score: float | None
    selected: bool = False
    place: int | None = None  # its rank by the sweep's select: (None: ranked by score)
    failed: str | None = None  # the checks it failed (kept out of the ranking)


@dataclass(frozen=True)
class SearchTrial:
    """One trial of a search's study, in the order the sampler asked for it."""

    number: int
    name: str
    parameters: Mapping[str, Any]
    objective: float | None
    selected: bool = False
    failed: str | None = None  # the checks it failed (kept out of the ranking)


@dataclass(frozen=True)
class SearchStudy:
    """A search's study as the report shows it: how it was run, and every trial done."""

    search: str
    sampler: str
    seed: int
    trials: int  # asked for
    select: str  # e.g. "maximize math-skill"
    rows: tuple[SearchTrial, ...]
    why: str | None = None  # why the selected trial won (None: none selected yet)


@dataclass(frozen=True)
class ReportTarget:
    """What the report shows of one target build.

    Attributes:
        name: the node.
        directory: its build.
        lineage: its lineage tree (from its provenance).
        problems: what ``verify`` found (empty: verified).
        files: files re-hashed by ``verify``.
        signature: what is known of a signature ("unsigned", or a description).
        card: the presented card's Hub metadata.
        licences: {parent: licence or None}.
        warnings: licence warnings, non-finite tensors, anything a reviewer must read.
        evaluations: scores (when the Mergefile declares evaluations).
        sweeps: leaderboard rows (when a sweep chose a variant).
        searches: the studies of the searches the target is or builds on.
    """

    name: str
    directory: Path
    lineage: LineageNode
    problems: tuple[str, ...]
    files: int
    signature: str
    card: Mapping[str, Any]
    licences: Mapping[str, str | None]
    warnings: tuple[str, ...]
    evaluations: tuple[Evaluation, ...] = field(default=())
    sweeps: tuple[SweepRow, ...] = field(default=())
    searches: tuple[SearchStudy, ...] = field(default=())


def nonfinite_tensors(directory: Path) -> list[str]:
    """``"name: N NaN, M Inf"`` for every floating tensor of a build that holds any, read one
    tensor at a time (memory bounded by the largest tensor)."""
    import torch

    found = []
    with CheckpointReader(directory) as reader:
        for name, info in reader.tensors.items():
            if info.dtype not in FLOAT_CODES:
                continue
            tensor = reader.load(name)
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            if nan or inf:
                found.append(f"{name}: {nan} NaN, {inf} Inf")
    return found


# --------------------------------------------------------------------------- the page

_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d8dde6;--ok:#1a7f37;--bad:#c62828;--warn:#9a6700;
--src:#eef4ff;--srcb:#6b8fd6;--node:#f3fbf3;--nodeb:#4f9a5a;--tgt:#fff7e6;--tgtb:#d18b00}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
color:var(--fg);margin:0;background:#fafbfc}header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#c5cbd6}
main{padding:8px 28px 40px;max-width:1280px}section.target{background:#fff;border:1px solid
var(--line);border-radius:8px;padding:4px 20px 16px;margin:18px 0}h2{font-size:18px;margin:14px 0
6px}h3{font-size:15px;margin:18px 0 6px;color:#2c3444}table{border-collapse:collapse;width:100%;
margin:4px 0 8px}th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;
vertical-align:top}th{background:#f2f4f7;font-weight:600}code{font:12px ui-monospace,SFMono-Regular,
Menlo,monospace;background:#f2f4f7;padding:1px 4px;border-radius:3px}.badge{display:inline-block;
padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}.ok{background:
var(--ok)}.bad{background:var(--bad)}.warn{background:var(--warn)}.muted{color:var(--muted)}
ul.warnings li{color:var(--warn)}ul.problems li{color:var(--bad)}.graph{overflow-x:auto;border:1px
solid var(--line);border-radius:6px;background:#fcfdff}svg text{font-family:system-ui,sans-serif}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.selected td{background:#fff7e6}
"""


def render_report(targets: Sequence[ReportTarget], *, title: str, generated: str) -> str:
    """The whole page: one section per target, each with its graph, stages, sources,
    verification, licences, evaluations, sweeps and warnings."""
    body = [f"<header><h1>{_e(title)}</h1><p>Release review generated by mergebuild on "
            f"{_e(generated)} &middot; {len(targets)} target{'s' * (len(targets) != 1)}</p>"
            "</header><main>", _summary(targets)]
    for target in targets:
        body.append(_target_section(target))
    body.append("</main>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def _summary(targets: Sequence[ReportTarget]) -> str:
    rows = []
    for t in targets:
        verified = _badge("verified", "ok") if not t.problems else _badge(
            f"{len(t.problems)} problem{'s' * (len(t.problems) != 1)}", "bad")
        warn = _badge(f"{len(t.warnings)} warning{'s' * (len(t.warnings) != 1)}", "warn") \
            if t.warnings else _badge("no warnings", "ok")
        rows.append([f'<a href="#t-{_e(t.name)}">{_e(t.name)}</a>', _e(t.lineage.method or "?"),
                     f"<code>{_e(short_digest(t.lineage.digest))}</code>", verified,
                     _e(t.signature), warn])
    return "<h2>Summary</h2>" + _table(
        ["Target", "Method", "Digest", "Verification", "Signature", "Warnings"], rows,
        "summary")


def _target_section(t: ReportTarget) -> str:
    nodes = list(iter_lineage(t.lineage))
    stages = [n for n in nodes if n.is_build]
    sources = [n for n in nodes if not n.is_build]
    parts = [f'<section class="target" id="t-{_e(t.name)}"><h2>{_e(t.name)}</h2>',
             f'<p class="muted">Build <code>{_e(str(t.directory))}</code> &middot; content '
             f'digest <code>{_e(t.lineage.digest)}</code></p>',
             "<h3>Lineage</h3>", f'<div class="graph">{lineage_svg(t.lineage)}</div>',
             "<h3>Stages</h3>",
             _table(["Stage", "Method", "Parameters", "Parents", "Digest"], [
                 [f"<b>{_e(s.name)}</b>", _e(s.method or "?"),
                  _e(format_parameters(s.params, max_value=80)) or "&mdash;",
                  "<br>".join(f"{_e(p.role or 'parent')}: <code>{_e(_display(p))}</code>"
                              for p in s.children),
                  f"<code>{_e(short_digest(s.digest))}</code>"] for s in stages], "stages"),
             "<h3>Sources</h3>",
             _table(["Source", "Kind", "Location", "Revision", "Commit", "Digest"], [
                 [f"<b>{_e(s.name)}</b>", _e(s.kind), f"<code>{_e(_display(s, uri=True))}</code>",
                  _code(s.revision), _code(s.commit[:12] if s.commit else None),
                  f"<code>{_e(short_digest(s.digest))}</code>"] for s in sources], "sources"),
             "<h3>Verification and signature</h3>", _verification(t),
             "<h3>Card and licences</h3>", _card(t)]
    if t.evaluations:
        parts += ["<h3>Evaluation</h3>", _evaluations(t.evaluations)]
    if t.sweeps:
        parts += ["<h3>Sweep leaderboards</h3>", _sweeps(t.sweeps)]
    if t.searches:
        parts += ["<h3>Search studies</h3>", _searches(t.searches)]
    parts += ["<h3>Warnings</h3>", _warnings(t.warnings), "</section>"]
    return "".join(parts)


def _verification(t: ReportTarget) -> str:
    if t.problems:
        status = _badge("FAILED", "bad") + f" {len(t.problems)} problem(s):"
        items = "".join(f"<li>{_e(p)}</li>" for p in t.problems)
        return f'<p data-verified="false">{status}</p><ul class="problems">{items}</ul>'
    return (f'<p data-verified="true">{_badge("verified", "ok")} every one of {t.files} files '
            f"re-hashed against <code>provenance.json</code>, and the embedded chain of "
            f"{sum(1 for n in iter_lineage(t.lineage) if n.is_build)} stage(s) holds together."
            f"</p><p>Signature: {_e(t.signature)}</p>")


def _card(t: ReportTarget) -> str:
    meta = [[_e(k), _e(", ".join(map(str, v)) if isinstance(v, list) else str(v))]
            for k, v in t.card.items()]
    licences = [[f"<code>{_e(k)}</code>", _code(v) if v else _badge("unknown", "warn")]
                for k, v in t.licences.items()]
    return (_table(["Card metadata", "Value"], meta, "card")
            + _table(["Parent", "Licence"], licences, "licences"))


def _evaluations(evaluations: Iterable[Evaluation]) -> str:
    rows = []
    for e in evaluations:
        verdict = "" if e.passed is None else _badge("pass" if e.passed else "FAIL",
                                                     "ok" if e.passed else "bad")
        rows.append([_e(e.model), _e(e.eval), _num(e.score), _e(e.ancestor or ""),
                     _num(e.ancestor_score),
                     "" if e.retention is None else f"{e.retention * 100:.1f}%", verdict])
    return _table(["Model", "Eval", "Score", "Ancestor", "Ancestor's score", "Retention",
                   "Check"], rows, "evaluations", numeric={2, 4, 5})


def _sweeps(rows: Iterable[SweepRow]) -> str:
    out = []
    by_sweep: dict[str, list[SweepRow]] = {}
    for row in rows:
        by_sweep.setdefault(row.sweep, []).append(row)
    for sweep, entries in by_sweep.items():
        ranked = sorted(entries, key=lambda r: (r.place is None, r.place or 0,
                                                r.score is None, -(r.score or 0.0)))
        checked = any(r.failed for r in ranked)
        body = [[str(i + 1), ("&#9733; " if r.selected else "") + _e(r.variant),
                 _e(format_parameters(r.parameters)), _num(r.score),
                 *([_verdict(r.failed)] if checked else [])]
                for i, r in enumerate(ranked)]
        out.append(f"<p><b>{_e(sweep)}</b></p>" + _table(
            ["#", "Variant", "Parameters", "Score", *(["Checks"] if checked else [])], body,
            "sweep", numeric={3}, selected={i for i, r in enumerate(ranked) if r.selected}))
    return "".join(out)


def _searches(studies: Iterable[SearchStudy]) -> str:
    """Each study: its sampler, seed and trials, then every trial in the order asked, the
    selected one starred, a trial kept out of the ranking with the check it failed."""
    out = []
    for study in studies:
        checked = any(r.failed for r in study.rows)
        body = [[str(r.number), ("&#9733; " if r.selected else "") + _e(r.name),
                 _e(format_parameters(r.parameters)), _num(r.objective),
                 *([_verdict(r.failed)] if checked else [])] for r in study.rows]
        head = (f"<p data-search=\"{_e(study.search)}\"><b>{_e(study.search)}</b>: "
                f"{_e(study.sampler)} sampler, seed {study.seed}, {len(study.rows)} of "
                f"{study.trials} trials done; {_e(study.select)}"
                + (f"<br><span class=\"muted\">{_e(study.why)}</span>" if study.why else "")
                + "</p>")
        out.append(head + _table(
            ["Trial", "Name", "Parameters", "Objective", *(["Checks"] if checked else [])],
            body, "search", numeric={3},
            selected={i for i, r in enumerate(study.rows) if r.selected}))
    return "".join(out)


def _verdict(failed: str | None) -> str:
    return _badge("passed", "ok") if failed is None else (
        f'{_badge("FAIL", "bad")} {_e(failed)}')


def _warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return f'<p>{_badge("none", "ok")} no NaN or Inf in the weights, licences agree.</p>'
    return '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"


# --------------------------------------------------------------------------- the graph

_W, _H, _GAP_X, _GAP_Y, _PAD = 190, 58, 34, 70, 16


def lineage_svg(root: LineageNode) -> str:
    """The lineage as an SVG drawing: one row per topological generation (sources on top,
    the target at the bottom), edges labelled with the parent's role."""
    graph = nx.DiGraph()
    by_id: dict[tuple[str, str, str], LineageNode] = {}
    for node in iter_lineage(root):
        identity = (node.kind, node.uri, node.digest)
        by_id[identity] = node
        graph.add_node(identity)
    roles: dict[tuple[Any, Any], str] = {}
    for node in by_id.values():
        for parent in node.children:
            edge = ((parent.kind, parent.uri, parent.digest), (node.kind, node.uri, node.digest))
            graph.add_edge(*edge)
            roles.setdefault(edge, parent.role or "parent")
    rows = [sorted(generation, key=lambda i: by_id[i].name)
            for generation in nx.topological_generations(graph)]
    rows = _order_rows(rows, graph)
    widest = max(len(r) for r in rows)
    width = _PAD * 2 + widest * _W + (widest - 1) * _GAP_X
    height = _PAD * 2 + len(rows) * _H + (len(rows) - 1) * _GAP_Y
    where: dict[Any, tuple[float, float]] = {}
    for y, row in enumerate(rows):
        span = len(row) * _W + (len(row) - 1) * _GAP_X
        left = (width - span) / 2
        for x, identity in enumerate(row):
            where[identity] = (left + x * (_W + _GAP_X), _PAD + y * (_H + _GAP_Y))
    # Scaled to the page's width (never above natural size), so a wide DAG stays whole.
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" '
             f'height="{height}" style="width:100%;max-width:{width}px;height:auto" '
             f'viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="lineage of {_e(root.name)}"><defs><marker id="arrow" '
             'viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8a93a3"/>'
             "</marker></defs>"]
    for (a, b), role in roles.items():
        (ax, ay), (bx, by) = where[a], where[b]
        x1, y1, x2, y2 = ax + _W / 2, ay + _H, bx + _W / 2, by
        mid = (y1 + y2) / 2
        parts.append(f'<g class="edge"><path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} '
                     f'{x2:.1f},{mid:.1f} {x2:.1f},{y2 - 2:.1f}" fill="none" stroke="#8a93a3" '
                     f'stroke-width="1.4" marker-end="url(#arrow)"/>'
                     f'<text x="{(x1 + x2) / 2:.1f}" y="{mid - 3:.1f}" font-size="10" '
                     f'fill="#5b6475" text-anchor="middle">{_e(role)}</text></g>')
    for identity, (x, y) in where.items():
        node = by_id[identity]
        kind = "target" if node is root else ("stage" if node.is_build else "source")
        fill, stroke = {"target": ("#fff7e6", "#d18b00"), "stage": ("#f3fbf3", "#4f9a5a"),
                        "source": ("#eef4ff", "#6b8fd6")}[kind]
        second = (node.method or "?") if node.is_build else (
            f"{node.kind}" + (f" @ {node.revision}" if node.revision else ""))
        parts.append(
            f'<g class="node {kind}" data-name="{_e(node.name)}" data-kind="{kind}">'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{_W}" height="{_H}" rx="8" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.6"/>'
            f'<text x="{x + _W / 2:.1f}" y="{y + 19:.1f}" font-size="13" font-weight="600" '
            f'text-anchor="middle">{_e(_clip(_display(node), 26))}</text>'
            f'<text x="{x + _W / 2:.1f}" y="{y + 35:.1f}" font-size="11" fill="#2c3444" '
            f'text-anchor="middle">{_e(_clip(second, 30))}</text>'
            f'<text x="{x + _W / 2:.1f}" y="{y + 50:.1f}" font-size="10" fill="#5b6475" '
            f'text-anchor="middle" font-family="monospace">{_e(short_digest(node.digest, 10))}'
            "</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def _order_rows(rows: list[list[Any]], graph: nx.DiGraph) -> list[list[Any]]:
    """Order each row by the mean position of its parents above (fewer crossings)."""
    placed: dict[Any, float] = {n: float(i) for i, n in enumerate(rows[0])}
    out = [rows[0]]
    for row in rows[1:]:
        def key(n: Any) -> float:
            above = [placed[p] for p in graph.predecessors(n) if p in placed]
            return sum(above) / len(above) if above else math.inf
        ordered = sorted(row, key=key)
        placed.update({n: float(i) for i, n in enumerate(ordered)})
        out.append(ordered)
    return out


# --------------------------------------------------------------------------- helpers


def _display(node: LineageNode, uri: bool = False) -> str:
    if node.kind == "hub":
        return hub_id(node.uri) or node.name
    return node.uri if uri else node.name


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _code(value: str | None) -> str:
    return f"<code>{_e(value)}</code>" if value else "&mdash;"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_e(text)}</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], name: str, *,
           numeric: set[int] | None = None, selected: set[int] | None = None) -> str:
    numeric, selected = numeric or set(), selected or set()
    if not rows:
        return f'<p class="muted" data-table="{name}">none</p>'
    head_html = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(
        f'<tr{" class=selected" if i in selected else ""}>'
        + "".join(f'<td{" class=num" if j in numeric else ""}>{cell}</td>'
                  for j, cell in enumerate(row)) + "</tr>"
        for i, row in enumerate(rows))
    return f'<table data-table="{name}"><thead><tr>{head_html}</tr></thead><tbody>{body}' \
           "</tbody></table>"
