"""What the training loop needs of the process group: who am I, wait for the others, sums and maxima.

One process (no ``torchrun``) is the common case and costs nothing: every collective is then the identity.
Values are reduced in float64, so a count summed over processes is exact.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Dist"]


class Dist:
    """The process group as the loop sees it (built from an ``accelerate.Accelerator``)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)
        self.device = accelerator.device
        self.distributed_type = str(accelerator.distributed_type)

    @property
    def is_fsdp(self) -> bool:
        return "FSDP" in self.distributed_type

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def _reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1 or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maxima over the processes."""
        return self._reduce(values, torch.distributed.ReduceOp.MAX)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (small Python objects: a path, a config)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
