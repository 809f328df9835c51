"""Pickle checkpoints, loaded the one safe way: ``torch.load(weights_only=True)``, tensors only."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["load_pickle_state_dict"]


def load_pickle_state_dict(
    path: Path, *, node: str, uri: str | None = None, shapes_only: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint (``*.bin``, ``*.pt``…), by name.

    Loading uses ``weights_only=True``, so the pickle cannot run code; a trainer's
    ``{"state_dict": …}`` wrapper is unwrapped and non-tensor entries are dropped.

    Args:
        path: the pickle file.
        node: the source node, named in errors.
        uri: the source's URI, prefixed to errors when given.
        shapes_only: load onto the meta device through mmap: dtypes and shapes, no data read.

    Raises:
        CheckpointError: the file cannot be loaded safely or holds no state dict.
    """
    import torch

    where = f"{uri}: " if uri else ""
    try:
        if shapes_only:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad pickle
        raise CheckpointError(
            f"{where}{path.name} cannot be loaded with weights_only=True "
            f"({error.__class__.__name__})",
            node=node,
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}{path.name} does not hold a state dict", node=node)
    return {str(name): t for name, t in state.items() if isinstance(t, torch.Tensor)}
