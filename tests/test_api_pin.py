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
