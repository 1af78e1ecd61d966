"""The layout arithmetic of tvlars_scale.optim.zero_layout against a brute-force simulation: label
every element of the flat buffers DeepSpeed builds with its layer (or padding) and its position in
that layer, cut them as DeepSpeed cuts them, and read the pieces (with their layer offsets) off the
labels."""

import math
import random

from tvlars_scale.optim.sharding import Piece
from tvlars_scale.optim.zero_layout import flat_window_pieces, split_param_pieces

PADDING = -1


def runs(labels: list[int], positions: list[int]) -> tuple[Piece, ...]:
    """Maximal runs of equal, non-padding labels; ``positions`` are the elements' indices in their
    layers (a run's must follow each other)."""
    pieces, start = [], 0
    for index in range(1, len(labels) + 1):
        if index == len(labels) or labels[index] != labels[start]:
            if labels[start] != PADDING:
                first = positions[start]
                assert positions[start:index] == list(range(first, first + index - start))
                pieces.append(Piece(labels[start], start, index - start, layer_offset=first))
            start = index
    return tuple(pieces)


def zero12_buffer(numels, order, gaps, world_size):
    """ZeRO-1/2: layers in ``order`` with ``gaps`` of padding after each, tail padded to 2 x world.
    Returns each element's layer label and its index in that layer (padding: ``PADDING``)."""
    labels, positions, extents = [], [], []
    for layer, gap in zip(order, gaps, strict=True):
        extents.append((layer, len(labels), numels[layer]))
        labels += [layer] * numels[layer] + [PADDING] * gap
        positions += list(range(numels[layer])) + [PADDING] * gap
    tail = -len(labels) % (2 * world_size)
    labels += [PADDING] * tail
    positions += [PADDING] * tail
    return labels, positions, extents


def test_flat_window_pieces_match_the_simulated_buffer():
    for seed in range(300):
        check_flat_window_pieces(random.Random(seed))


def check_flat_window_pieces(rng):
    world_size = rng.choice([2, 3, 4, 8])
    numels = [rng.choice([1, 2, 3, rng.randint(1, 300)]) for _ in range(rng.randint(1, 9))]
    order = list(range(len(numels)))
    rng.shuffle(order)  # round_robin_gradients reorders the buffer
    gaps = [rng.choice([0, 0, 1, 3]) for _ in order]  # parameter_alignment pads between layers
    labels, positions, extents = zero12_buffer(numels, order, gaps, world_size)
    partition_size = len(labels) // world_size
    covered = [0] * len(numels)
    for rank in range(world_size):
        window = slice(rank * partition_size, (rank + 1) * partition_size)
        pieces = flat_window_pieces(extents, rank * partition_size, partition_size)
        assert pieces == runs(labels[window], positions[window])
        for piece in pieces:
            # The ranks' pieces of a layer follow each other in rank order.
            assert piece.layer_offset == covered[piece.layer]
            covered[piece.layer] += piece.numel
    assert covered == numels


def test_flat_window_pieces_of_the_tiny_cnn_group():
    # logit_scale (1), conv1.weight (108), conv2.weight (288), fc.weight (80): 477 padded to 480.
    extents = [(0, 0, 1), (1, 1, 108), (2, 109, 288), (3, 397, 80)]
    assert flat_window_pieces(extents, 0, 240) == (
        Piece(0, 0, 1, layer_offset=0),
        Piece(1, 1, 108, layer_offset=0),
        Piece(2, 109, 131, layer_offset=0),
    )
    # conv2.weight continues on rank 1 at its element 131.
    assert flat_window_pieces(extents, 240, 240) == (
        Piece(2, 0, 157, layer_offset=131),
        Piece(3, 157, 80, layer_offset=0),
    )


def test_flat_window_pieces_skip_alignment_padding_in_layer_offsets():
    # ZeRO-1/2 with parameter_alignment: 2 elements of padding between two layers, window of 6.
    extents = [(0, 0, 5), (1, 7, 4)]  # layer 0 at 0..5, padding 5..7, layer 1 at 7..11
    assert flat_window_pieces(extents, 0, 6) == (Piece(0, 0, 5, layer_offset=0),)
    assert flat_window_pieces(extents, 6, 6) == (Piece(1, 1, 4, layer_offset=0),)
    assert flat_window_pieces(extents, 3, 6) == (
        Piece(0, 0, 2, layer_offset=3),
        Piece(1, 4, 2, layer_offset=0),
    )
    assert flat_window_pieces(extents, 9, 6) == (Piece(1, 0, 2, layer_offset=2),)


def test_split_param_pieces_match_the_simulated_partitions():
    for seed in range(300):
        check_split_param_pieces(random.Random(seed))


def check_split_param_pieces(rng):
    world_size = rng.choice([2, 3, 4, 8])
    numels = [
        rng.choice([1, 2, world_size + 1, rng.randint(1, 300)]) for _ in range(rng.randint(1, 9))
    ]
    layers = [rng.randint(0, 50) + 100 * index for index in range(len(numels))]
    covered = dict.fromkeys(layers, 0)
    for rank in range(world_size):
        labels, positions = [], []
        for layer, numel in zip(layers, numels, strict=True):
            # ZeRO-3 pads each parameter to a multiple of the world size and gives each rank a slot.
            slot = math.ceil(numel / world_size)
            padded = [layer] * numel + [PADDING] * (slot * world_size - numel)
            padded_positions = list(range(numel)) + [PADDING] * (slot * world_size - numel)
            labels += padded[rank * slot : (rank + 1) * slot]
            positions += padded_positions[rank * slot : (rank + 1) * slot]
        params = [
            (layer, n, math.ceil(n / world_size)) for layer, n in zip(layers, numels, strict=True)
        ]
        pieces = split_param_pieces(params, rank)
        assert pieces == runs(labels, positions)
        for piece in pieces:
            assert piece.layer_offset == covered[piece.layer]
            covered[piece.layer] += piece.numel
    assert list(covered.values()) == numels


def test_a_layer_smaller_than_the_world_leaves_ranks_nothing():
    params = [(7, 1, 1), (8, 5, 3)]  # 1 element and 5 elements on 2 ranks
    assert split_param_pieces(params, 0) == (
        Piece(7, 0, 1, layer_offset=0),
        Piece(8, 1, 3, layer_offset=0),
    )
    # Rank 1's slot of layer 8 holds its elements 3..5; its slot of layer 7 is padding only.
    assert split_param_pieces(params, 1) == (Piece(8, 1, 2, layer_offset=3),)
