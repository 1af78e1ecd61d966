"""Where training is, in the loop's own counters: with the model, optimizer and RNG states it
defines a resume point (the LR schedule and TVLARS' phi_t are functions of ``step``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where training is; together with model, optimizer and RNG states it defines a resume point."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch in progress (equal to num_epochs once training is done)."""
    micro_batch: int = 0
    """Micro-batches of ``epoch`` already consumed on every rank: the data position."""
    num_samples: int = 0
    """Training samples consumed over all ranks."""
    num_skipped_steps: int = 0
    """Optimizer steps skipped for NaN/Inf gradients (not counted in ``step``)."""
    nonfinite_in_row: int = 0
    """Steps skipped in a row up to now."""

    @property
    def attempts(self) -> int:
        """Optimizer steps tried: applied and skipped."""
        return self.step + self.num_skipped_steps

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
