"""inspect: task-vector cosines, sign conflicts, norms, kept shares and merge survival."""

from __future__ import annotations

import json
import math
import struct
import weakref
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from mergebuild.errors import IncompatibleModelsError, MergebuildError
from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.sources.demo import Delta, generate_model
from mergebuild.verbs.inspect import InspectReport, inspect_models, plot, render_table, tensor_kind

Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"

# Hand-computable task vectors on 16 entries (read as 4×4):
#   τ_A = +2 on entries 0-3, +1 on 4-7           ‖τ_A‖² = 20, 8 changed
#   τ_B = +1 on 4-5, −1 on 6-7, −1 on 12-15       ‖τ_B‖² = 8,  8 changed
# They share entries 4-7 (two agree, two conflict) and ⟨τ_A, τ_B⟩ = 1+1−1−1 = 0.
TAU_A = torch.tensor([2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
TAU_B = torch.tensor([0, 0, 0, 0, 1, 1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1], dtype=torch.float32)


def _base() -> dict[str, torch.Tensor]:
    # Multiples of 0.25: base + τ and merged − base are exact in float32.
    grid = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 4
    return {Q0: grid, Q1: grid - 1, NORM: torch.ones(4), EMBED: grid + 3}


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def hand_models(tmp_path) -> dict[str, Path]:
    """base; A and B (layer 0 orthogonal, layer 1 B = A; B lacks the final norm); a linear
    0.5/0.5 merge of them; embeddings untouched everywhere."""
    base = _base()
    a = {Q0: base[Q0] + TAU_A.view(4, 4), Q1: base[Q1] + TAU_A.view(4, 4),
         NORM: base[NORM] + torch.tensor([0.5, 0, 0, 0]), EMBED: base[EMBED]}
    b = {Q0: base[Q0] + TAU_B.view(4, 4), Q1: base[Q1] + TAU_A.view(4, 4), EMBED: base[EMBED]}
    merged = {name: base[name] + 0.5 * (a[name] - base[name])
              + (0.5 * (b[name] - base[name]) if name in b else 0) for name in base}
    return {"base": _write(tmp_path / "base", base), "A": _write(tmp_path / "A", a),
            "B": _write(tmp_path / "B", b), "AB": _write(tmp_path / "AB", merged)}


@pytest.fixture
def hand_report(hand_models) -> InspectReport:
    return inspect_models({"A": hand_models["A"], "B": hand_models["B"]}, hand_models["base"],
                          merged={"AB": hand_models["AB"]}, density=0.25)


def _group(report: InspectReport, layer, kind):
    (group,) = [g for g in report.groups if (g.layer, g.kind) == (layer, kind)]
    return group


def test_tensor_kind_drops_layer_and_weight_suffix():
    assert tensor_kind(Q0) == "self_attn.q_proj"
    assert tensor_kind("model.layers.12.mlp.down_proj.weight") == "mlp.down_proj"
    assert tensor_kind("model.layers.2.self_attn.q_proj.bias") == "self_attn.q_proj.bias"
    assert tensor_kind(EMBED) == "embed_tokens"
    assert tensor_kind(NORM) == "norm"
    assert tensor_kind("lm_head.weight") == "lm_head"


def test_pair_cosine_and_sign_conflict_are_exact(hand_report):
    orthogonal = _group(hand_report, 0, "self_attn.q_proj").pairs["A", "B"]
    assert orthogonal.dot == 0.0
    assert orthogonal.cosine == 0.0
    assert (orthogonal.both_changed, orthogonal.sign_conflicts) == (4, 2)
    assert orthogonal.conflict_rate == 0.5

    same = _group(hand_report, 1, "self_attn.q_proj").pairs["A", "B"]
    assert same.cosine == pytest.approx(1.0, abs=1e-15)
    assert (same.both_changed, same.sign_conflicts, same.conflict_rate) == (8, 0, 0.0)


def test_groups_add_up_by_kind_and_by_layer(hand_report):
    q = hand_report.by_kind()["self_attn.q_proj"].pairs["A", "B"]
    # layer 0 (dot 0, ‖A‖² 20, ‖B‖² 8) + layer 1 (dot 20, 20, 20)
    assert (q.dot, q.sq_norm_a, q.sq_norm_b) == (20.0, 40.0, 28.0)
    assert q.cosine == pytest.approx(20 / math.sqrt(40 * 28), abs=1e-15)
    assert q.conflict_rate == pytest.approx(2 / 12, abs=1e-15)
    assert set(hand_report.by_layer()) == {0, 1}
    assert hand_report.by_layer()[1].pairs["A", "B"].cosine == pytest.approx(1.0, abs=1e-15)
    total_a = hand_report.total().vectors["A"]
    assert (total_a.tensors, total_a.numel, total_a.changed) == (4, 52, 17)
    assert total_a.sq_norm == 20 + 20 + 0.25


def test_norms_and_changed_share(hand_report):
    a = _group(hand_report, 0, "self_attn.q_proj").vectors["A"]
    b = _group(hand_report, 0, "self_attn.q_proj").vectors["B"]
    assert (a.sq_norm, a.norm, a.changed, a.changed_share) == (20.0, math.sqrt(20), 8, 0.5)
    assert (b.sq_norm, b.changed) == (8.0, 8)


def test_density_share_follows_the_ties_magnitude_trim(hand_report, hand_models):
    # density 0.25 of 16 entries keeps the top 4 by |τ|: A's four 2s (16 of its 20 L2² mass);
    # for B, four of its eight 1s (ties broken by index), half its mass.
    a = _group(hand_report, 0, "self_attn.q_proj").vectors["A"]
    b = _group(hand_report, 0, "self_attn.q_proj").vectors["B"]
    assert (a.kept, a.kept_sq_norm, a.kept_changed_share, a.kept_mass_share) == (4, 16.0, 0.5, 0.8)
    assert (b.kept, b.kept_mass_share, b.kept_changed_share) == (4, 0.5, 0.5)
    half = inspect_models({"A": hand_models["A"]}, hand_models["base"], density=0.5)
    kept = _group(half, 0, "self_attn.q_proj").vectors["A"]
    assert (kept.kept_changed_share, kept.kept_mass_share) == (1.0, 1.0)


def test_linear_merge_keeps_half_of_each_orthogonal_parent(hand_report):
    survival = _group(hand_report, 0, "self_attn.q_proj").survival
    a, b = survival["AB", "A"], survival["AB", "B"]
    # merged − base = ½τ_A + ½τ_B with τ_A ⟂ τ_B: projection ½ on each, ‖move‖² = 5 + 2 = 7
    assert (a.projection, b.projection) == (0.5, 0.5)
    assert a.sq_norm_merged == 7.0
    assert a.cosine == pytest.approx(10 / math.sqrt(7 * 20), abs=1e-15)
    assert b.cosine == pytest.approx(4 / math.sqrt(7 * 8), abs=1e-15)
    # layer 1: τ_B = τ_A, so the merge moved exactly one τ_A
    same = _group(hand_report, 1, "self_attn.q_proj").survival["AB", "A"]
    assert (same.projection, same.cosine) == (1.0, 1.0)


def test_missing_tensor_is_skipped_with_a_note_and_untouched_tensors_are_undefined(hand_report):
    norm = _group(hand_report, None, "norm")
    assert set(norm.vectors) == {"A"} and norm.pairs == {}
    assert norm.survival["AB", "A"].projection == 0.5
    assert hand_report.notes == ("'B' lacks 1 base tensor(s), skipped for it: model.norm.weight",)
    embed = _group(hand_report, None, "embed_tokens")
    assert embed.vectors["A"].changed == 0 and embed.vectors["A"].kept_mass_share is None
    assert embed.pairs["A", "B"].cosine is None
    assert embed.pairs["A", "B"].conflict_rate is None


def test_shape_mismatch_names_the_tensor_and_the_model(hand_models, tmp_path):
    tensors = _base() | {Q0: torch.zeros(4, 5)}
    wide = _write(tmp_path / "wide", tensors)
    with pytest.raises(IncompatibleModelsError, match=r"node 'wide': tensor "
                       r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[4, 5\]"):
        inspect_models({"wide": wide}, hand_models["base"])


def test_bad_arguments_are_refused(hand_models):
    with pytest.raises(MergebuildError, match="density must be in"):
        inspect_models({"A": hand_models["A"]}, hand_models["base"], density=0)
    with pytest.raises(MergebuildError, match="at least one model"):
        inspect_models({}, hand_models["base"])
    with pytest.raises(MergebuildError, match="node 'nowhere'.*is not a directory"):
        inspect_models({"nowhere": hand_models["base"] / "nope"}, hand_models["base"])


def test_json_round_trips(hand_report):
    data = json.loads(json.dumps(hand_report.to_json(), allow_nan=False))
    assert InspectReport.from_json(data) == hand_report
    q0 = data["groups"][[(g["layer"], g["kind"]) for g in data["groups"]].index(
        (0, "self_attn.q_proj"))]
    assert q0["pairs"] == [{"a": "A", "b": "B", "dot": 0.0, "sq_norm_a": 20.0, "sq_norm_b": 8.0,
                            "both_changed": 4, "sign_conflicts": 2, "cosine": 0.0,
                            "conflict_rate": 0.5}]
    assert data["summary"]["total"]["survival"][0]["merged"] == "AB"
    assert [g["layer"] for g in data["summary"]["by_layer"]] == [0, 1]


def test_table_shows_every_section(hand_report):
    console = Console(width=200, record=True)
    console.print(render_table(hand_report))
    text = console.export_text()
    for heading in ("Task vectors vs base", "Pairs (all tensors)", "By tensor kind",
                    "By layer", "Merge survival", "AB ← A", "note: 'B' lacks"):
        assert heading in text
    pairs_row = next(line for line in text.splitlines() if line.startswith("│ A·B"))
    assert "0.598" in pairs_row and "16.7%" in pairs_row  # cosine 20/√1120, conflicts 2/12


def test_plot_writes_png_and_svg(hand_report, tmp_path):
    png = plot(hand_report, tmp_path / "inspect.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600
    svg = plot(hand_report, tmp_path / "sub" / "inspect.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "cosine of task vectors" in svg
    with pytest.raises(MergebuildError, match="cannot plot to 'inspect.gif'"):
        plot(hand_report, tmp_path / "inspect.gif")


def test_demo_family_relations(demo_models):
    report = inspect_models({k: demo_models[k] for k in ("instruct", "chat", "code", "math")},
                            demo_models["base"], density=0.5)
    pairs = report.total().pairs
    # chat continues from instruct: strongly aligned, few sign conflicts
    assert pairs["instruct", "chat"].cosine > 0.9
    assert pairs["instruct", "chat"].conflict_rate < 0.15
    # independent deltas: near-orthogonal, signs agree by chance (about half conflict)
    assert abs(pairs["code", "math"].cosine) < 0.05
    assert 0.4 < pairs["code", "math"].conflict_rate < 0.6
    # code changes 10% of entries: a density-0.5 trim keeps all of it
    code = report.total().vectors["code"]
    assert code.changed_share == pytest.approx(0.1, abs=0.01)
    assert (code.kept_changed_share, code.kept_mass_share) == (1.0, 1.0)
    # code's focus layers (0, 1) carry the larger norms
    layers = report.by_layer()
    assert min(layers[0].vectors["code"].norm, layers[1].vectors["code"].norm) > 2 * max(
        layers[2].vectors["code"].norm, layers[3].vectors["code"].norm)
    assert report.notes == ()


def test_streams_one_tensor_name_at_a_time(tmp_path, monkeypatch):
    """No tensor of an earlier name is alive when the next is loaded, and each (model, tensor)
    is read exactly once: memory is bounded by one tensor per model, not by model size."""
    base = generate_model(tmp_path / "base", 0, num_layers=12, hidden_size=32,
                          intermediate_size=64, vocab_size=64)
    tuned = {f"ft{i}": generate_model(tmp_path / f"ft{i}", 0, deltas=[Delta(seed=i)],
                                      num_layers=12, hidden_size=32, intermediate_size=64,
                                      vocab_size=64) for i in range(3)}
    live: dict[int, str] = {}
    loads: list[tuple[str, str]] = []
    overlaps: list[tuple[str, str]] = []
    original = CheckpointReader.load

    def counting_load(self, name, *, copy=False):
        overlaps.extend((name, other) for other in live.values() if other != name)
        tensor = original(self, name, copy=copy)
        token = id(tensor)
        live[token] = name
        weakref.finalize(tensor, live.pop, token, None)
        loads.append((self.directory.name, name))
        return tensor

    monkeypatch.setattr(CheckpointReader, "load", counting_load)
    report = inspect_models(tuned, base, merged={"again": tuned["ft0"]})
    assert overlaps == []
    names = list(CheckpointReader(base).tensors)
    assert len(names) == 3 + 12 * 9
    assert sorted(loads) == sorted((model, n) for model in ("base", "ft0", "ft1", "ft2", "ft0")
                                   for n in names)
    assert live == {}
    # the merged "model" is ft0 itself: all of ft0's task vector survives
    survival = report.total().survival
    assert survival["again", "ft0"].projection == pytest.approx(1.0, abs=1e-12)
    assert survival["again", "ft0"].cosine == pytest.approx(1.0, abs=1e-12)
