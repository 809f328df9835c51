"""The command line: parse arguments, call the Project API, print results; no logic lives here."""

from __future__ import annotations

import contextlib
import gc as collector  # the module; `gc` is the command below
import json
import os
import signal
import sys
from pathlib import Path

import click

from mergebuild.errors import MergebuildError


class _Group(click.Group):
    """Turns every user error into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MergebuildError as exc:
            from mergebuild.provenance.secrets import scrub_text

            # One line, whatever a message quotes (a multi-line value), and no credential.
            line = " ".join(scrub_text(str(exc)).split())
            click.echo(f"mergebuild: error: {line}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("mergebuild: interrupted; nothing half-built was published", err=True)
            sys.exit(130)


def _sigterm(_signum, _frame):
    raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-f", "--file", "mergefile", default="Mergefile", show_default=True,
              type=click.Path(dir_okay=False), help="The Mergefile to read.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="The store (default: cache/ beside the Mergefile, or $MERGEBUILD_CACHE).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors (and requested output).")
@click.version_option(package_name="mergebuild")
@click.pass_context
def main(ctx: click.Context, mergefile: str, cache_dir: str | None, quiet: bool) -> None:
    """make for model merges: build a Mergefile's merge chain, rebuilding only what is stale."""
    ctx.ensure_object(dict)
    ctx.obj.update(mergefile=mergefile, cache_dir=cache_dir, quiet=quiet)
    signal.signal(signal.SIGTERM, _sigterm)


# Set by run(): the console process owns its heap, so what it loads may be frozen out of
# the cyclic collector's sight (see _loading).
_FREEZE_LOADED = False


@contextlib.contextmanager
def _loading():
    """Reading a Mergefile builds its specs (a million objects for 10,000 nodes) that form no
    cycles and live as long as the command: the cyclic collector would walk them again and
    again while they are built and afterwards, ~0.5 s of a 10,000-node plan. It is paused
    while they are built, and in the console process they are then frozen (gc.freeze), so
    later collections (during a make, say) walk only what is new."""
    was_enabled = collector.isenabled()
    collector.disable()
    try:
        yield
    finally:
        if was_enabled:
            collector.enable()
        if _FREEZE_LOADED:
            collector.freeze()


def _project(ctx: click.Context, frozen: bool = False):
    from mergebuild.api import Project

    with _loading():
        project = Project(ctx.obj["mergefile"], ctx.obj["cache_dir"], frozen=frozen)
    _print_warnings(ctx, project.mergefile.warnings)
    return project


def _print_warnings(ctx: click.Context, warnings: tuple[str, ...]) -> None:
    """What the Mergefile says that does nothing, one line each (once per command)."""
    if ctx.obj.get("quiet") or ctx.obj.get("warned"):
        return
    ctx.obj["warned"] = True
    for warning in warnings:
        click.echo(f"mergebuild: warning: {warning}", err=True)


def _node_or_directory(ctx: click.Context, target_or_dir: str):
    """TARGET_OR_DIR as given: a built model directory (returned as a Path; no Mergefile
    needed), else a node of the Mergefile (its Project is returned)."""
    path = Path(target_or_dir)
    if path.is_dir():
        return path
    if not Path(ctx.obj["mergefile"]).exists():
        raise MergebuildError(
            f"'{target_or_dir}' is not a directory, and there is no {ctx.obj['mergefile']} "
            "to find it in", hint="pass a built model directory, or -f MERGEFILE with a node name")
    return _project(ctx)


@main.command()
@click.argument("targets", nargs=-1)
@click.option("-n", "--dry-run", is_flag=True, help="Print the plan; build nothing.")
@click.option("-B", "--force", is_flag=True, help="Rebuild the targets even if up to date.")
@click.option("-k", "--keep-going", is_flag=True, help="Build what does not depend on a failure.")
@click.option("--device", default=None,
              help="auto (CUDA when present), cpu, cuda or cuda:N "
                   "[default: the Mergefile's defaults.device, else auto].")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("--check", is_flag=True,
              help="Rebuild the built TARGETS into a scratch dir and compare them with the "
                   "stored builds, file by file (a reproducibility audit; publishes nothing).")
@click.option("--frozen", is_flag=True,
              help="Pin hub sources to the commits in Mergefile.lock; never re-resolve.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge parents holding NaN/Inf instead of failing (as a node's "
                   "allow_nonfinite: true does).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Build up to N independent nodes or sweeps at once, each in its own "
                   "process (one per GPU with GPUs; fewer when memory is short).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="Where builds run: this machine, or a Ray cluster (pip install "
                   "'mergebuild[ray]'; the store must be on a file system every node mounts).")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="The Ray cluster to use with --executor ray [default: auto].")
@click.pass_context
def make(ctx, targets, dry_run, force, keep_going, device, quiet, check, frozen,
         allow_nonfinite, jobs, executor, ray_address):
    """Build TARGETS (default: every final node) and their stale ancestors."""
    ctx.obj["quiet"] = ctx.obj["quiet"] or quiet
    # A flag that would be ignored is refused: the user meant something by it.
    if executor == "ray" and jobs > 1:
        raise click.UsageError("-j sets this machine's worker processes; with --executor ray "
                               "the cluster's resources decide how many builds run: drop -j")
    if ray_address is not None and executor != "ray":
        raise click.UsageError("--ray-address applies to --executor ray: add --executor ray")
    if check:
        _make_check(ctx, targets, device)
        return
    if dry_run:
        ctx.invoke(plan, targets=targets, frozen=frozen)
        return
    from mergebuild.report import make_reporter

    project = _project(ctx, frozen=frozen)
    result = project.make(list(targets), force=force, keep_going=keep_going, device=device,
                          reporter=make_reporter(ctx.obj["quiet"]),
                          allow_nonfinite=allow_nonfinite, jobs=jobs, executor=executor,
                          ray_address=ray_address)
    built = [(name, r.path) for name in project.targets_or_default(list(targets))
             for r in result.results if r.name == name and r.path]
    if not ctx.obj["quiet"]:
        for name, _ in built:  # before the results, which stay the last lines
            for warning in project.card(name).warnings:
                click.echo(f"mergebuild: warning: {name}: {warning}", err=True)
        _print_retention(project, [name for name, _ in built])
    # stdout carries only results, also with -q: `$(mergebuild make x)` is usable.
    for name, path in built:
        click.echo(f"{name}: {path}")
    if not result.ok:
        sys.exit(1)


def _print_retention(project, nodes: list[str]) -> None:
    """After a make: what each built target keeps of its scored ancestors' skills."""
    if not project.mergefile.evals or not nodes:
        return
    from mergebuild.report import retention_lines

    for metrics in project.metrics(nodes):
        for line in retention_lines(metrics):
            click.echo(line, err=True)  # a report for the reader; stdout is for results


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--frozen", is_flag=True,
              help="Pin hub sources to the commits in Mergefile.lock; never re-resolve.")
@click.pass_context
def plan(ctx, targets, as_json, frozen=False):
    """Show what make would build, and why, without building."""
    from mergebuild.provenance.secrets import scrub_secrets, scrub_text
    from mergebuild.report import pending_evaluations, plan_rows

    states = _project(ctx, frozen=frozen).plan(list(targets))
    if as_json:
        click.echo(json.dumps(scrub_secrets([
            {"node": s.name, "kind": s.kind, "status": s.status, "reasons": s.reasons,
             "key": s.key, "digest": s.digest, "path": str(s.path) if s.path else None,
             **({"uri": s.source.uri, "revision": s.source.revision,
                 "commit": s.source.commit} if s.source is not None else {}),
             **({"evaluations": [{"eval": t.eval, "status": t.status, "reasons": list(t.reasons)}
                                 for t in s.evaluations]} if s.evaluations else {}),
             **({"selection": s.selection.as_json()}
                if s.selection is not None and s.digest is not None else {}),
             **({"study": s.study.as_json()} if s.study is not None else {})}
            for s in states]), indent=2))
        return
    rows = plan_rows(states)
    width = max(len(r[0]) for r in rows)
    lines = [scrub_text(f"{name:<{width}}  {what:<18} {status}  {why}".rstrip())
             for name, what, status, why in rows]
    stale = sum(1 for s in states if s.status == "stale")
    evals = pending_evaluations(states)
    todo = [f"{stale} to build"] if stale else []
    todo += [f"{evals} evaluation{'s' * (evals != 1)} to run"] if evals else []
    lines.append(", ".join(todo) if todo else "nothing to do: every node is up to date")
    click.echo("\n".join(lines))  # one write: a line each is 10,000 writes and flushes


main.add_command(plan, name="status")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["tree", "dot", "mermaid"]), default="tree",
              show_default=True)
@click.option("--dot", "fmt", flag_value="dot", help="Same as --format dot.")
@click.option("--mermaid", "fmt", flag_value="mermaid", help="Same as --format mermaid.")
@click.pass_context
def graph(ctx, fmt):
    """Show the Mergefile's DAG as a tree, DOT or Mermaid."""
    from mergebuild.spec.graph import build_graph, render_dot, render_mermaid, render_tree
    from mergebuild.spec.parse import load_mergefile

    with _loading():
        g = build_graph(load_mergefile(ctx.obj["mergefile"]))
    if fmt == "dot":
        click.echo(render_dot(g), nl=False)
    elif fmt == "mermaid":
        click.echo(render_mermaid(g), nl=False)
    else:
        from rich.console import Console

        Console().print(render_tree(g))


@main.command()
@click.argument("node")
@click.option("--card", is_flag=True,
              help="Print the path of the card NODE goes out with (its card: block applied).")
@click.pass_context
def path(ctx, node, card):
    """Print the directory of NODE's current build (exit 4 if it is not built)."""
    project = _project(ctx)
    click.echo(str(project.card(node).path if card else project.path(node)))


@main.command()
@click.argument("node", required=False)
@click.option("--as", "name", help="The pin's name (default: NODE), e.g. v1.0.")
@click.option("--list", "list_pins", is_flag=True, help="List the store's pins.")
@click.option("--remove", metavar="NAME", help="Remove pin NAME (gc may then collect it).")
@click.option("--force", is_flag=True, help="Move pin NAME if it already keeps another build.")
@click.pass_context
def pin(ctx, node, name, list_pins, remove, force):
    """Keep NODE's current build from gc under a name, whatever the Mergefile becomes.

    A pin's name then names its build wherever a build is named (path, export, push,
    lineage, verify): a bare name that is not a node, or pin:NAME."""
    if node is not None and (list_pins or remove is not None):
        raise click.UsageError("give NODE to pin it, or --remove NAME, or --list")
    project = _project(ctx)
    if list_pins or (node is None and remove is None):
        for pin_name, record in project.pins().items():
            click.echo(f"{pin_name}\t{record.get('node')}\t{record.get('key')}\t"
                       f"{record.get('path')}\t{record.get('pinned')}")
        return
    if remove is not None:
        project.unpin(remove)
        click.echo(f"unpinned {remove}")
        return
    pin_name, record = project.pin(node, name, force=force)
    click.echo(f"pinned {node} as {pin_name}: {record['path']}")


@main.command("import")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the Mergefile here instead of standard output.")
def import_configs(configs, output):
    """Turn mergekit configs (and mergekit-multi files) into a Mergefile."""
    from mergebuild.spec.mergekit_import import import_mergekit

    result = import_mergekit(list(configs), Path(output).parent if output else None)
    for warning in result.warnings:
        click.echo(f"mergebuild: warning: {warning}", err=True)
    if output:
        try:
            Path(output).write_text(result.text, encoding="utf-8")
        except OSError as exc:
            hint = ("create the directory first" if isinstance(exc, FileNotFoundError)
                    else "choose a path you can write")
            raise MergebuildError(f"cannot write {output}: {exc.strerror or exc}",
                                  hint=hint) from None
    else:
        click.echo(result.text, nl=False)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--markdown", is_flag=True,
              help="Print the methods table as Markdown (the README's table).")
def methods(names, markdown):
    """List merge methods and their parameters."""
    from mergebuild.methods.registry import METHODS, methods_markdown

    if markdown:
        click.echo(methods_markdown(), nl=False)
        return
    shown = sorted({m.name: m for m in METHODS.values()}.values(), key=lambda m: m.name)
    if names:
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise MergebuildError(f"unknown merge method '{unknown[0]}'",
                                  hint="run 'mergebuild methods' for the list")
        shown = [METHODS[n] for n in names]
    for m in shown:
        base = {"none": "no base", "required": "needs base_model",
                "optional": "base_model optional"}[m.base]
        click.echo(f"{m.name}  ({base}{', randomised' if m.randomized else ''})  {m.summary}")
        for p in m.params:
            default = "required" if p.required else f"default {p.default!r}"
            rng = ""
            if p.minimum is not None or p.maximum is not None:
                rng = f", range [{p.minimum}, {p.maximum}]"
            if p.choices:
                rng = f", one of {', '.join(map(str, p.choices))}"
            scope = "per model" if p.scope == "parent" else "node-wide"
            varies = ", may vary by layer" if p.varies else ""
            click.echo(f"    {p.name}: {p.kind}, {scope}, {default}{rng}{varies}"
                       f"{'  ' + p.help if p.help else ''}")


def _make_check(ctx, targets, device) -> None:
    from mergebuild.report import describe_repro

    project = _project(ctx)
    failed = False
    for name in project.targets_or_default(list(targets)):
        report = project.check(name, device=device)
        failed |= not report.ok
        for line in describe_repro(report):
            click.echo(line)
    if failed:
        sys.exit(1)


@main.command("eval")
@click.argument("nodes", nargs=-1, required=True)
@click.option("--device", default=None,
              help="auto (CUDA when present), cpu, cuda or cuda:N "
                   "[default: the Mergefile's defaults.device, else auto].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def eval_command(ctx, nodes, device, as_json):
    """Run NODES' evals on their current models (cached results are reused); builds nothing.

    With a retain check, the scored ancestors' own evals run too. Exits 1 if a check fails.
    """
    from mergebuild.report import make_reporter, metrics_lines
    from mergebuild.verbs.metrics import metrics_json

    project = _project(ctx)
    table = project.evaluate(list(nodes), device=device,
                             reporter=make_reporter(ctx.obj["quiet"] or as_json))
    if as_json:
        click.echo(json.dumps(metrics_json(table), indent=2))
    else:
        for line in metrics_lines(table):
            click.echo(line)
    if any(not c.passed for m in table for c in m.checks):
        sys.exit(1)


@main.command()
@click.argument("nodes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--diff", is_flag=True, help="Show each score's change since the node's "
              "previous build.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Also draw the retention chart (for a sweep: its select value against "
                   "each swept parameter) into FILE.png or FILE.svg.")
@click.pass_context
def metrics(ctx, nodes, as_json, diff, plot):
    """Show the stored scores of NODES (default: every scored node): nodes × evals, and what
    each keeps of its ancestors' own evals (retention %). A sweep shows its leaderboard:
    its variants ranked by its select:; a search its study: every trial, best first. Runs
    no evaluation."""
    from mergebuild.report import leaderboard_lines, metrics_lines, study_lines
    from mergebuild.spec.model import SearchSpec, SweepSpec
    from mergebuild.verbs.metrics import (
        leaderboard_json,
        metrics_json,
        plot_leaderboard,
        plot_retention,
    )

    if plot is not None and Path(plot).suffix.lower() not in (".png", ".svg"):
        raise click.UsageError("--plot FILE must end in .png or .svg")
    project = _project(ctx)
    sweeps = [n for n in nodes if isinstance(project.mergefile.nodes.get(n), SweepSpec)]
    searches = [n for n in nodes if isinstance(project.mergefile.nodes.get(n), SearchSpec)]
    others = [n for n in nodes if n not in sweeps and n not in searches]
    boards = [project.leaderboard(sweep) for sweep in sweeps]
    studies = {search: project.study(search) for search in searches}
    searched = {search: project.leaderboard(search) for search in searches}
    table = project.metrics(others) if others or not (sweeps or searches) else []
    if as_json:
        click.echo(json.dumps([*map(leaderboard_json, boards),
                               *({**leaderboard_json(searched[n]), "search": s.as_json()}
                                 for n, s in studies.items()),
                               *metrics_json(table, diff=diff)], indent=2))
    else:
        lines = [line for board in boards for line in (*leaderboard_lines(board), "")]
        lines += [line for n, study in studies.items()
                  for line in (*study_lines(study, searched[n]), "")]
        if table or not (sweeps or searches):
            lines += metrics_lines(table, diff=diff)
        for line in lines[:-1] if lines and not lines[-1] else lines:
            click.echo(line)
    boards += searched.values()  # a search's chart: the objective against each parameter
    if plot is not None:
        if boards and len(boards) + len(others) > 1:
            raise click.UsageError("--plot draws one sweep's chart, or the retention chart "
                                   "of nodes that are not sweeps: name one sweep")
        if boards:
            plot_leaderboard(boards[0], Path(plot))
        else:
            plot_retention(table, Path(plot), project.retain_thresholds())
        if not as_json:
            click.echo(f"wrote {plot}")


@main.command()
@click.argument("target_or_dir")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lineage(ctx, target_or_dir, as_json):
    """Show what a built model is made of: every stage, method, parameters and digest.

    TARGET_OR_DIR is a node of the Mergefile or a built model directory (no Mergefile needed).
    """
    from mergebuild.api import Project
    from mergebuild.provenance.lineage import lineage_to_json, render_lineage_tree

    found = _node_or_directory(ctx, target_or_dir)
    if isinstance(found, Path):
        tree = Project.directory_lineage(found)
    else:
        tree = found.lineage(target_or_dir)
    if as_json:
        click.echo(json.dumps(lineage_to_json(tree), indent=2))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a pipe: never cut lines at 80 columns
        console = Console(width=100_000)
    console.print(render_lineage_tree(tree))


@main.command()
@click.argument("target_or_dir")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="Also require a DSSE signature by this Ed25519 public key (PEM).")
@click.pass_context
def verify(ctx, target_or_dir, key_file):
    """Re-hash every file of a built model against its provenance and walk its chain.

    Prints every problem (missing, truncated, modified, unexpected file; broken chain; a
    store object not as published; with --key, a missing or wrong signature) and exits 1 if
    there is any. TARGET_OR_DIR is a node or a built model directory.
    """
    from mergebuild.api import Project

    public_key = None
    if key_file:
        from mergebuild.provenance.signing import load_public_key

        public_key = load_public_key(key_file)
    found = _node_or_directory(ctx, target_or_dir)
    if isinstance(found, Path):
        report = Project.verify_directory(found, public_key=public_key)
    else:
        report = found.verify(target_or_dir, public_key=public_key)
    for problem in report.problems:
        click.echo(str(problem))
    if not report.ok:
        n = len(report.problems)
        click.echo(f"mergebuild: error: {report.directory}: {n} problem{'s' * (n != 1)}",
                   err=True)
        sys.exit(1)
    signed = f", signed by key {report.signed_by[:16]}" if report.signed_by else ""
    click.echo(f"verified {report.files} files, chain of {report.stages} "
               f"stage{'s' * (report.stages != 1)}{signed}")


def _signing_key(sign: str | None):
    """--sign KEYFILE, or --sign alone: the key in $MERGEBUILD_SIGNING_KEY."""
    if sign is None:
        return None
    from mergebuild.provenance.signing import load_private_key

    return load_private_key(sign or None)


_SIGN_HELP = ("Sign the provenance (DSSE envelope, Ed25519) with the private key in KEYFILE; "
              "--sign alone reads it from $MERGEBUILD_SIGNING_KEY.")


@main.command()
@click.argument("name")
def keygen(name):
    """Create an Ed25519 key pair for signing: NAME.key (private, mode 600) and NAME.pub."""
    from mergebuild.provenance.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(Path(name))
    click.echo(f"{private}: private key (keep it secret; export --sign {private})")
    click.echo(f"{public}: public key {key_id(load_public_key(public))[:16]} "
               f"(verify DIR --key {public})")


@main.command("report")
@click.argument("targets", nargs=-1)
@click.option("-o", "--output", default="report.html", show_default=True,
              type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--no-scan", is_flag=True,
              help="Do not read the weights looking for NaN/Inf (faster for large models).")
@click.pass_context
def report_command(ctx, targets, output, no_scan):
    """Write one self-contained HTML page for release review of TARGETS (default: every final
    node): the lineage drawn, stages, sources, verification, signature, licences, warnings."""
    from mergebuild.build.record import utc_now
    from mergebuild.io.atomic import write_bytes_atomic
    from mergebuild.verbs.audit_report import render_report

    project = _project(ctx)
    found = project.report(list(targets), scan=not no_scan)
    page = render_report(found, title=f"mergebuild report: {project.mergefile.path.name}",
                         generated=utc_now())
    write_bytes_atomic(Path(output), page.encode("utf-8"))
    problems = sum(len(t.problems) for t in found)
    warnings = sum(len(t.warnings) for t in found)
    click.echo(f"wrote {output}: {len(found)} target{'s' * (len(found) != 1)}, "
               f"{problems} verification problem{'s' * (problems != 1)}, "
               f"{warnings} warning{'s' * (warnings != 1)}")
    if problems:
        sys.exit(1)


@main.command("inspect")
@click.argument("nodes", nargs=-1, required=True)
@click.option("--base", help="The node task vectors are taken against (default: the base_model "
                             "of a single merge NODE).")
@click.option("--merged", multiple=True, metavar="NODE",
              help="A merge to measure against the task vectors (how much of each survives); "
                   "repeatable. A single merge NODE is its own --merged.")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="The TIES/DARE density the 'kept' shares refer to.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Also draw the layer-by-layer picture to FILE (.png, .svg or .pdf; "
                   "needs matplotlib).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.pass_context
def inspect_command(ctx, nodes, base, merged, density, as_json, plot, device):
    """How NODES' task vectors (model - base) agree, per layer and tensor kind: cosine,
    sign conflicts, norms, what a density keeps, and what a merge kept of each parent."""
    from mergebuild.verbs.inspect import plot as draw
    from mergebuild.verbs.inspect import render_table

    report = _project(ctx).inspect(list(nodes), base, list(merged), density=density,
                                   device=device)
    if plot:
        draw(report, Path(plot))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(render_table(report))
    if plot:
        click.echo(f"plot: {plot}")


@main.command()
@click.option("-n", "--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--keep-variants", is_flag=True,
              help="Keep every variant of a sweep, not only the one its select: chose.")
@click.pass_context
def gc(ctx, dry_run, keep_variants):
    """Remove store objects the Mergefile cannot reach, and leftovers of dead builds.

    Kept: every node's current build and the last build of every node still in the
    Mergefile (and builds recorded by other Mergefiles sharing the store). Of a sweep with
    select:, only the selected variant (the losers' scores stay; --keep-variants keeps all).
    """
    from mergebuild.report import format_size

    report = _project(ctx).collect_garbage(dry_run=dry_run, keep_variants=keep_variants)
    verb = "would remove" if dry_run else "removed"
    for item in report.removed:
        click.echo(f"{verb} {item.kind} {item.path} ({format_size(item.size)}, {item.why})")
    freed = format_size(report.bytes_freed)
    click.echo(f"{'would free' if dry_run else 'freed'} {freed} in {len(report.removed)} "
               f"item{'s' * (len(report.removed) != 1)}; kept {report.kept} reachable "
               f"build{'s' * (report.kept != 1)}")


@main.command()
@click.argument("target")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Replace DIRECTORY if an earlier export wrote it.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]),
              default="safetensors", show_default=True,
              help="safetensors: the build as it is; gguf: one llama.cpp/Ollama file.")
@click.option("--quant", type=click.Choice(["f16", "bf16", "q8_0", "q4_0", "f32"]),
              default="f16", show_default=True, help="The GGUF's storage type of 2-D weights.")
@click.option("--sign", metavar="KEYFILE", is_flag=False, flag_value="", default=None,
              help=_SIGN_HELP)
@click.pass_context
def export(ctx, target, directory, force, fmt, quant, sign):
    """Copy TARGET's verified build (weights, config, tokenizer, card, provenance) to DIRECTORY,
    or with --format gguf convert it into one GGUF file whose provenance names the build."""
    if fmt != "gguf" and ctx.get_parameter_source("quant") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--quant applies to --format gguf")
    result = _project(ctx).export(target, directory, force=force, fmt=fmt, quant=quant,
                                  sign_key=_signing_key(sign))
    click.echo(f"{target}: exported {result.files} files to {result.directory}")


@main.command()
@click.argument("target")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created if missing; default main).")
@click.option("--sign", metavar="KEYFILE", is_flag=False, flag_value="", default=None,
              help=_SIGN_HELP)
@click.pass_context
def push(ctx, target, repo_id, private, revision, sign):
    """Verify TARGET's build and upload it to the Hugging Face Hub as REPO_ID."""
    url = _project(ctx).push(target, repo_id, private=private, revision=revision,
                             sign_key=_signing_key(sign))
    click.echo(f"{target}: pushed to {url}")


def invoke(args: list[str] | None = None) -> int:
    """Run the CLI as the console does and return its exit code, output flushed."""
    try:
        main(args=args, prog_name="mergebuild", obj={})
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            click.echo(str(exc.code), err=True)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe loses nothing of ours
            stream.flush()
    return code


def run() -> None:  # pragma: no cover - console entry point
    """The ``mergebuild`` command. Once torch is loaded, the interpreter's teardown (freeing
    torch's modules and objects one by one) costs ~0.5 s on the benchmark machine, a tenth of
    a whole medium merge; everything mergebuild writes is closed and fsynced by the time a
    command returns, so the process leaves at once instead."""
    global _FREEZE_LOADED
    _FREEZE_LOADED = True
    code = invoke()
    if "torch" in sys.modules:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()

