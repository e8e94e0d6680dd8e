"""Each training batch's per-sample estimates from every process, so that all processes hold identical replay
buffers and multipliers."""

from __future__ import annotations

import torch


def gather_estimates(
    accelerator, size: int, num_groups: int, group_ids: torch.Tensor, correct: torch.Tensor, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group ids, correctness, losses) of this batch from every process, in rank order.

    Every process pads its rows to `size` (`per_device_train_batch_size`: the most a training batch or a held-out
    draw holds, known without asking the others) with rows of group id `num_groups`, which the estimates leave
    out: one all-gather of fixed shape, and nothing read back to the host (accelerate's `pad_across_processes`
    would read every process's size, a synchronisation each step). A batch with more rows (a collator that adds
    rows) is refused; the process that raises ends the launcher's run."""
    if accelerator.num_processes == 1:
        return group_ids, correct, losses
    rows = group_ids.numel()
    if rows > size:
        raise ValueError(
            f"CEAGTrainer: a process holds {rows} rows for the estimates, more than "
            f"per_device_train_batch_size={size}: batches must come from the Trainer's own dataloader."
        )
    padded = torch.zeros(size, 3, dtype=torch.float32, device=losses.device)
    padded[:, 0] = num_groups
    padded[:rows] = torch.stack([group_ids.float(), correct.float(), losses.float()], dim=1)
    padded = accelerator.gather(padded)
    return padded[:, 0].long(), padded[:, 1], padded[:, 2]
