"""A DataLoader that Lightning resumes mid-epoch: its stateful-loader protocol over an EpochSampler.

The state is the epoch and the batches of it already started; on restore the sampler skips exactly those samples.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset

from naics_hnm.data.epoch_sampler import EpochSampler


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler`; ``batches_started()`` reports the loop's progress."""

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, batches_started: Callable[[], int],
                 **kwargs: Any) -> None:
        if not isinstance(sampler, EpochSampler):
            raise TypeError(f"ResumableLoader(sampler={type(sampler).__name__}): expected an EpochSampler")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches_started = batches_started

    def state_dict(self) -> dict[str, int]:
        """Where training goes on: ``{"epoch": e, "batches": b}`` = epoch e after its first b batches."""
        epoch, batches = int(self.sampler.epoch), int(self._batches_started())
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Move the sampler to the saved position (the first iterator may be created right after this)."""
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches", 0)
        if epoch is not None:
            self.sampler.resume(int(epoch), int(batches) * int(self.batch_size))
