"""What a rank steps, as pieces of whole named layers, and the one all-reduce that makes norms whole.

A layer-wise optimizer needs, for every layer k, ``||w_k||`` and the norm of its update direction. When a
rank holds whole parameters (one process, DDP) the norms are local. Under DeepSpeed ZeRO a rank holds
flat partitions in which a layer may be cut between ranks. Both cases are described by one vocabulary:

* a :class:`Piece` is a contiguous run of one layer inside one tensor the optimizer steps: where it
  lies in that tensor (``start``) and where in the whole layer (``layer_offset``);
* a :class:`TensorLayout` is what one stepped tensor holds on this rank: its pieces, and every layer
  of the (sub-)group it partitions;
* a :class:`ShardedLayout` maps each stepped tensor to its :class:`TensorLayout` and names the layers
  with their original shapes. :mod:`.zero_layout` builds it from DeepSpeed's bookkeeping,
  :mod:`.fsdp_layout` from FSDP2's DTensors (pieces then index the DTensor's local shard,
  :func:`local_tensor`);
  :meth:`ShardedLayout.whole_layers` builds the unsharded one (every tensor one whole layer).

The optimizer, once bound to a sharded layout, sums the squared norms of its pieces per layer, and
:func:`layer_norms` runs one ``all_reduce(SUM)`` of a ``2 x K`` float32 matrix (8 bytes per layer)
over the data-parallel group to make them whole. Precedents: apex DistributedFusedLAMB, VISSL's LARC
for FSDP. The checkpoint (``tvlars_scale.checkpoint.layer_state``) saves and restores the optimizer
state piece by piece through the same layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Piece", "ShardedLayout", "TensorLayout", "layer_norms", "local_tensor"]


@dataclass(frozen=True)
class Piece:
    """A contiguous run of one layer inside one (flat) optimizer tensor held by this rank."""

    layer: int
    """Global layer index into :attr:`ShardedLayout.layer_names`."""
    start: int
    """Element offset of the run inside the (flat) optimizer tensor."""
    numel: int
    layer_offset: int
    """Element offset of the run inside its whole layer (flattened): the run holds the layer's
    elements ``[layer_offset, layer_offset + numel)``."""


@dataclass(frozen=True)
class TensorLayout:
    """What one optimizer tensor (a flat partition or a whole parameter) holds on this rank."""

    layers: tuple[int, ...]
    """Every layer of the (sub-)group this tensor partitions, the same on every rank: it sizes the
    all-reduce, so ranks that hold nothing of a layer still contribute a zero for it; and these
    layers share the tensor's per-tensor optimizer state (its step counter)."""
    pieces: tuple[Piece, ...]
    """The runs this rank holds; padding and uninitialised tails are simply not covered."""


class ShardedLayout:
    """Maps the tensors an optimizer steps to pieces of whole, named layers.

    ``layer_shapes`` are the ORIGINAL parameter shapes: the optimizer decides exclusion (1-D layers) from
    them, never from the flat tensor. ``process_group`` is the data-parallel group the norm all-reduce
    runs over (``None``: the default group). ``sharded`` is ``False`` only for
    :meth:`whole_layers`: every rank then steps the same whole parameters, and an optimizer must not be
    bound to it (its norms are local). ``replica_rank`` is this rank's index among ranks holding the
    same pieces (HSDP replicas; 0 without replication): only replica 0 needs to save them.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        layer_shapes: Sequence[Sequence[int]],
        tensors: Sequence[tuple[torch.Tensor, TensorLayout]],
        process_group: dist.ProcessGroup | None = None,
        *,
        sharded: bool = True,
        replica_rank: int = 0,
    ) -> None:
        if len(layer_names) != len(layer_shapes):
            raise ValueError("layer_names and layer_shapes must have the same length")
        self.layer_names = tuple(layer_names)
        self.layer_shapes = tuple(tuple(shape) for shape in layer_shapes)
        # Keyed by id(); the tuple keeps each tensor alive so an id is never reused while bound.
        self._tensors = {id(tensor): (tensor, entry) for tensor, entry in tensors}
        self.process_group = process_group
        self.sharded = sharded
        self.replica_rank = replica_rank
        for _, entry in self._tensors.values():
            for piece in entry.pieces:
                if piece.layer not in entry.layers:
                    raise ValueError(f"piece of layer {piece.layer} outside its tensor's layers")

    @classmethod
    def whole_layers(cls, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> ShardedLayout:
        """Nothing sharded: each tensor is a whole named layer, one piece at offset 0 of it."""
        names, shapes, tensors = [], [], []
        for layer, (name, tensor) in enumerate(named_tensors):
            names.append(name)
            shapes.append(tuple(tensor.shape))
            piece = Piece(layer, start=0, numel=tensor.numel(), layer_offset=0)
            tensors.append((tensor, TensorLayout((layer,), (piece,))))
        return cls(names, shapes, tensors, sharded=False)

    def of(self, tensor: torch.Tensor) -> TensorLayout | None:
        found = self._tensors.get(id(tensor))
        return None if found is None else found[1]

    def items(self) -> Iterator[tuple[torch.Tensor, TensorLayout]]:
        """Every described tensor with what it holds, in the order they were given."""
        return iter(self._tensors.values())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local shard (a view sharing its storage, so
    in-place updates reach the DTensor), any other tensor itself. Pieces index into it."""
    # ``_local_tensor`` rather than ``to_local()``: the same tensor without an autograd call per
    # tensor per step (a tenth of a small model's step).
    local = getattr(tensor, "_local_tensor", None)
    return tensor if local is None else local


def layer_norms(
    piece_squares: torch.Tensor | None,
    piece_to_layer: torch.Tensor | None,
    *,
    num_layers: int,
    process_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-layer weight and update norms from the squared norms of the pieces this rank holds.

    ``piece_squares`` is ``2 x P``: row 0 the weights', row 1 the updates' (``None``: this rank holds
    no piece). ``piece_to_layer`` is ``None`` when every piece is a whole layer, in order (nothing is
    sharded): the piece norms are then the layer norms and no collective runs. Otherwise the squares
    are summed per layer and all-reduced once.
    """
    if piece_to_layer is None:
        weight_norm, update_norm = piece_squares.sqrt().unbind(0)
        return weight_norm, update_norm
    sums = torch.zeros(2, num_layers, dtype=torch.float32, device=piece_to_layer.device)
    if piece_squares is not None:
        sums.index_add_(1, piece_to_layer, piece_squares.float())
    # collective: the only one per step() call -- 2 x K float32 (8 bytes per layer), SUM over data-parallel ranks.
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    weight_norm, update_norm = sums.sqrt().unbind(0)
    return weight_norm, update_norm
