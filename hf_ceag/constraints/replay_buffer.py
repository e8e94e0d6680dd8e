"""Per-group replay buffers: the k most recent values (0/1 correctness, or losses) of every group.

A small group's accuracy estimated on one mini-batch is very noisy; CEAG instead estimates it from the
group's k most recent training predictions (DESIGN §2.3). The buffers are one `[num_groups, k]` tensor
updated with fixed-shape tensor operations only, whatever the number of groups: no loop over groups, and no
host-device synchronisation on a GPU (no boolean indexing, no `bincount`).
"""

from __future__ import annotations

import torch

from ..data.groups import group_counts


class ReplayBuffer:
    """Ring buffers of capacity `capacity`, one per group, stored as a `[num_groups, capacity]` tensor.

    `update(group_ids, values)` appends the values in batch order; when a group receives more than
    `capacity` values in one call, only its last `capacity` values are kept. The id `num_groups` marks padding
    (the rows a fixed-shape gather across processes adds): its values go nowhere that is read.
    """

    # Up to this many rows a call ranks them by one [n, n] comparison, beyond by a stable sort (n log n). Measured
    # on 2 CPU cores (`update`, 10 groups): 26 µs against 34 at n = 64, but 1.07 ms against 0.07 at n = 1024.
    PAIRWISE_RANK_MAX_ROWS = 128

    def __init__(self, num_groups: int, capacity: int, device: torch.device | str = "cpu") -> None:
        if num_groups < 1:
            raise ValueError(f"ReplayBuffer: num_groups must be >= 1, got {num_groups}.")
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}.")
        self.num_groups = num_groups
        self.capacity = capacity
        # One spare column takes the writes a call drops (older than a group's last `capacity` values), and one
        # spare row the padding's, so that the write is one fixed-shape scatter; `values` is the view without them.
        self._slots = torch.zeros(num_groups + 1, capacity + 1, dtype=torch.float32, device=device)
        self.values = self._slots[:num_groups, :capacity]
        # how many values each group has received in all (next slot: modulo capacity; held: at most capacity)
        self._received = torch.zeros(num_groups + 1, dtype=torch.long, device=device)
        self._group_received = self._received[:num_groups]  # the view without the padding's row
        self._earlier_mask: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None

    @property
    def position(self) -> torch.Tensor:
        """Each group's next slot, `[num_groups]` (a copy: read-only)."""
        return self._group_received % self.capacity

    @property
    def count(self) -> torch.Tensor:
        """How many values each group holds (at most `capacity`), `[num_groups]` (a copy: read-only)."""
        return self._group_received.clamp(max=self.capacity)

    @torch.no_grad()
    def update(self, group_ids: torch.Tensor, values: torch.Tensor) -> None:
        """Append `values[i]` to the buffer of group `group_ids[i]`, in order, for every i (but the padding's,
        `group_ids[i] == num_groups`)."""
        group_ids = group_ids.to(self.values.device, torch.long).reshape(-1)
        values = values.to(self.values.device, torch.float32).reshape(-1)
        n = group_ids.numel()
        if n == 0:
            return
        pairwise = n <= self.PAIRWISE_RANK_MAX_ROWS
        if pairwise:  # rank each row within its group by one [n, n] comparison
            same = group_ids[:, None] == group_ids[None, :]
            earlier, ones = self._pairwise_constants(n, group_ids.device)
            rank = (same & earlier).sum(dim=1)
        else:  # by a stable sort
            per_group = group_counts(group_ids, self.num_groups + 1)
            rank = self._sorted_rank(group_ids, per_group)
        slot = (self._received[group_ids] + rank) % self.capacity
        if n > self.capacity:
            # Values older than the last `capacity` of a group would be overwritten in this same call: send them
            # to the spare column, so that no two kept writes hit the same slot. (A call of at most `capacity`
            # values keeps them all: known from the shape, without reading the device.)
            in_group = same.sum(dim=1) if pairwise else per_group[group_ids]
            slot = torch.where(rank >= in_group - self.capacity, slot, self.capacity)
        self._slots[group_ids, slot] = values
        if pairwise:
            self._received.index_add_(0, group_ids, ones)
        else:
            self._received.add_(per_group)

    def _pairwise_constants(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The `[n, n]` mask of earlier rows (row i, column j < i) and n ones, kept while calls keep their size."""
        if self._earlier_mask is None or self._earlier_mask.shape[0] != n:  # batches keep their size
            self._earlier_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)
            self._ones = torch.ones(n, dtype=torch.long, device=device)
        return self._earlier_mask, self._ones

    @staticmethod
    def _sorted_rank(group_ids: torch.Tensor, per_group: torch.Tensor) -> torch.Tensor:
        """For every row, how many earlier rows of this call share its group, by a stable sort."""
        order = torch.sort(group_ids, stable=True).indices
        first = torch.cumsum(per_group, 0) - per_group  # where each group starts in the sorted order
        rank = torch.empty_like(group_ids)
        rank[order] = torch.arange(group_ids.numel(), device=group_ids.device) - first[group_ids[order]]
        return rank

    @property
    def is_full(self) -> torch.Tensor:
        """Boolean `[num_groups]`: which buffers hold `capacity` values."""
        return self._group_received >= self.capacity

    def means(self) -> torch.Tensor:
        """Mean of each group's stored values, `[num_groups]` (0 for empty buffers)."""
        # Until a buffer wraps, its values sit in slots [0, count) and the other slots are still zero.
        return self.values.sum(dim=1) / self._group_received.clamp(1, self.capacity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.clone(), "position": self.position, "count": self.count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["values"].shape) != tuple(self.values.shape):
            raise ValueError(
                f"ReplayBuffer: saved buffers have shape {tuple(state['values'].shape)}, expected "
                f"{tuple(self.values.shape)} (num_groups, buffer_size): the groups or buffer_size changed."
            )
        self.values.copy_(state["values"])
        # what the saved (position, count) say was received, modulo the full turns that nothing reads
        count, position = state["count"].to(self._received), state["position"].to(self._received)
        self._group_received.copy_(torch.where(count < self.capacity, count, self.capacity + position))
