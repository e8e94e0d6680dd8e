from collections import deque

import pytest
import torch

from hf_ceag import ReplayBuffer


def naive_means(history, num_groups, capacity):
    buffers = [deque(maxlen=capacity) for _ in range(num_groups)]
    for g, v in history:
        buffers[g].append(v)
    means = [sum(b) / len(b) if b else 0.0 for b in buffers]
    full = [len(b) == capacity for b in buffers]
    return torch.tensor(means), torch.tensor(full), [list(b) for b in buffers]


@pytest.mark.parametrize("rank_by", ["comparison", "sort"])
@pytest.mark.parametrize("padding", [False, True], ids=["rows", "rows_and_padding"])
@pytest.mark.parametrize("capacity", [1, 3, 7, 20])  # 20: every batch fits (no drop step)
def test_matches_naive_deque_over_random_batches(capacity, padding, rank_by, monkeypatch):
    """With `padding`, rows of id `num_groups` (what a gather across processes pads with) are mixed in: the
    naive deque never sees them. `rank_by`: both ways of ranking rows within their group (small and large
    calls), forced by the size limit between them."""
    monkeypatch.setattr(ReplayBuffer, "PAIRWISE_RANK_MAX_ROWS", 10**6 if rank_by == "comparison" else 0)
    gen = torch.Generator().manual_seed(capacity)
    num_groups = 5
    buffer = ReplayBuffer(num_groups, capacity)
    history = []
    for _ in range(30):
        size = int(torch.randint(1, 20, (1,), generator=gen))
        # skewed group draws so that some groups get more than `capacity` values in one batch
        weights = torch.tensor([8.0, 4, 2, 1, 0.2] + ([3.0] if padding else []))
        ids = torch.multinomial(weights, size, replacement=True, generator=gen)
        values = torch.rand(size, generator=gen).round(decimals=2)
        buffer.update(ids, values)
        history += [(g, v) for g, v in zip(ids.tolist(), values.tolist()) if g < num_groups]
        means, full, contents = naive_means(history, num_groups, capacity)
        torch.testing.assert_close(buffer.means(), means, rtol=0, atol=1e-6)
        assert buffer.is_full.tolist() == full.tolist()
        for g in range(num_groups):
            stored = sorted(buffer.values[g, : int(buffer.count[g])].tolist())
            assert stored == pytest.approx(sorted(contents[g]), abs=1e-6)


def test_state_dict_round_trip_and_shape_check():
    buffer = ReplayBuffer(3, 4)
    buffer.update(torch.tensor([0, 0, 2]), torch.tensor([1.0, 0.0, 1.0]))
    other = ReplayBuffer(3, 4)
    other.load_state_dict(buffer.state_dict())
    torch.testing.assert_close(other.means(), buffer.means())
    # group 0 wraps (6 values: next slot 2), group 1 fills exactly (4: next slot 0), group 2 holds 1
    buffer.update(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([1.0, 1, 0, 1, 0, 0, 1, 1]))
    state = buffer.state_dict()
    assert state["position"].tolist() == [2, 0, 1] and state["count"].tolist() == [4, 4, 1]
    other = ReplayBuffer(3, 4)
    other.load_state_dict(state)
    for ids, values in (
        (torch.tensor([0, 1, 2, 2, 2]), torch.tensor([0.0, 1, 0, 0, 1])),
        (torch.tensor([2]), torch.tensor([1.0])),
    ):
        buffer.update(ids, values)
        other.update(ids, values)
        assert torch.equal(other.values, buffer.values) and torch.equal(other.means(), buffer.means())
        assert other.state_dict()["position"].tolist() == buffer.state_dict()["position"].tolist()
        assert other.is_full.tolist() == buffer.is_full.tolist()
    assert buffer.is_full.tolist() == [True, True, True] and buffer.position.tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="buffer_size"):
        ReplayBuffer(3, 5).load_state_dict(buffer.state_dict())
