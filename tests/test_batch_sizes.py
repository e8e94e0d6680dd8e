"""The smallest training batch a process gets (`data/batch_sizes.py`), against accelerate's own sharding."""

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard


@pytest.mark.parametrize("num_rows", [1, 31, 33, 64, 65, 97, 130])
@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("even_batches", [True, False])
@pytest.mark.parametrize("split_batches", [False, True])
def test_smallest_train_batch_matches_accelerates_sharding(
    num_rows, processes, drop_last, even_batches, split_batches
):
    from hf_ceag.data.batch_sizes import smallest_train_batch

    batch_size = 32 if not split_batches else 30  # split: a multiple of the processes
    sampler = torch.utils.data.BatchSampler(range(num_rows), batch_size, drop_last)
    if processes == 1:
        sizes = [len(batch) for batch in sampler]
    else:
        sizes = [
            len(batch)
            for rank in range(processes)
            for batch in BatchSamplerShard(sampler, processes, rank, split_batches, even_batches)
        ]
    if not sizes:
        return  # fewer rows than a batch, dropped
    assert smallest_train_batch(num_rows, batch_size, processes, drop_last, even_batches, split_batches) == min(
        sizes
    )
