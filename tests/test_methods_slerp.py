"""Tests for mergebuild.methods.slerp: spherical interpolation from the base model."""

import math

import pytest
import torch
from torch.testing import assert_close

from mergebuild.methods.registry import TensorParams
from mergebuild.methods.slerp import merge_slerp

NAME = "model.layers.0.mlp.gate_proj.weight"


def run(base, other, t):
    return merge_slerp([other.clone()], base.clone(), TensorParams(NAME, {"t": t}, ({},)), None)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_endpoints_return_the_parents_exactly():
    base, other = randn(7, 5, seed=1), randn(7, 5, seed=2)
    assert torch.equal(run(base, other, 0.0), base)
    assert torch.equal(run(base, other, 1.0), other)


def test_orthogonal_vectors_by_hand():
    s = math.sin(math.pi / 4)
    assert_close(run(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5), torch.tensor([s, s]))
    # coefficients apply to the unnormalised tensors
    assert_close(
        run(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0]), 0.5), torch.tensor([2 * s, 4 * s])
    )
    t = 0.25
    assert_close(
        run(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), t),
        torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]),
    )


def test_nearly_collinear_falls_back_to_linear():
    base = torch.tensor([1.0, 2.0, 3.0])
    assert_close(run(base, 3 * base, 0.25), 0.75 * base + 0.25 * 3 * base)
    assert_close(run(base, -base, 0.25), 0.75 * base - 0.25 * base)


def test_zero_base_is_not_normalised():
    other = torch.tensor([1.0, -2.0])
    assert_close(run(torch.zeros(2), other, 0.5), math.sin(math.pi / 4) * other)


def test_result_norm_stays_on_the_arc_for_unit_vectors():
    base, other = randn(100, seed=3), randn(100, seed=4)
    base, other = base / base.norm(), other / other.norm()
    for t in (0.1, 0.5, 0.9):
        assert run(base, other, t).norm().item() == pytest.approx(1.0, abs=1e-5)


def test_needs_base_one_other_and_t():
    with pytest.raises(ValueError, match="exactly one"):
        merge_slerp([torch.ones(2)], None, TensorParams(NAME, {"t": 0.5}, ({},)), None)
    with pytest.raises(ValueError, match="exactly one"):
        merge_slerp(
            [torch.ones(2), torch.ones(2)],
            torch.ones(2),
            TensorParams(NAME, {"t": 0.5}, ({}, {})),
            None,
        )
    with pytest.raises(ValueError, match="'t'"):
        merge_slerp([torch.ones(2)], torch.ones(2), TensorParams(NAME, {}, ({},)), None)


def test_matches_mergekit():
    pytest.importorskip(
        "mergekit.merge_methods.registry", reason="mergekit is not installed: agreement not checked"
    )
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base, other = randn(32, 24, seed=5), randn(32, 24, seed=6)
    for t in (0.0, 0.3, 0.5, 1.0):
        expected = registry.get("slerp")(
            [TensorGroup.from_tensors([base, other], base_index=0)], parameters={"t": t}
        )[0]
        assert_close(run(base, other, t), expected)
    near = base + 1e-3 * other  # collinear branch
    expected = registry.get("slerp")(
        [TensorGroup.from_tensors([base, near], base_index=0)], parameters={"t": 0.4}
    )[0]
    assert_close(run(base, near, 0.4), expected)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("kind", ["random", "collinear", "zero-base"])
def test_streamed_slerp_is_bit_for_bit_the_whole_tensor_slerp(workers, kind):
    """The engine's chunked SLERP (bf16 parents read a chunk at a time, dot products per
    chunk on worker threads) gives the bytes of merge_slerp on whole float32 tensors."""
    from mergebuild.methods.chunks import ChunkWorkspace
    from mergebuild.methods.slerp import _MIX_ELEMENTS, CHUNK_ELEMENTS, merge_slerp_streamed

    n = 3 * CHUNK_ELEMENTS + 12345  # several chunks and a ragged tail
    base = randn(n, seed=3).bfloat16()
    other = {"random": randn(n, seed=4),
             "collinear": base.float() * 1.0001 + randn(n, seed=5) * 1e-6,
             "zero-base": randn(n, seed=6)}[kind].bfloat16()
    if kind == "zero-base":
        base = torch.zeros_like(base)
    expected = run(base.float(), other.float(), 0.37).bfloat16()
    out = torch.empty(n, dtype=torch.bfloat16)
    t037 = TensorParams("t", {"t": 0.37}, ({},))
    seen = []
    workspace = ChunkWorkspace(workers, CHUNK_ELEMENTS)
    try:
        merge_slerp_streamed([other], base, t037, None, out, workspace,
                             lambda s, e: seen.append((s, e)))
    finally:
        workspace.close()
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    # consumed(s, e) once per span of the mix, which covers the whole tensor once
    assert sorted(seen) == [(s, min(n, s + _MIX_ELEMENTS)) for s in range(0, n, _MIX_ELEMENTS)]
    with pytest.raises(ValueError, match="chunk must be"):
        merge_slerp_streamed([other], base, t037, None, out, ChunkWorkspace(1, 1 << 16))


def test_slerp_bound_covers_every_value_the_kernel_computes():
    """Against the kernel, on nearly collinear, orthogonal and nearly opposite tensors (where
    the spherical coefficients are largest), t inside and outside [0, 1]."""
    from mergebuild.methods.slerp import _DOT_THRESHOLD, slerp_bound

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g)
    noise = torch.randn(4096, generator=g)
    for other in (a + 0.001 * noise, noise, -a + 0.03 * noise, -a + 0.05 * noise):
        cos = float(torch.dot(a, other) / (a.norm() * other.norm()))
        for t in (-0.5, 0.0, 0.3, 0.5, 1.0, 1.7):
            params = TensorParams("w", {"t": t}, ({},))
            out = merge_slerp([other.clone()], a.clone(), params)
            bound = slerp_bound([float(other.abs().max())], float(a.abs().max()), params)
            assert float(out.abs().max()) <= bound, (cos, t)
            assert bound < 1e9  # the dot products': 2^20 · max|x|², far from overflow
    assert -_DOT_THRESHOLD < cos < -0.99  # the last pair: spherical, nearly opposite
    with pytest.raises(ValueError, match="exactly one other model"):
        slerp_bound([1.0], None, TensorParams("w", {"t": 0.5}, ({},)))
    with pytest.raises(ValueError, match="'t'"):
        slerp_bound([1.0], 1.0, TensorParams("w", {}, ({},)))
