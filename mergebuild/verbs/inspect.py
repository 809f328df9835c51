"""Weight-space diagnostics: how fine-tunes of one base agree, and how much of each a merge kept.

For task vectors τ_i = model_i − base, per layer and per tensor kind (``self_attn.q_proj``,
``mlp.down_proj``, ``embed_tokens``, ``norm``…): the cosine between each pair, the sign-conflict
rate (among entries both change, the share where they disagree in sign: what TIES resolves),
L2 norms, what a TIES magnitude trim at ``density`` keeps of each, and, for merged models,
each parent's projection coefficient ⟨merged − base, τ_i⟩ / ‖τ_i‖² and cosine with τ_i.

It streams like the engine: every model is memory-mapped, one tensor name is processed at a
time (that tensor from each model, then dropped), and only additive float64 sums are kept per
(layer, kind), so any grouping (by layer, by kind, in total) is a sum of groups.

Non-goals: activation statistics, anything needing a forward pass or a tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.build.parameters import layer_index
from mergebuild.errors import CheckpointError, IncompatibleModelsError, MergebuildError
from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.io.dtypes import FLOAT_CODES

if TYPE_CHECKING:
    import torch
    from rich.console import Group

__all__ = [
    "GroupStats",
    "InspectReport",
    "PairStats",
    "SurvivalStats",
    "VectorStats",
    "inspect_models",
    "plot",
    "render_table",
    "tensor_kind",
]

# Dot products are taken in float64 over slices of this many elements, so the scratch memory
# per tensor stays bounded however large the tensor is.
_DOT_CHUNK = 1 << 22
_PLOT_SUFFIXES = (".png", ".svg", ".pdf")
_NOTE_EXAMPLES = 3


def tensor_kind(tensor_name: str) -> str:
    """What a tensor is, without its layer: ``model.layers.3.self_attn.q_proj.weight`` →
    ``self_attn.q_proj``; ``model.embed_tokens.weight`` → ``embed_tokens``.

    ``.weight`` is dropped; other suffixes (``.bias``) are kept, since biases move differently.
    """
    layer = layer_index(tensor_name)
    name = tensor_name
    if layer is not None:
        name = tensor_name.partition(f".{layer}.")[2]
    elif name.startswith("model."):
        name = name[len("model."):]
    return name.removesuffix(".weight")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    return dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else None


@dataclass(frozen=True)
class VectorStats:
    """One task vector τ = model − base over a set of tensors (all fields add across sets).

    Attributes:
        tensors: tensors compared.
        numel: entries compared.
        changed: entries with τ ≠ 0.
        sq_norm: ‖τ‖².
        kept: changed entries a TIES magnitude trim at the report's density keeps.
        kept_sq_norm: ‖trim(τ)‖², the L2 mass that survives the trim.
    """

    tensors: int = 0
    numel: int = 0
    changed: int = 0
    sq_norm: float = 0.0
    kept: int = 0
    kept_sq_norm: float = 0.0

    def __add__(self, other: VectorStats) -> VectorStats:
        return VectorStats(*(getattr(self, f.name) + getattr(other, f.name)
                             for f in fields(self)))

    @property
    def norm(self) -> float:
        return math.sqrt(self.sq_norm)

    @property
    def changed_share(self) -> float | None:
        """Share of entries the fine-tune moved at all."""
        return _ratio(self.changed, self.numel)

    @property
    def kept_mass_share(self) -> float | None:
        """Share of ‖τ‖² that survives the magnitude trim."""
        return _ratio(self.kept_sq_norm, self.sq_norm)

    @property
    def kept_changed_share(self) -> float | None:
        """Share of the changed entries that survive the magnitude trim."""
        return _ratio(self.kept, self.changed)


@dataclass(frozen=True)
class PairStats:
    """Two task vectors over the tensors both have (all fields add across sets).

    Attributes:
        dot: ⟨τ_a, τ_b⟩.
        sq_norm_a, sq_norm_b: ‖τ_a‖², ‖τ_b‖² over the same tensors.
        both_changed: entries both τ_a and τ_b change.
        sign_conflicts: among those, entries where their signs differ.
    """

    dot: float = 0.0
    sq_norm_a: float = 0.0
    sq_norm_b: float = 0.0
    both_changed: int = 0
    sign_conflicts: int = 0

    def __add__(self, other: PairStats) -> PairStats:
        return PairStats(*(getattr(self, f.name) + getattr(other, f.name)
                           for f in fields(self)))

    @property
    def cosine(self) -> float | None:
        return _cosine(self.dot, self.sq_norm_a, self.sq_norm_b)

    @property
    def conflict_rate(self) -> float | None:
        """Share of the entries both change where they pull in opposite directions."""
        return _ratio(self.sign_conflicts, self.both_changed)


@dataclass(frozen=True)
class SurvivalStats:
    """A merged model's move (merged − base) against one parent's task vector τ (fields add).

    Attributes:
        dot: ⟨merged − base, τ⟩.
        sq_norm_parent: ‖τ‖² over the tensors both have.
        sq_norm_merged: ‖merged − base‖² over the same tensors.
    """

    dot: float = 0.0
    sq_norm_parent: float = 0.0
    sq_norm_merged: float = 0.0

    def __add__(self, other: SurvivalStats) -> SurvivalStats:
        return SurvivalStats(*(getattr(self, f.name) + getattr(other, f.name)
                               for f in fields(self)))

    @property
    def projection(self) -> float | None:
        """How many τ's the merge moved along τ: 1.0 = all of it, 0.5 = half (linear 0.5)."""
        return _ratio(self.dot, self.sq_norm_parent)

    @property
    def cosine(self) -> float | None:
        return _cosine(self.dot, self.sq_norm_parent, self.sq_norm_merged)


def _add_into(total: dict, part: Mapping) -> None:
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value


@dataclass(frozen=True)
class GroupStats:
    """Every statistic for one group of tensors: one (layer, kind), or a sum of such groups.

    Attributes:
        layer: the transformer block, or None (embeddings, final norm, lm_head, or a sum).
        kind: the tensor kind (``self_attn.q_proj``), or "*" for a sum over kinds.
        tensors: base tensors in the group.
        vectors: {model: its task vector's stats} (a model lacking the tensors is absent).
        pairs: {(model_a, model_b): pair stats}, pairs in the order models were given.
        survival: {(merged, parent): survival stats}.
    """

    layer: int | None
    kind: str
    tensors: int = 0
    vectors: dict[str, VectorStats] = field(default_factory=dict)
    pairs: dict[tuple[str, str], PairStats] = field(default_factory=dict)
    survival: dict[tuple[str, str], SurvivalStats] = field(default_factory=dict)

    @staticmethod
    def combine(groups: Iterable[GroupStats], layer: int | None, kind: str) -> GroupStats:
        """The sum of ``groups``, labelled (layer, kind)."""
        tensors = 0
        vectors: dict[str, VectorStats] = {}
        pairs: dict[tuple[str, str], PairStats] = {}
        survival: dict[tuple[str, str], SurvivalStats] = {}
        for group in groups:
            tensors += group.tensors
            _add_into(vectors, group.vectors)
            _add_into(pairs, group.pairs)
            _add_into(survival, group.survival)
        return GroupStats(layer, kind, tensors, vectors, pairs, survival)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "tensors": self.tensors,
            "vectors": {
                model: {**_raw(v), "norm": v.norm, "changed_share": v.changed_share,
                        "kept_mass_share": v.kept_mass_share,
                        "kept_changed_share": v.kept_changed_share}
                for model, v in self.vectors.items()
            },
            "pairs": [
                {"a": a, "b": b, **_raw(p), "cosine": p.cosine, "conflict_rate": p.conflict_rate}
                for (a, b), p in self.pairs.items()
            ],
            "survival": [
                {"merged": m, "parent": parent, **_raw(s), "projection": s.projection,
                 "cosine": s.cosine}
                for (m, parent), s in self.survival.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupStats:
        return cls(
            data["layer"],
            data["kind"],
            data["tensors"],
            {m: _from_raw(VectorStats, v) for m, v in data["vectors"].items()},
            {(p["a"], p["b"]): _from_raw(PairStats, p) for p in data["pairs"]},
            {(s["merged"], s["parent"]): _from_raw(SurvivalStats, s) for s in data["survival"]},
        )


def _raw(stats: VectorStats | PairStats | SurvivalStats) -> dict[str, Any]:
    return {f.name: getattr(stats, f.name) for f in fields(stats)}


def _from_raw(cls: type, data: Mapping[str, Any]) -> Any:
    return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect_models`` measured: additive stats per (layer, kind), plus notes.

    Attributes:
        base: the base model directory.
        models: {name: directory} of the models whose task vectors were compared.
        merged: {name: directory} of merged models checked against those task vectors.
        density: the TIES density the kept shares refer to.
        groups: one entry per (layer, kind), layers in order, non-layer kinds first.
        notes: tensors skipped and why (missing in a model, extra, not floating point).
    """

    base: str
    models: dict[str, str]
    merged: dict[str, str]
    density: float
    groups: tuple[GroupStats, ...]
    notes: tuple[str, ...] = ()

    def total(self) -> GroupStats:
        """Every tensor together."""
        return GroupStats.combine(self.groups, None, "*")

    def by_layer(self) -> dict[int, GroupStats]:
        """{layer: all kinds of that layer together}; tensors outside the layers are left out."""
        layers = sorted({g.layer for g in self.groups if g.layer is not None})
        return {layer: GroupStats.combine((g for g in self.groups if g.layer == layer),
                                          layer, "*") for layer in layers}

    def by_kind(self) -> dict[str, GroupStats]:
        """{kind: that kind over all layers together}, in order of first appearance."""
        kinds = list(dict.fromkeys(g.kind for g in self.groups))
        return {kind: GroupStats.combine((g for g in self.groups if g.kind == kind),
                                         None, kind) for kind in kinds}

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-ready): raw sums per group plus the derived ratios.

        Ratios that are undefined (a zero norm, nothing changed) are ``None``. ``summary``
        holds the totals, per kind and per layer; ``from_json`` reads only the groups.
        """
        return {
            "base": self.base,
            "models": dict(self.models),
            "merged": dict(self.merged),
            "density": self.density,
            "notes": list(self.notes),
            "groups": [g.to_json() for g in self.groups],
            "summary": {
                "total": self.total().to_json(),
                "by_kind": [g.to_json() for g in self.by_kind().values()],
                "by_layer": [g.to_json() for g in self.by_layer().values()],
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InspectReport:
        return cls(
            data["base"],
            dict(data["models"]),
            dict(data["merged"]),
            data["density"],
            tuple(GroupStats.from_json(g) for g in data["groups"]),
            tuple(data["notes"]),
        )


# --------------------------------------------------------------------------- measuring


def inspect_models(
    models: Mapping[str, Path],
    base: Path,
    *,
    merged: Mapping[str, Path] | None = None,
    density: float = 0.5,
    device: str = "cpu",
) -> InspectReport:
    """Compare the task vectors of ``models`` relative to ``base``, one tensor at a time.

    Args:
        models: {name: model directory}, fine-tunes of ``base`` (one or more).
        base: the base model directory.
        merged: {name: merged model directory}; each is measured against every model's τ.
        density: the TIES density (top ``int(density·n)`` entries by |τ| per tensor, at least
            one) for the kept shares; 1.0 keeps everything.
        device: where the arithmetic runs ("cpu", "cuda", "auto").

    Returns:
        The report; base tensors a model lacks are skipped for that model (see ``notes``).

    Raises:
        IncompatibleModelsError: a tensor's shape differs from the base's (names the tensor).
        CheckpointError: a directory holds no readable safetensors weights.

    Example:
        >>> report = inspect_models({"a": Path("a"), "b": Path("b")}, Path("base"))
        >>> pair = report.total().pairs["a", "b"]  # .cosine, .conflict_rate
        >>> report.by_layer()[3].vectors["a"].norm  # ‖τ_a‖ over layer 3's tensors
    """
    import torch

    from mergebuild.build.engine import select_device

    merged = dict(merged or {})
    if not models:
        raise MergebuildError("inspect needs at least one model to compare with the base")
    if not 0 < density <= 1:
        raise MergebuildError(f"density must be in (0, 1], got {density}",
                              hint="0.5 keeps the top half of each task vector by magnitude")
    clash = sorted(set(models) & set(merged))
    if clash:
        raise MergebuildError(f"'{clash[0]}' is given both as a model and as a merged model")
    target = select_device(device)

    base_reader = _open(Path(base), "base")
    readers = {name: _open(Path(path), name) for name, path in models.items()}
    merged_readers = {name: _open(Path(path), name) for name, path in merged.items()}
    groups: dict[tuple[int | None, str], GroupStats] = {}
    non_float: list[str] = []
    with torch.no_grad():
        for name, info in base_reader.tensors.items():
            if not _floating(info.dtype):
                non_float.append(name)
                continue
            key = (layer_index(name), tensor_kind(name))
            part = _measure_tensor(name, base_reader, readers, merged_readers, density, target)
            groups[key] = GroupStats.combine([groups[key], part] if key in groups else [part],
                                             *key)
    for reader in (base_reader, *readers.values(), *merged_readers.values()):
        reader.close()

    notes = _coverage_notes(base_reader, {**readers, **merged_readers})
    if non_float:
        notes.append(_listed(f"{len(non_float)} non-floating-point base tensor(s) skipped",
                             non_float))
    ordered = sorted(groups.values(),
                     key=lambda g: (g.layer is not None, g.layer or 0))  # stable: file order
    return InspectReport(
        base=str(base),
        models={name: str(path) for name, path in models.items()},
        merged={name: str(path) for name, path in merged.items()},
        density=float(density),
        groups=tuple(ordered),
        notes=tuple(notes),
    )


def _open(directory: Path, node: str) -> CheckpointReader:
    try:
        return CheckpointReader(directory)
    except CheckpointError as exc:
        exc.node = exc.node or node
        raise


def _floating(safetensors_dtype: str) -> bool:
    return safetensors_dtype in FLOAT_CODES


def _measure_tensor(
    name: str,
    base_reader: CheckpointReader,
    readers: Mapping[str, CheckpointReader],
    merged_readers: Mapping[str, CheckpointReader],
    density: float,
    device: str,
) -> GroupStats:
    """The stats of one tensor name; every tensor loaded here is dropped on return."""
    base = _as_float32(base_reader.load(name), device)
    taus: dict[str, torch.Tensor] = {}
    vectors: dict[str, VectorStats] = {}
    for model, reader in readers.items():
        if name not in reader.tensors:
            continue
        taus[model] = tau = _delta(reader, name, model, base, device)
        vectors[model] = _vector_stats(tau, density)
    pairs = {(a, b): _pair_stats(taus[a], taus[b], vectors[a], vectors[b])
             for a, b in combinations(taus, 2)}
    survival: dict[tuple[str, str], SurvivalStats] = {}
    for merged_name, reader in merged_readers.items():
        if name not in reader.tensors:
            continue
        move = _delta(reader, name, merged_name, base, device)
        sq_move = _dot64(move, move)
        for parent, tau in taus.items():
            survival[merged_name, parent] = SurvivalStats(
                _dot64(move, tau), vectors[parent].sq_norm, sq_move)
        del move
    return GroupStats(layer_index(name), tensor_kind(name), 1, vectors, pairs, survival)


def _as_float32(tensor: torch.Tensor, device: str) -> torch.Tensor:
    import torch

    # copy=True: a float32 CPU tensor would otherwise come back as the read-only mapping itself.
    return tensor.to(device=device, dtype=torch.float32, copy=True)


def _delta(reader: CheckpointReader, name: str, model: str, base: torch.Tensor,
           device: str) -> torch.Tensor:
    info = reader.tensors[name]
    if tuple(info.shape) != tuple(base.shape):
        raise IncompatibleModelsError(
            f"tensor '{name}' has shape {list(info.shape)} in '{model}' but "
            f"{list(base.shape)} in the base",
            node=model,
            hint="inspect compares fine-tunes of the same base architecture",
        )
    return _as_float32(reader.load(name), device).sub_(base)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, flat_a.numel(), _DOT_CHUNK):
        stop = start + _DOT_CHUNK
        # float32 products (rounded to 2⁻²⁴, unbiased) summed in float64: torch.dot in float64
        # is 2-4× slower on CPU, and in float32 it loses digits on large tensors.
        total += float(torch.sum(flat_a[start:stop] * flat_b[start:stop], dtype=torch.float64))
    return total


def _vector_stats(tau: torch.Tensor, density: float) -> VectorStats:
    import torch

    from mergebuild.methods.task_arithmetic.topk import top_k_magnitude_mask

    numel = tau.numel()
    changed = int(torch.count_nonzero(tau))
    sq_norm = _dot64(tau, tau)
    if density >= 1 or numel == 0:
        return VectorStats(1, numel, changed, sq_norm, changed, sq_norm)
    # The same selection TIES makes: top int(density·n) by |τ|, at least one, ties by index.
    keep = top_k_magnitude_mask(tau, max(1, int(density * numel)))
    kept_tau = torch.where(keep, tau, 0.0)
    return VectorStats(1, numel, changed, sq_norm, int(torch.count_nonzero(kept_tau)),
                       _dot64(kept_tau, kept_tau))


def _pair_stats(a: torch.Tensor, b: torch.Tensor, va: VectorStats,
                vb: VectorStats) -> PairStats:
    import torch

    both = (a != 0) & (b != 0)
    conflicts = both & ((a > 0) != (b > 0))
    return PairStats(_dot64(a, b), va.sq_norm, vb.sq_norm, int(torch.count_nonzero(both)),
                     int(torch.count_nonzero(conflicts)))


def _listed(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:_NOTE_EXAMPLES])
    more = f" and {len(names) - _NOTE_EXAMPLES} more" if len(names) > _NOTE_EXAMPLES else ""
    return f"{what}: {shown}{more}"


def _coverage_notes(base: CheckpointReader, readers: Mapping[str, CheckpointReader]) -> list[str]:
    notes = []
    for model, reader in readers.items():
        missing = [n for n in base.tensors if n not in reader.tensors]
        extra = [n for n in reader.tensors if n not in base.tensors]
        if missing:
            notes.append(_listed(f"'{model}' lacks {len(missing)} base tensor(s), skipped for it",
                                 missing))
        if extra:
            notes.append(_listed(f"'{model}' has {len(extra)} tensor(s) the base lacks, "
                                 f"not compared", extra))
    return notes


# --------------------------------------------------------------------------- presenting


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]}·{pair[1]}"


def render_table(report: InspectReport) -> Group:
    """Rich tables: task vectors, pairs, by tensor kind, by layer, and merge survival.

    Returns:
        A ``rich.console.Group``; print it with ``rich.console.Console().print``.
    """
    from rich.console import Group
    from rich.table import Table

    total = report.total()
    vectors = Table(title=f"Task vectors vs base ({report.base})", title_justify="left")
    for column in ("model", "tensors", "changed", "‖τ‖",
                   f"kept @ density {report.density:g}: params", "L2² mass"):
        vectors.add_column(column, justify="left" if column == "model" else "right")
    for model in report.models:
        v = total.vectors.get(model, VectorStats())
        vectors.add_row(model, str(v.tensors), _pct(v.changed_share), _fmt(v.norm, 4),
                        _pct(v.kept_changed_share), _pct(v.kept_mass_share))
    out: list[Any] = [vectors]

    if total.pairs:
        pairs = Table(title="Pairs (all tensors)", title_justify="left")
        for column in ("pair", "cosine", "sign conflict", "both changed"):
            pairs.add_column(column, justify="left" if column == "pair" else "right")
        for pair, p in total.pairs.items():
            pairs.add_row(_pair_label(pair), _fmt(p.cosine), _pct(p.conflict_rate),
                          str(p.both_changed))
        out.append(pairs)

    for title, rows in (("By tensor kind", [(k, g) for k, g in report.by_kind().items()]),
                        ("By layer", [(str(k), g) for k, g in report.by_layer().items()])):
        if rows:
            out.append(_breakdown(title, rows, report, total))

    if total.survival:
        survival = Table(title="Merge survival (merged − base against each τ)",
                         title_justify="left")
        for column in ("merged ← parent", "projection", "cosine"):
            survival.add_column(column, justify="left" if column.startswith("merged") else "right")
        for (m, parent), s in total.survival.items():
            survival.add_row(f"{m} ← {parent}", _fmt(s.projection), _fmt(s.cosine))
        out.append(survival)
    if report.notes:
        out.append("\n".join(f"note: {n}" for n in report.notes))
    return Group(*out)


def _breakdown(title: str, rows: list[tuple[str, GroupStats]], report: InspectReport,
               total: GroupStats) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(title.split()[-1])
    for pair in total.pairs:
        table.add_column(f"{_pair_label(pair)}\ncos / conflict", justify="right")
    for model in report.models:
        table.add_column(f"‖τ {model}‖", justify="right")
    for parent in total.survival:
        table.add_column(f"proj {parent[0]}←{parent[1]}", justify="right")
    for label, group in rows:
        cells = [label]
        for pair in total.pairs:
            p = group.pairs.get(pair)
            cells.append(f"{_fmt(p and p.cosine)} / {_pct(p and p.conflict_rate)}")
        for model in report.models:
            v = group.vectors.get(model)
            cells.append(_fmt(v and v.norm, 4))
        for key in total.survival:
            s = group.survival.get(key)
            cells.append(_fmt(s and s.projection))
        table.add_row(*cells)
    return table


def plot(report: InspectReport, path: Path) -> Path:
    """Draw the layer-by-layer picture: cosine and sign conflict per pair, norm per model, and
    (with merged models) projection per parent, else the L2 mass kept at the density.

    Rows are the layers; a model without layered tensor names is drawn per tensor kind.

    Args:
        report: what ``inspect_models`` returned.
        path: the image to write; ``.png``, ``.svg`` or ``.pdf`` picks the format.

    Returns:
        ``path``.

    Raises:
        MergebuildError: another suffix, or matplotlib is not installed.
    """
    path = Path(path)
    if path.suffix.lower() not in _PLOT_SUFFIXES:
        raise MergebuildError(f"cannot plot to '{path.name}'",
                              hint=f"use one of {', '.join(_PLOT_SUFFIXES)}")
    try:
        # Figure without pyplot: no GUI backend is chosen and no global state is touched.
        from matplotlib.figure import Figure
    except ImportError:
        raise MergebuildError("plotting needs matplotlib",
                              hint="pip install 'mergebuild[plots]'") from None

    by_layer = report.by_layer()
    if by_layer:
        labels, rows, axis = [str(k) for k in by_layer], list(by_layer.values()), "layer"
    else:
        by_kind = report.by_kind()
        labels, rows, axis = list(by_kind), list(by_kind.values()), "tensor kind"
    total = report.total()
    x = list(range(len(rows)))

    def series(ax, title: str, keys: Iterable, value, label) -> None:
        for key in keys:
            ys = [value(row, key) for row in rows]
            ax.plot(x, [math.nan if y is None else y for y in ys], marker="o", markersize=3,
                    label=label(key))
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, labels, rotation=90 if axis == "tensor kind" else 0, fontsize=7)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    def pair_value(attr: str):
        def value(row: GroupStats, pair: tuple[str, str]) -> float | None:
            p = row.pairs.get(pair)
            return None if p is None else getattr(p, attr)
        return value

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    series(axes[0, 0], "cosine of task vectors", total.pairs, pair_value("cosine"), _pair_label)
    axes[0, 0].set_ylim(-1.05, 1.05)
    series(axes[0, 1], "sign-conflict rate (among entries both change)", total.pairs,
           pair_value("conflict_rate"), _pair_label)
    axes[0, 1].set_ylim(0, 1)
    # Unrelated task vectors disagree on half the shared entries: the line to compare with.
    axes[0, 1].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    series(axes[1, 0], "‖τ‖ (L2 norm of model − base)", report.models,
           lambda row, m: row.vectors[m].norm if m in row.vectors else None, str)
    if total.survival:
        series(axes[1, 1], "projection of merged − base on τ (1 = all of it)", total.survival,
               lambda row, k: row.survival[k].projection if k in row.survival else None,
               lambda k: f"{k[0]} ← {k[1]}")
    else:
        series(axes[1, 1], f"share of ‖τ‖² kept at density {report.density:g}", report.models,
               lambda row, m: row.vectors[m].kept_mass_share if m in row.vectors else None, str)
    for ax in axes[1]:
        ax.set_xlabel(axis)
    fig.suptitle(f"inspect: task vectors relative to {Path(report.base).name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lower().lstrip("."), dpi=110)
    return path

