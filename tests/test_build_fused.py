"""The fused pass: variants over the same parents built in one pass equal their separate builds."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest

from mergebuild.build import engine
from mergebuild.build.engine import BuildJob, Participant, SliceInput, run_build, run_builds
from mergebuild.methods.registry import METHODS, Method

# Large enough that the MLP matrices and the embedding (65,536 elements) take the streamed
# and parallel-chunk paths, small enough to build every family many times in seconds.
SHAPE = {"hidden_size": 128, "num_layers": 2, "vocab_size": 512, "intermediate_size": 512,
         "num_heads": 4, "num_kv_heads": 2}


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    from mergebuild.sources.demo import Delta, generate_model

    root = tmp_path_factory.mktemp("fused-models")
    models = {"base": generate_model(root / "base", 0, **SHAPE)}
    for i, (density, scale) in enumerate([(1.0, 0.01), (0.5, 0.02), (0.3, 0.03)], start=1):
        models[f"ft{i}"] = generate_model(root / f"ft{i}", 0, deltas=[
            Delta(seed=i, density=density, scale=scale)], **SHAPE)
    return models


def _defaults(method: Method, scope: str) -> dict[str, Any]:
    return {p.name: p.default for p in method.params if p.scope == scope and not p.required}


def make_job(method_name: str, parents: dict[str, Path], key: str, models: list[str],
             per_parent: list[dict[str, Any]], globals_: dict[str, Any],
             base: str | None = "base", slices=None) -> BuildJob:
    method = METHODS[method_name]
    takes_base = method.base != "none" and base is not None
    return BuildJob(
        node="blend", key=key, method=method, parents=dict(parents),
        participants=tuple(Participant(m, {**_defaults(method, "parent"), **p})
                           for m, p in zip(models, per_parent, strict=True)),
        base=base if takes_base else None, donor=base or models[0],
        global_parameters={**_defaults(method, "global"), **globals_},
        out_dtype="bfloat16", slices=slices, device="cpu",
    )


# One recipe per method family; each variant changes what a sweep would.
THREE = ["ft1", "ft2", "ft3"]
VARIANTS: dict[str, tuple[list[str], list[list[dict]], list[dict]]] = {
    "linear": (THREE, [[{"weight": w}, {"weight": 0.3}, {"weight": 0.2}] for w in (0.1, 0.5, 1.0)],
               [{}, {}, {"normalize": False}]),
    "slerp": (["ft1"], [[{}]] * 3, [{"t": t} for t in (0.2, 0.5, 0.8)]),
    "task_arithmetic": (THREE, [[{"weight": w}, {"weight": 0.5}, {"weight": 0.2}]
                                for w in (0.2, 0.6, 1.0)], [{}, {"lambda": 0.7}, {}]),
    "ties": (THREE, [[{"weight": 0.5, "density": d}, {"weight": 0.3, "density": 0.6},
                      {"weight": 0.2, "density": 0.4}] for d in (0.2, 0.5, 0.9)],
             [{}, {}, {"rescale": "l1"}]),  # l1 after a magnitude cut: the whole-tensor path
    "ties/streamed": (THREE, [[{"weight": 0.5, "density": d}, {"weight": 0.3, "density": 0.6},
                               {"weight": 0.2, "density": 0.4}] for d in (0.2, 0.5, 1.0)],
                      [{}, {"consensus": "count"}, {"normalize": False}]),
    "breadcrumbs/streamed": (THREE, [[{"weight": 0.5, "density": d, "gamma": g},
                                      {"weight": 0.5, "density": 0.7}, {"weight": 0.5}]
                                     for d, g in ((0.4, 0.02), (0.8, 0.0), (0.6, 0.1))],
                             [{}, {}, {"rescale": "inverse_density"}]),
    "dare_ties": (THREE, [[{"weight": 0.4, "density": d}, {"weight": 0.3, "density": 0.5},
                           {"weight": 0.3, "density": 0.5}] for d in (0.3, 0.6, 0.9)],
                  [{}, {"rescale": "inverse_density"}, {}]),
    "dare_linear": (THREE, [[{"weight": 0.4, "density": d}, {"weight": 0.3, "density": 0.5},
                             {"weight": 0.3, "density": 0.5}] for d in (0.3, 0.9)], [{}, {}]),
    "breadcrumbs_ties": (THREE, [[{"weight": 0.5, "density": d, "gamma": 0.02},
                                  {"weight": 0.5, "density": 0.7}, {"weight": 0.5}]
                                 for d in (0.4, 0.8)], [{}, {}]),
    "della": (THREE, [[{"weight": 0.4, "density": d}, {"weight": 0.3, "density": 0.5},
                       {"weight": 0.3, "density": 0.5}] for d in (0.4, 0.7)], [{}, {}]),
    "passthrough": (["ft2"], [[{"scale": s}] for s in (1.0, 0.5, 2.0)], [{}, {}, {}]),
    "nuslerp": (["ft1", "ft2"], [[{"weight": w}, {"weight": 0.5}] for w in (0.2, 0.8)],
                [{}, {"nuslerp_flatten": False}]),
    "multislerp": (THREE, [[{"weight": w}, {"weight": 0.3}, {"weight": 0.2}]
                           for w in (0.2, 0.9)], [{}, {}]),
    "karcher": (THREE, [[{}, {}, {}]] * 2, [{"max_iter": 3}, {"max_iter": 10}]),
    "model_stock": (THREE, [[{}, {}, {}]] * 2, [{}, {"filter_wise": True}]),
    "sce": (THREE, [[{"weight": w}, {"weight": 1.0}, {"weight": 1.0}] for w in (0.5, 1.0)],
            [{"select_topk": 0.5}, {"select_topk": 1.0}]),
    "nearswap": (["ft1"], [[{}]] * 2, [{"t": 0.001}, {"t": 0.01}]),
    "ram": (THREE, [[{}, {}, {}]] * 2, [{"epsilon": 1e-5}, {"epsilon": 1e-3}]),
    "ramplus_tl": (THREE, [[{}, {}, {}]] * 2, [{"r": 0.1}, {"r": 0.5}]),
    "arcee_fusion": (["ft1"], [[{}]] * 2, [{}, {}]),
}


def test_every_method_family_is_covered():
    assert {v.split("/")[0] for v in VARIANTS} | {"della_linear"} == {
        m.name for m in METHODS.values()}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _separate_and_fused(jobs: list[BuildJob], tmp_path: Path):
    separate = []
    for i, job in enumerate(jobs):
        out = tmp_path / f"separate{i}"
        separate.append((run_build(job, out), _files(out)))
    outs = [tmp_path / f"fused{i}" for i in range(len(jobs))]
    fused = run_builds(jobs, outs)
    return separate, [(o, _files(d)) for o, d in zip(fused, outs, strict=True)]


# Recipes whose variants all take one path together: SLERP's and the task-arithmetic
# family's streamed_many kernels, and elementwise methods' shared chunks.
TOGETHER = {"slerp": "compute_streamed_many", "ties/streamed": "compute_streamed_many",
            "breadcrumbs/streamed": "compute_streamed_many",
            "breadcrumbs_ties": "compute_streamed_many",
            "dare_ties": "compute_streamed_many", "dare_linear": "compute_streamed_many",
            "linear": "compute_chunked_many", "task_arithmetic": "compute_chunked_many"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_pass_equals_separate_builds_byte_for_byte(variant, parents, tmp_path,
                                                         monkeypatch):
    method_name = variant.split("/")[0]
    models, per_parent, globals_ = VARIANTS[variant]
    jobs = [make_job(method_name, parents, f"key-{method_name}-{i}", models, pp, g)
            for i, (pp, g) in enumerate(zip(per_parent, globals_, strict=True))]
    together: list[str] = []
    for name in ("compute_streamed_many", "compute_chunked_many"):
        real = getattr(engine._Streaming, name)

        def counted(self, *args, _real=real, _name=name):
            together.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(engine._Streaming, name, counted)
    many_calls: list[int] = []
    if METHODS[method_name].elementwise_many:  # the method's own kernel for the variants
        module, _, attr = METHODS[method_name].elementwise_many.partition(":")
        real_many = getattr(importlib.import_module(module), attr)

        def counted_many(parents, base, params, outs, scratch):
            many_calls.append(len(outs))
            return real_many(parents, base, params, outs, scratch)

        monkeypatch.setattr(importlib.import_module(module), attr, counted_many)
    separate, fused = _separate_and_fused(jobs, tmp_path)
    if variant in TOGETHER:
        assert together and set(together) == {TOGETHER[variant]}
    else:
        assert together == []
    if METHODS[method_name].elementwise_many:
        assert many_calls and set(many_calls) == {len(jobs)}
    for (s_out, s_files), (f_out, f_files) in zip(separate, fused, strict=True):
        assert f_files == s_files
        assert f_out.digest == s_out.digest
    # The variants really differ (a fused pass handing one job's output to all would pass
    # the byte comparison only if every variant were the same) — except recipes whose knobs
    # change nothing on these models.
    if method_name not in ("arcee_fusion", "ram", "nearswap", "karcher"):
        assert len({out.digest for out, _ in fused}) == len(jobs)


def test_fused_slices_equal_separate_builds(parents, tmp_path):
    def sliced(key: str, scale: float) -> BuildJob:
        slices = (SliceInput(sources=(("ft1", (0, 2), {"scale": scale}),)),
                  SliceInput(sources=(("ft2", (1, 2), {"scale": 1.0}),)))
        return make_job("passthrough", parents, key, ["ft1"], [{}], {}, base=None,
                        slices=slices)

    separate, fused = _separate_and_fused([sliced("a", 1.0), sliced("b", 0.25)], tmp_path)
    assert [f for _, f in fused] == [f for _, f in separate]
    assert fused[0][0].digest != fused[1][0].digest


def test_jobs_with_different_tensor_tables_are_built_one_after_another(parents, tmp_path):
    plain = make_job("linear", parents, "plain", ["ft1", "ft2"], [{"weight": 1.0}] * 2, {})
    stacked = make_job("passthrough", parents, "stacked", ["ft1"], [{}], {}, base=None,
                       slices=(SliceInput(sources=(("ft1", (0, 2), {}),)),
                               SliceInput(sources=(("ft1", (0, 2), {}),))))
    separate, fused = _separate_and_fused([plain, stacked], tmp_path)
    assert [f for _, f in fused] == [f for _, f in separate]


def test_fused_pass_reads_each_parent_tensor_once(parents, tmp_path, monkeypatch):
    """Each parent is opened once, each input tensor of an elementwise or ``streamed_many``
    method is loaded once for all variants, and no page is dropped before its last reader."""
    from mergebuild.io.checkpoint import CheckpointReader

    opened: list[Path] = []
    real_init = CheckpointReader.__init__

    def counting_init(self, directory, *args, **kwargs):
        opened.append(Path(directory))
        real_init(self, directory, *args, **kwargs)

    loads: list[str] = []
    real_load = engine._load

    def counting_load(readers, stream, info, checked_for=None, finite=None):
        loads.append((info.name, info.numel))
        return real_load(readers, stream, info, checked_for, finite)

    dropped_by: list[bool] = []
    real_drop = engine._Streaming.drop_pages

    def recording_drop(self, info, first, stop):
        dropped_by.append(self.drops)
        return real_drop(self, info, first, stop)

    monkeypatch.setattr(CheckpointReader, "__init__", counting_init)
    monkeypatch.setattr(engine, "_load", counting_load)
    monkeypatch.setattr(engine._Streaming, "drop_pages", recording_drop)
    for method_name, count in (("linear", 4), ("slerp", 3)):
        models, per_parent, globals_ = VARIANTS[method_name]
        jobs = [make_job(method_name, parents, f"k{i}", models, per_parent[i % 3],
                         globals_[i % 3]) for i in range(count)]
        opened.clear()
        loads.clear()
        dropped_by.clear()
        outs = [tmp_path / method_name / f"o{i}" for i in range(count)]
        engine.run_builds(jobs, outs)
        assert sorted(opened) == sorted(Path(p) for p in parents.values())  # each parent once
        # Once per tensor, not once per variant (SLERP's tiny norms are merged whole, per
        # variant: its streamed kernels start at _STREAM_MIN_ELEMENTS).
        large = [name for name, numel in loads if numel >= engine._STREAM_MIN_ELEMENTS]
        inputs = len(models) + (method_name == "slerp")  # slerp also reads its base
        assert large and len(large) == len(set(large)) * inputs
        if method_name == "linear":  # elementwise: every tensor, whatever its size
            assert len(loads) == len({name for name, _ in loads}) * inputs
        assert True in dropped_by  # pages are dropped, by the last reader (the one pass)
        if method_name == "linear":
            assert all(dropped_by)


def test_fused_jobs_must_share_their_parents(parents, tmp_path):
    a = make_job("linear", parents, "a", ["ft1"], [{"weight": 1.0}], {})
    b = make_job("linear", {k: v for k, v in parents.items() if k != "ft3"}, "b", ["ft1"],
                 [{"weight": 1.0}], {})
    with pytest.raises(ValueError, match="share their parents"):
        run_builds([a, b], [tmp_path / "a", tmp_path / "b"])


def test_outputs_over_the_budget_are_computed_in_groups(parents, tmp_path, monkeypatch):
    """With room for two variants' outputs of the largest tensor, four TIES variants take
    that tensor in two groups (each one read of the inputs), with the same bytes."""
    from mergebuild.io.checkpoint import CheckpointReader

    models, per_parent, globals_ = VARIANTS["ties/streamed"]
    jobs = [make_job("ties", parents, f"g{i}", models, per_parent[i % 3], globals_[i % 3])
            for i in range(4)]
    largest = max(info.nbytes for info in CheckpointReader(parents["base"]).tensors.values())
    monkeypatch.setattr(engine, "_queued_budget", lambda tables: 2 * largest)
    assert engine._groups([largest] * 4, 2 * largest) == [[0, 1], [2, 3]]
    separate, fused = _separate_and_fused(jobs, tmp_path)
    assert [f for _, f in fused] == [f for _, f in separate]


def test_each_parent_tensor_is_checked_once_whatever_the_groups(parents, tmp_path,
                                                                monkeypatch):
    """When a tensor's variants are computed in several groups (their outputs exceed the
    writers' budget), each group reads the parent tensors again but checks them once."""
    from mergebuild.io.checkpoint import CheckpointReader

    checked: list[int] = []
    real = engine._magnitude

    def counting(torch, tensor):
        checked.append(tensor.data_ptr())
        return real(torch, tensor)

    models, per_parent, globals_ = VARIANTS["linear"]
    jobs = [make_job("linear", parents, f"g{i}", models, per_parent[i % 3], globals_[i % 3])
            for i in range(4)]
    largest = max(info.nbytes for info in CheckpointReader(parents["base"]).tensors.values())
    monkeypatch.setattr(engine, "_queued_budget", lambda tables: 2 * largest)
    monkeypatch.setattr(engine, "_magnitude", counting)
    run_builds(jobs, [tmp_path / f"o{i}" for i in range(4)])
    inputs = sum(len(CheckpointReader(parents[m]).tensors) for m in models)
    assert len(checked) == inputs  # 2 groups for the largest tensors, one check each


@pytest.mark.parametrize("variant", ["linear", "slerp", "ties/streamed"])
def test_large_outputs_are_checked_on_the_merge_threads(variant, parents, tmp_path,
                                                        monkeypatch):
    """Outputs that the chunked and streamed paths write are checked for NaN/Inf span by
    span as they are written (every element once), not read again whole afterwards."""
    method_name = variant.split("/")[0]
    models, per_parent, globals_ = VARIANTS[variant]
    jobs = [make_job(method_name, parents, f"c{i}", models, pp, g)
            for i, (pp, g) in enumerate(zip(per_parent, globals_, strict=True))]
    verdicts: list[tuple[int, bool]] = []
    real = engine._OutputChecks.finite

    def finite(self, k, out):
        flat = self.flats[k]
        verdicts.append((out.numel(), flat is not None and self.covered[k] == flat.numel()))
        return real(self, k, out)

    monkeypatch.setattr(engine._OutputChecks, "finite", finite)
    if method_name == "linear":  # a lone build's tensors of 65,536 elements (these models'
        # largest) take the parallel chunked path too
        monkeypatch.setattr(engine, "_STREAM_CHUNK", 1 << 14)
    # The methods' bounds would prove these outputs finite (and spare the check): not asked.
    monkeypatch.setattr(Method, "load_bound", lambda self: None)
    for fused in (False, True):
        verdicts.clear()
        if fused:
            run_builds(jobs, [tmp_path / f"f{i}" for i in range(len(jobs))])
        else:
            run_build(jobs[0], tmp_path / "alone")
        large = [spanned for numel, spanned in verdicts
                 if numel >= engine._STREAM_MIN_ELEMENTS]
        assert large and all(large)


def test_a_variant_that_overflows_stops_the_fused_pass(parents, tmp_path):
    """A variant whose arithmetic overflows is caught on the merge threads and named; the
    same variant with allow_nonfinite builds, with the Inf written."""
    from dataclasses import replace

    from mergebuild.errors import IncompatibleModelsError

    ok = make_job("linear", parents, "ok", THREE,
                  [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {})
    bad = replace(make_job("linear", parents, "bad", THREE,
                           [{"weight": 3e38}, {"weight": 3e38}, {"weight": 3e38}],
                           {"normalize": False}), node="blend[w=3e38]")
    with pytest.raises(IncompatibleModelsError, match="produced NaN or Inf") as caught:
        run_builds([ok, bad], [tmp_path / "ok", tmp_path / "bad"])
    assert caught.value.node == "blend[w=3e38]"
    allowed = replace(bad, allow_nonfinite=True)
    run_builds([ok, allowed], [tmp_path / "ok2", tmp_path / "bad2"])


def test_a_fused_pass_writes_one_tensor_per_core_at_a_time(parents, tmp_path, monkeypatch):
    """The writers of a fused pass share one lane of as many tensors as there are cores; a
    lone build's writer has none."""
    from mergebuild.io import checkpoint

    lanes: list[Any] = []
    real = checkpoint.CheckpointWriter.__init__

    def recording(self, *args, lane=None, **kwargs):
        lanes.append(lane)
        real(self, *args, lane=lane, **kwargs)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "__init__", recording)
    models, per_parent, globals_ = VARIANTS["linear"]
    jobs = [make_job("linear", parents, f"l{i}", models, pp, g)
            for i, (pp, g) in enumerate(zip(per_parent, globals_, strict=True))]
    run_builds(jobs, [tmp_path / f"o{i}" for i in range(len(jobs))])
    assert len(lanes) == len(jobs) and len({id(lane) for lane in lanes}) == 1
    assert lanes[0]._value == engine._cores()
    lanes.clear()
    run_build(jobs[0], tmp_path / "alone")
    assert lanes == [None]


def test_a_fused_pass_writes_its_outputs_with_direct_io(parents, tmp_path, monkeypatch):
    """Each output weight file of a fused pass is opened with O_DIRECT (the page cache is
    left to the parents); a lone build's goes through the page cache. Same bytes: the
    byte-for-byte tests above compare the two."""
    import os

    from mergebuild.io import checkpoint

    opened: list[tuple[str, bool]] = []
    real = checkpoint.os.open

    def recording(path, flags, *args):
        if str(path).endswith(".safetensors") and flags & os.O_WRONLY:
            opened.append((Path(path).parent.name, bool(flags & os.O_DIRECT)))
        return real(path, flags, *args)

    monkeypatch.setattr(checkpoint.os, "open", recording)
    models, per_parent, globals_ = VARIANTS["linear"]
    jobs = [make_job("linear", parents, f"l{i}", models, pp, g)
            for i, (pp, g) in enumerate(zip(per_parent, globals_, strict=True))]
    run_builds(jobs, [tmp_path / f"o{i}" for i in range(len(jobs))])
    assert sorted(opened) == [(f"o{i}", True) for i in range(len(jobs))]
    opened.clear()
    run_build(jobs[0], tmp_path / "alone")
    assert opened == [("alone", False)]


def test_outputs_a_bound_proves_finite_are_not_checked(parents, tmp_path, monkeypatch):
    """Linear's bound (Σ|w|·max|x|, over |Σw| when normalised) proves ordinary variants
    finite from the parents' magnitudes, which the parents' own check yields: their outputs
    are not checked at all, alone or fused, and the bytes are the same."""

    spans: list[int] = []
    real = engine._span_finite

    def counting(torch, span, scratch):
        spans.append(span.numel())
        return real(torch, span, scratch)

    monkeypatch.setattr(engine, "_span_finite", counting)
    models, per_parent, globals_ = VARIANTS["linear"]
    jobs = [make_job("linear", parents, f"p{i}", models, per_parent[i], globals_[i])
            for i in range(3)]
    separate, fused = _separate_and_fused(jobs, tmp_path)
    assert [f for _, f in fused] == [f for _, f in separate]
    assert spans == []  # nothing checked: every output was proven finite
    # A variant its bound cannot prove (here: a bound that gives up on a weight of 0.7) is
    # checked, every element of its output once.
    from mergebuild.methods import linear

    real_bound = linear.linear_bound

    def doubting(parents_, base, params):
        return math.inf if params.parents[0]["weight"] == 0.7 else real_bound(parents_, base,
                                                                              params)

    monkeypatch.setattr(linear, "linear_bound", doubting)
    unsure = make_job("linear", parents, "unsure", models,
                      [{"weight": 0.7}, {"weight": 0.2}, {"weight": 0.1}], {})
    run_builds([jobs[0], unsure], [tmp_path / "h0", tmp_path / "h1"])
    written = engine.CheckpointReader(tmp_path / "h1").tensors.values()
    assert spans and sum(spans) == sum(math.prod(info.shape) for info in written)
