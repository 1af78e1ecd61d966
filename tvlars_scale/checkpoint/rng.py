"""The global random number generators of one process, captured and restored exactly, or not at all.

Accelerate's ``load_state`` only logs at INFO level when a random state does not load; a resumed
run that silently draws different numbers is not the run it claims to continue. Here every
generator is restored or the restore raises. The states are plain tensors, ints and tuples, so a
checkpoint loads with ``torch.load(weights_only=True)``.

Generators owned by other objects (the tasks' augmentation generators) are saved by their owners.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

_KEYS = ("python", "numpy", "torch", "cuda")


def capture_rng_state() -> dict:
    """Python's ``random``, NumPy's global generator, torch's CPU generator and, when a GPU is in use,
    the current CUDA device's generator."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Restore :func:`capture_rng_state`'s output; raise ``ValueError`` if any generator cannot be."""
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(f"random state lacks {', '.join(missing)}")
    has_cuda = torch.cuda.is_available()
    if (state["cuda"] is not None) != has_cuda:
        saved = "has a CUDA generator" if state["cuda"] is not None else "has no CUDA generator"
        here = "this process uses a GPU" if has_cuda else "this process has no GPU"
        raise ValueError(f"random state {saved} but {here}: the run cannot continue exactly")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if has_cuda:
        torch.cuda.set_rng_state(state["cuda"])
