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
