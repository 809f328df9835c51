"""Tests for mergebuild.methods.registry: schema sanity for every method, core schemas."""

import inspect
import subprocess
import sys

import pytest

from mergebuild.methods.registry import METHODS, REQUIRED, Method, Param, register

KINDS = {"float", "int", "bool", "choice"}
ALL_METHODS = sorted({m.name for m in METHODS.values()})


def _method(name: str) -> Method:
    return METHODS[name]


def test_registry_imports_without_torch():
    code = "import sys, mergebuild.methods.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register(Method(name="linear", summary="dup", when_to_use="never", kernel="x:y"))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_function_loads_with_the_documented_signature(name):
    fn = _method(name).load()
    assert callable(fn)
    params = list(inspect.signature(fn).parameters)
    assert len(params) >= 4, f"{name}: merge(parents, base, params, generator)"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_method_shape(name):
    m = _method(name)
    assert m.base in {"none", "required", "optional"}
    assert m.min_parents >= 1
    assert m.max_parents is None or m.max_parents >= m.min_parents
    assert m.summary
    names = [p.name for p in m.params]
    assert len(names) == len(set(names)), f"{name}: duplicate parameter"


@pytest.mark.parametrize(
    "name, param",
    [(m, p) for m in ALL_METHODS for p in METHODS[m].params],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_param_default_is_valid(name, param: Param):
    assert param.kind in KINDS
    assert param.scope in {"parent", "global"}
    if param.minimum is not None and param.maximum is not None:
        assert param.minimum <= param.maximum
    if param.kind == "choice":
        assert param.choices
    if param.required:
        return
    default = param.default
    if param.kind == "bool":
        assert isinstance(default, bool)
    elif param.kind == "choice":
        assert default in param.choices
    else:
        assert isinstance(default, (int, float)) and not isinstance(default, bool)
        if param.kind == "int":
            assert float(default).is_integer()
        if param.minimum is not None:
            assert default > param.minimum or (default == param.minimum and not param.min_exclusive)
        if param.maximum is not None:
            assert default < param.maximum or (default == param.maximum and not param.max_exclusive)


# --- the core methods (methods-A) ------------------------------------------------------

FAMILY = {
    # name: (normalize default, rescale default or None, consensus, extra param)
    "task_arithmetic": (False, None, False, None),
    "ties": (True, "none", True, None),
    "dare_linear": (False, "l1", False, None),
    "dare_ties": (False, "l1", True, None),
    "breadcrumbs": (False, "none", False, "gamma"),
    "breadcrumbs_ties": (False, "none", True, "gamma"),
    "della": (True, "l1", True, "epsilon"),
    "della_linear": (False, "l1", False, "epsilon"),
}


def _schema(m: Method) -> dict:
    return {p.name: (p.default, p.scope) for p in m.params}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_task_arithmetic_family_schema(name):
    normalize, rescale, consensus, extra = FAMILY[name]
    m = _method(name)
    expected = {
        "weight": (REQUIRED, "parent"),
        "normalize": (normalize, "global"),
        "lambda": (1.0, "global"),
    }
    if rescale is not None:
        expected["density"] = (1.0, "parent")
        expected["rescale"] = (rescale, "global")
    if consensus:
        expected["consensus"] = ("sum", "global")
    if extra == "gamma":
        expected["gamma"] = (0.01, "parent")
    if extra == "epsilon":
        expected["epsilon"] = (0.15, "parent")
    assert _schema(m) == expected
    assert m.base == "required"
    assert m.randomized == name.startswith(("dare", "della"))
    assert m.kernel.startswith("mergebuild.methods.task_arithmetic.whole:")
    if rescale is not None:
        assert set(m.param("rescale").choices) == {"l1", "inverse_density", "none", True, False}
        density = m.param("density")
        assert (density.minimum, density.maximum) == (0.0, 1.0)


def test_interpolation_and_passthrough_schemas():
    assert _schema(_method("linear")) == {
        "weight": (REQUIRED, "parent"),
        "normalize": (True, "global"),
    }
    assert _method("linear").base == "none"
    slerp = _method("slerp")
    assert _schema(slerp) == {"t": (REQUIRED, "global")}
    assert slerp.param("t").varies
    assert (slerp.base, slerp.min_parents, slerp.max_parents) == ("required", 1, 1)
    passthrough = _method("passthrough")
    assert _schema(passthrough) == {"scale": (1.0, "parent")}
    assert (passthrough.base, passthrough.max_parents) == ("none", 1)
    assert not any(_method(n).randomized for n in ("linear", "slerp", "passthrough"))


@pytest.mark.parametrize("name", ["linear", "slerp", "passthrough", *sorted(FAMILY)])
def test_core_parameter_names_match_mergekit(name):
    pytest.importorskip(
        "mergekit.merge_methods.registry", reason="mergekit is not installed: names not compared"
    )
    from mergekit.merge_methods import registry

    theirs = {
        p.name: REQUIRED if p.required else p.default for p in registry.get(name).spec.parameters
    }
    theirs.pop("int8_mask", None)  # memory knob with no effect on results: not accepted
    if "rescale" in theirs:  # mergekit's bool, named as our choice
        theirs["rescale"] = "l1" if theirs["rescale"] else "none"
    if name == "task_arithmetic":  # accepted and ignored by mergekit: refused here
        del theirs["density"], theirs["rescale"]
    if name == "passthrough":
        theirs["scale"] = 1.0  # mergekit's None means "unscaled"
    ours = {p.name: p.default for p in _method(name).params}
    ours.pop("consensus", None)  # our explicit option; mergekit hard-wires "sum"
    assert ours == theirs


def test_every_method_says_when_to_use_it():
    from mergebuild.methods.registry import methods_markdown

    assert all(m.when_to_use for m in METHODS.values())
    rows = methods_markdown().splitlines()[2:]
    assert len(rows) == len({m.name for m in METHODS.values()})
    assert "| `karcher` | no | `max_iter` (10), `tol` (1e-05) |" in methods_markdown()


# --- what each method declares it can do ------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
def test_declared_kernels_import(name):
    """The whole-tensor and streamed kernels named by a declaration exist, and the streamed
    one takes the one signature every streamed kernel shares."""
    m = _method(name)
    assert callable(m.load())
    if m.streamed is None:
        assert m.stream_chunk is None
        with pytest.raises(ValueError, match="no streamed kernel"):
            m.load_streamed()
        return
    params = list(inspect.signature(m.load_streamed()).parameters)
    assert params[:7] == ["parents", "base", "params", "seed", "out", "workspace", "consumed"]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_only_elementwise_methods_declare_an_elementwise_many_kernel(name):
    m = _method(name)
    if m.elementwise_many is None:
        assert m.load_elementwise_many() is None
        return
    assert m.elementwise
    params = list(inspect.signature(m.load_elementwise_many()).parameters)
    assert params == ["parents", "base", "params", "outs", "scratch"]


def test_slerp_streams_in_the_chunks_its_dot_products_are_defined_over():
    from mergebuild.methods import slerp

    assert _method("slerp").stream_chunk == slerp.CHUNK_ELEMENTS


# name: (sparsifier, sign consensus, streamed kernel, elementwise)
SETTINGS = {
    "task_arithmetic": (None, False, True, True),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, True, False),
    "dare_ties": ("random", True, True, False),
    "breadcrumbs": ("magnitude_outliers", False, True, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, True, False),
    "della": ("della", True, False, False),
    "della_linear": ("della", False, False, False),
}


def test_every_task_arithmetic_member_has_settings():
    members = {m.name for m in METHODS.values() if m.settings is not None}
    assert members == set(SETTINGS) == set(FAMILY)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_family_member_settings_are_what_its_name_means(name):
    sparsifier, consensus, streamed, elementwise = SETTINGS[name]
    m = _method(name)
    assert (m.settings.sparsifier, m.settings.consensus) == (sparsifier, consensus)
    assert (m.streamed is not None, m.elementwise) == (streamed, elementwise)
    assert m.streamed in (None, "mergebuild.methods.task_arithmetic.streamed:merge")
    assert m.kernel == "mergebuild.methods.task_arithmetic.whole:merge"
    assert m.load().keywords == {"method": m}  # the family kernel reads this declaration


def test_capabilities_of_the_other_methods():
    assert [n for n in ALL_METHODS if _method(n).elementwise] == [
        "linear", "passthrough", "task_arithmetic"]
    assert [n for n in ALL_METHODS if _method(n).passes_through] == ["passthrough"]
    assert sorted(n for n in ALL_METHODS if _method(n).streamed) == sorted(
        ["slerp", *(n for n, s in SETTINGS.items() if s[2])])


def test_streamable_per_tensor():
    from mergebuild.methods.registry import TensorParams

    one = ({"weight": 1.0, "density": 0.5},)
    plain = TensorParams("t", {}, one)
    l1 = TensorParams("t", {"rescale": "l1"}, one)
    assert _method("ties").streamable(plain) and not _method("ties").streamable(l1)
    assert not _method("breadcrumbs").streamable(TensorParams("t", {"rescale": True}, one))
    assert _method("dare_ties").streamable(TensorParams("t", {}, one))  # l1 by default
    assert not _method("della").streamable(plain)
    assert not _method("linear").streamable(plain)
    assert _method("slerp").streamable(TensorParams("t", {"t": 0.3}, ({},)))
    assert not _method("slerp").streamable(TensorParams("t", {"t": None}, ({},)))
