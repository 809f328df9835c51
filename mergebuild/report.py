"""What a make shows a person, on stderr (stdout is for results): rich tables and bars on a
terminal, plain lines elsewhere; and the lines ``make --check`` prints."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from mergebuild.build.events import MakeResult, NodeResult, Reporter
from mergebuild.plan.selection import Selection
from mergebuild.plan.staleness import NodeState
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import short_digest

if TYPE_CHECKING:
    from mergebuild.plan.evaluations import CheckOutcome
    from mergebuild.plan.search import Study
    from mergebuild.verbs.metrics import Leaderboard, NodeMetrics
    from mergebuild.verbs.reproduce import ReproReport


def format_size(n: float) -> str:
    """A byte count in IEC units: ``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _short(digest: str | None) -> str:
    if not digest:
        return "-"
    algo, _, hexd = digest.partition(":")
    return f"{algo}:{hexd[:12]}" if hexd else digest[:12]


def plan_rows(states: list[NodeState]) -> list[tuple[str, str, str, str]]:
    rows = []
    for s in states:
        if s.kind == "source":
            what = s.source.kind if s.source else "source"
            why = "; ".join(s.reasons)
            if s.source is not None and s.source.commit:
                pinned = f"{s.source.uri}@{s.source.revision or 'main'} → {s.source.commit[:12]}"
                why = f"{pinned}; {why}" if why else pinned
            rows.append((s.name, f"source ({what})", _short(s.digest), why))
        elif s.kind == "adapted" and s.adapter is not None:  # a merge read through a LoRA
            a = s.adapter
            pinned = f"@{a.revision or 'main'} → {a.commit[:12]}" if a.commit else ""
            lora = f"LoRA {a.uri}{pinned} ({_short(a.digest)})"
            rows.append((s.name, "lora", s.status, "; ".join([*s.reasons, lora])))
        elif s.kind == "search":  # its progress even when done: how many trials, the best
            why = "; ".join(s.reasons) or (s.study.progress() if s.study else "")
            rows.append((s.name, f"search ({s.method})", s.status, why))
        elif s.selection is not None and s.status == "fresh":
            rows.append((s.name, s.method or "", s.status, selection_line(s.selection)))
        else:
            rows.append((s.name, s.method or "", s.status, "; ".join(s.reasons)))
        for task in s.evaluations:
            if task.status == "pending":
                rows.append((f"  {s.name}", f"eval {task.eval}", "pending",
                             "; ".join(task.reasons)))
    return rows


def selection_line(selection: Selection) -> str:
    """``→ blend[t=0.35] (maximize code-skill: 0.74, best of 10)``: a plan's sweep row."""
    return selection.headline().removeprefix(f"{selection.sweep} ")


def pending_evaluations(states: list[NodeState]) -> int:
    return sum(1 for s in states for t in s.evaluations if t.status == "pending")


class PlainReporter(Reporter):
    """One line per event, on stderr; for CI logs and pipes."""

    def __init__(self, out: TextIO | None = None, quiet: bool = False, show_plan: bool = True):
        self.out = out or sys.stderr
        self.quiet = quiet
        self.show_plan = show_plan
        self._last_progress: dict[str, float] = {}

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(scrub_text(text), file=self.out, flush=True)

    def plan(self, states: list[NodeState]) -> None:
        if not self.show_plan:
            return
        stale = [s for s in states if s.status == "stale"]
        if not stale and not pending_evaluations(states):
            self._print("nothing to do: every node is up to date")
            return
        for s in stale:
            self._print(f"stale {s.name}: {'; '.join(s.reasons)}")
        for s in states:
            for t in s.evaluations:
                if t.status == "pending" and s.status != "stale":
                    self._print(f"evaluate {s.name} on {t.eval}: {'; '.join(t.reasons)}")

    def node_start(self, state: NodeState, tensors: int | None = None) -> None:
        self._last_progress[state.name] = time.monotonic()  # first progress line after 5 s
        self._print(f"building {state.name} ({state.method})")

    def node_progress(self, name, done, total, bytes_done, bytes_total) -> None:
        now = time.monotonic()
        if done == total or now - self._last_progress.get(name, 0) > 5:
            self._last_progress[name] = now
            if done != total:
                self._print(f"  {name}: {done}/{total} tensors, {format_size(bytes_done)}")

    def node_done(self, result: NodeResult) -> None:
        if result.outcome == "built":
            rate = result.bytes_written / result.seconds if result.seconds > 0 else 0
            size = format_size(result.bytes_written)
            self._print(f"built {result.name} in {result.seconds:.2f}s "
                        f"({size}, {format_size(rate)}/s) -> {result.path}")
        elif result.outcome == "reused":
            self._print(f"reused {result.name}: {result.detail}")
        else:
            print(scrub_text(f"{result.outcome} {result.name}: {result.detail}"),
                  file=sys.stderr, flush=True)
            for check in result.failed_checks:
                print(f"check failed: {check.describe()}", file=sys.stderr, flush=True)

    def eval_start(self, node: str, eval_name: str) -> None:
        self._last_progress[f"eval:{node}:{eval_name}"] = time.monotonic()
        self._print(f"evaluating {node} on {eval_name}")

    def eval_progress(self, node: str, eval_name: str, done: int, total: int) -> None:
        key = f"eval:{node}:{eval_name}"
        now = time.monotonic()
        if done != total and now - self._last_progress.get(key, 0) > 5:
            self._last_progress[key] = now
            self._print(f"  {node} on {eval_name}: {done}/{total}")

    def eval_done(self, node: str, eval_name: str, metrics, seconds: float) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._print(f"evaluated {node} on {eval_name} in {seconds:.1f}s: {shown}")

    def selected(self, selection: Selection) -> None:
        self._print(f"selected {selection.headline()}: {selection.why()}")

    def excluded(self, name: str, group: str, checks: list[CheckOutcome]) -> None:
        failed = [c for c in checks if not c.passed]
        print(scrub_text(f"excluded {name} from {group}'s selection: {len(failed)} check"
                         f"{'s' * (len(failed) != 1)} failed"), file=sys.stderr, flush=True)
        for check in failed:
            print(f"check failed: {check.describe()}", file=sys.stderr, flush=True)

    def waiting(self, name: str) -> None:
        self._print(f"waiting: another mergebuild is building {name}")

    def store_busy(self) -> None:
        self._print("waiting: mergebuild gc is cleaning this store")

    def note(self, message: str) -> None:
        self._print(f"note: {message}")

    def download(self, node: str, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        key = f"download:{label}"
        finished = total > 0 and done >= total
        if finished or now - self._last_progress.get(key, 0) > 5:
            self._last_progress[key] = now
            of = f"/{format_size(total)}" if total else ""
            self._print(f"downloading {label} for {node}: {format_size(done)}{of}"
                        f"{' (done)' if finished else ''}")

    def summary(self, result: MakeResult) -> None:
        built, reused = result.count("built"), result.count("reused")
        fresh = result.count("fresh")
        failed = result.count("failed") + result.count("skipped")
        written = sum(r.bytes_written for r in result.results)
        self._print(f"done in {result.seconds:.2f}s: {built} built, {reused + fresh} up to date"
                    f"{f', {failed} failed' if failed else ''}, {format_size(written)} written")


class RichReporter(PlainReporter):
    """A plan table, one progress bar per node being built, and a summary."""

    def __init__(self, quiet: bool = False, show_plan: bool = True):
        super().__init__(quiet=quiet, show_plan=show_plan)
        from rich.console import Console

        self.console = Console(stderr=True)
        self._progress = None
        self._task = None
        self._downloads = None
        self._download_tasks: dict[str, object] = {}

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(scrub_text(text), highlight=False, markup=False)

    def plan(self, states: list[NodeState]) -> None:
        if self.quiet or not self.show_plan:
            return
        if not any(s.status == "stale" for s in states) and not pending_evaluations(states):
            self._print("nothing to do: every node is up to date")
            return
        from rich.table import Table

        table = Table(title="plan", title_justify="left")
        for col in ("node", "method", "status", "why"):
            table.add_column(col)
        for row in plan_rows(states):
            style = "yellow" if row[2] in ("stale", "pending") else None
            table.add_row(*(scrub_text(cell) for cell in row), style=style)
        self.console.print(table)

    def download(self, node: str, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        if self._downloads is None:
            self._downloads = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), console=self.console, transient=True,
            )
            self._downloads.start()
        task = self._download_tasks.get(label)
        if task is None:
            task = self._downloads.add_task(f"↓ {label}", total=total or None)
            self._download_tasks[label] = task
        self._downloads.update(task, completed=done, total=total or None)

    def _stop_downloads(self) -> None:
        if self._downloads is not None:
            self._downloads.stop()
            self._downloads = None
            self._download_tasks = {}

    def node_start(self, state: NodeState, tensors: int | None = None) -> None:
        self._stop_downloads()
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(f"{state.name} ({state.method})", total=None)

    def node_progress(self, name, done, total, bytes_done, bytes_total) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=bytes_done, total=bytes_total)

    def _stop(self) -> None:
        self._stop_downloads()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def node_done(self, result: NodeResult) -> None:
        self._stop()
        super().node_done(result)

    def excluded(self, name: str, group: str, checks: list[CheckOutcome]) -> None:
        self._stop()
        super().excluded(name, group, checks)

    def eval_start(self, node: str, eval_name: str) -> None:
        self._stop()
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"{node} on {eval_name}", total=None)

    def eval_progress(self, node: str, eval_name: str, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def eval_done(self, node: str, eval_name: str, metrics, seconds: float) -> None:
        self._stop()
        super().eval_done(node, eval_name, metrics, seconds)

    def summary(self, result: MakeResult) -> None:
        self._stop()
        super().summary(result)


def make_reporter(quiet: bool = False) -> Reporter:
    if sys.stderr.isatty() and not quiet:
        return RichReporter(quiet=quiet)
    return PlainReporter(quiet=quiet)


def describe_repro(report: ReproReport) -> list[str]:
    """The lines ``make --check`` prints for one node."""
    card = (f"{report.node}: the model card differs (the node's name or description "
            "changed; the model did not)") if report.card_differs else None
    if report.ok:
        digest = short_digest(report.stored_digest)
        return [f"{report.node}: reproduced bit for bit ({report.files} files, {digest})",
                *([card] if card else [])]
    lines = [f"{report.node}: {d}" for d in report.differences if not d.is_card]
    if report.stored_digest != report.rebuilt_digest:
        lines.append(f"{report.node}: digest {short_digest(report.rebuilt_digest)} rebuilt, "
                     f"{short_digest(report.stored_digest)} stored")
    weights, metadata = report.weights_differ, report.metadata_differ
    lines.append(f"{report.node}: weights "
                 + (f"differ ({len(weights)} files)" if weights else "reproduced bit for bit"))
    lines.append(f"{report.node}: metadata "
                 + (f"differs ({', '.join(d.name for d in metadata)})" if metadata
                    else "reproduced bit for bit"))
    if card:
        lines.append(card)
    differing = len(weights) + len(metadata)
    lines.append(f"{report.node}: NOT reproduced ({differing} of {report.files} files differ)")
    return lines


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return "inf" if ratio == float("inf") else f"{100 * ratio:.1f}%"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def retention_lines(metrics: NodeMetrics) -> list[str]:
    """What ``metrics.node`` keeps of each scored ancestor's own evals, one row each, with
    the verdict of its retain check when it has one."""
    if not metrics.retention:
        return []
    verdicts = {(c.ancestor, c.eval, c.metric): c.passed for c in metrics.checks
                if c.rule == "retain"}
    rows = [["ancestor", "eval", "metric", "ancestor", metrics.node, "retained", "check"]]
    for r in metrics.retention:
        verdict = verdicts.get((r.ancestor, r.eval, r.metric))
        rows.append([r.ancestor, r.eval, r.metric, _value(r.ancestor_value), _value(r.value),
                     _percent(r.ratio), "" if verdict is None else ("ok" if verdict else "FAIL")])
    return [f"retention of {metrics.node}:", *("  " + line for line in _table(rows))]


def metrics_lines(table: list[NodeMetrics], diff: bool = False) -> list[str]:
    """``mergebuild metrics``: nodes × evals (each eval's score metrics), then each node's
    retention; with ``diff``, each score's change since the node's previous build."""
    columns: dict[tuple[str, str], None] = {}
    for m in table:
        for name, metrics in m.scores.items():
            for metric in metrics:
                if metric not in ("n", "tokens"):
                    columns.setdefault((name, metric))
    if not columns:
        return ["no scores yet: run 'mergebuild make' or 'mergebuild eval NODE'"]
    rows = [["node", *(f"{e}/{m}" if m not in ("accuracy", "perplexity") else e
                       for e, m in columns)]]
    for m in table:
        row = [m.node]
        for name, metric in columns:
            value = m.scores.get(name, {}).get(metric)
            cell = _value(value)
            if diff and value is not None:
                before = m.previous.get(name, {}).get(metric)
                cell += f" ({value - before:+.4g})" if before is not None else " (new)"
            row.append(cell)
        rows.append(row)
    lines = _table(rows)
    for m in table:
        if m.retention:
            lines += ["", *retention_lines(m)]
        failed = [c for c in m.checks if not c.passed]
        lines += [f"check failed: {c.describe()}" for c in failed]
    return lines


def leaderboard_lines(board: Leaderboard) -> list[str]:
    """``mergebuild metrics SWEEP``: what it selects by, then one row per variant (place,
    swept values, the value ranked by, each score), the selected one starred."""
    from mergebuild.spec.sweep import format_value

    if board.goal is None:
        head = f"{board.sweep}: {len(board.rows)} variants (no select:, grid order)"
    elif board.refused is not None:
        head = f"{board.sweep}: {board.goal} {board.metric}; {board.refused}"
    elif board.selected is None:
        head = (f"{board.sweep}: {board.goal} {board.metric}; not selected yet (every variant "
                f"must be built and scored): ranking what is known")
    else:
        head = f"{board.sweep} → {board.selected} ({board.goal} {board.metric}): {board.why}"
    columns: dict[tuple[str, str], None] = {}
    for row in board.rows:
        for name, metrics in row.scores.items():
            for metric in metrics:
                if metric not in ("n", "tokens"):
                    columns.setdefault((name, metric))
    retention = board.metric == "retention"
    checked = any(row.failed for row in board.rows)  # last: a failed check's verdict is long
    rows = [["#", "variant", *board.paths,
             *(["objective"] if board.goal else []),
             *(["min"] if retention else []),
             *(f"{e}/{m}" if m not in ("accuracy", "perplexity") else e for e, m in columns),
             *(["checks"] if checked else [])]]
    for row in board.rows:
        rows.append([str(row.place), ("* " if row.selected else "") + row.variant,
                     *(format_value(row.point[path]) for path in board.paths),
                     *([_value(row.value)] if board.goal else []),
                     *([_value(row.worst)] if retention else []),
                     *(_value(row.scores.get(e, {}).get(m)) for e, m in columns),
                     *([row.failed or "passed"] if checked else [])])
    return [head, *("  " + line for line in _table(rows))]


def study_lines(study: Study, board: Leaderboard) -> list[str]:
    """``mergebuild metrics SEARCH``: how far the study is (sampler, seed, trials done), its
    trials as a leaderboard (``leaderboard_lines``: those kept out of the ranking are
    marked with the check they failed), and the next trial."""
    search = study.search
    head = f"{search.name}: {search.sampler} search (seed {search.seed}), {study.progress()}"
    lines = [head, *leaderboard_lines(board)]
    if study.next is not None:
        lines.append(f"next: {study.next.name} ({study.waiting})")
    return lines
