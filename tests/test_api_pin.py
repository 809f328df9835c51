"""`mergebuild pin`: named builds that gc keeps whatever becomes of their node."""

from __future__ import annotations

from click.testing import CliRunner

from mergebuild.cli import main
from mergebuild.provenance.integrity import verify_directory


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def test_a_pinned_build_survives_its_node_leaving_the_mergefile(workspace):
    workspace.chain()
    assert run(workspace, "make", "chat-code").exit_code == 0
    built = workspace.project().path("chat-code")
    pinned = run(workspace, "pin", "chat-code", "--as", "v1.0")
    assert pinned.exit_code == 0, pinned.output
    assert pinned.output == f"pinned chat-code as v1.0: {built}\n"
    listed = run(workspace, "pin", "--list").output.splitlines()
    assert len(listed) == 1 and listed[0].split("\t")[:2] == ["v1.0", "chat-code"]
    assert listed[0].split("\t")[3] == str(built)

    # chat-code's t changes and it is rebuilt: only the pin still reaches the old build.
    text = workspace.mergefile.read_text()
    workspace.mergefile.write_text(text.replace("t: 0.4", "t: 0.7"))
    assert "t: 0.7" in workspace.mergefile.read_text()
    assert run(workspace, "make", "chat-code").exit_code == 0
    assert workspace.project().path("chat-code") != built
    gc = run(workspace, "gc")
    assert gc.exit_code == 0, gc.output
    assert str(built) not in gc.output and built.is_dir()
    assert verify_directory(built) == []

    unpinned = run(workspace, "pin", "--remove", "v1.0")
    assert unpinned.exit_code == 0 and unpinned.output == "unpinned v1.0\n"
    assert run(workspace, "pin", "--list").output == ""
    gc = run(workspace, "gc")
    assert f"removed object {built}" in gc.output and not built.exists()


def test_pin_errors_are_one_line_and_write_nothing(workspace):
    workspace.chain()
    cases = [
        (("pin", "chat-code"), 4, "node 'chat-code': not built"),
        (("pin", "chat", "--as", "x"), 4, "only builds can be pinned"),
        (("pin", "nope"), 2, "no node named 'nope'"),
        (("pin", "--remove", "v9"), 4, "no pin named 'v9'"),
    ]
    assert run(workspace, "make", "base-instruct").exit_code == 0
    cases.append((("pin", "base-instruct", "--as", "../evil"), 2, "invalid pin name '../evil'"))
    for args, code, message in cases:
        result = run(workspace, *args)
        assert result.exit_code == code, (args, result.output)
        assert result.output.count("\n") == 1 and message in result.output, result.output
        assert not (workspace.cache / "pins").exists() or not any(
            (workspace.cache / "pins").iterdir()), args


def test_a_pin_moves_only_with_force_and_names_its_build_everywhere(workspace):
    """`pin NAME` never silently moves an existing pin (gc would then delete the release it
    kept); a pin's name works wherever a build is named: path, export, lineage, verify."""
    from cli_process import run_cli

    def cli(*args):
        return run_cli(["--cache-dir", str(workspace.cache), *args], cwd=workspace.root)

    workspace.chain()
    assert cli("make", "chat-code").returncode == 0
    release = workspace.project().path("chat-code")
    assert cli("pin", "chat-code", "--as", "v1.0").returncode == 0
    assert cli("pin", "chat-code", "--as", "v1.0").returncode == 0  # same build: no change

    workspace.mergefile.write_text(workspace.mergefile.read_text().replace("t: 0.4", "t: 0.7"))
    assert cli("make", "chat-code").returncode == 0
    rebuilt = workspace.project().path("chat-code")
    moved = cli("pin", "chat-code", "--as", "v1.0")
    assert moved.returncode == 4 and len(moved.error_lines) == 1, moved.stderr
    assert moved.error_lines[0].startswith("mergebuild: error: pin 'v1.0' already exists: "
                                           f"it keeps chat-code's build {release.name[:12]}")
    assert "pass --force to move it" in moved.error_lines[0]
    assert workspace.project().pins()["v1.0"]["key"] == release.name

    # The pin names the release, the node its current build.
    for name in ("v1.0", "pin:v1.0"):
        shown = cli("path", name)
        assert (shown.returncode, shown.stdout) == (0, f"{release}\n"), shown.stderr
    assert cli("path", "chat-code").stdout == f"{rebuilt}\n"
    verified = cli("verify", "v1.0")
    assert verified.returncode == 0 and verified.stdout.startswith("verified "), verified.stderr
    lineage = cli("lineage", "v1.0", "--json")
    assert lineage.returncode == 0, lineage.stderr
    assert '"t": 0.4' in lineage.stdout and '"t": 0.7' not in lineage.stdout
    exported = cli("export", "v1.0", str(workspace.root / "release"))
    assert exported.returncode == 0, exported.stderr
    assert (workspace.root / "release" / "model.safetensors").read_bytes() == (
        release / "model.safetensors").read_bytes()
    missing = cli("path", "pin:v2")
    assert missing.returncode == 4 and "no pin named 'v2'" in missing.stderr

    forced = cli("pin", "chat-code", "--as", "v1.0", "--force")
    assert forced.returncode == 0, forced.stderr
    assert workspace.project().pins()["v1.0"]["key"] == rebuilt.name
    gc = cli("gc")
    assert f"removed object {release}" in gc.stdout and rebuilt.is_dir()
