import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_ceag import MagnitudePruner, prunable_parameters
from hf_ceag.pruning.fairgrape import (
    disparity_std,
    fairgrape_masks,
    geometric_sparsities,
    greedy_select,
    greedy_select_layers,
    group_importance,
    target_shares,
)


class TinyClassifier(nn.Module):
    """A conv, a BatchNorm and two linear layers, called like a transformers image classifier."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, num_labels)

    def forward(self, pixel_values):
        x = torch.relu(self.norm(self.conv(pixel_values))).mean(dim=(2, 3))
        return SimpleNamespace(logits=self.head(torch.relu(self.hidden(x))))


def make_model():
    torch.manual_seed(0)
    model = TinyClassifier()
    with torch.no_grad():  # non-default running statistics, so that train and eval mode give different outputs
        model(pixel_values=torch.randn(32, 1, 6, 6) * 2 + 1)
    return model


def make_batches(num_batches=3, size=10, num_groups=3):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for b in range(num_batches):
        # the last batch lacks group 2: absent groups must be skipped, not scored with an empty loss
        groups = num_groups - 1 if b == num_batches - 1 else num_groups
        batches.append(
            {
                "pixel_values": torch.randn(size, 1, 6, 6, generator=generator),
                "labels": torch.randint(0, 3, (size,), generator=generator),
                "group_ids": torch.arange(size) % groups,
            }
        )
    return batches


def naive_importance(model, names, batches, num_groups):
    """Σ_b (w · ∂L_{g,b}/∂w)², ∂L_{g,b}/∂w the mean of per-sample gradients, one backward each."""
    reference = copy.deepcopy(model).eval()
    params = {name: reference.get_parameter(name) for name in names}
    expected = {name: torch.zeros(num_groups, *p.shape) for name, p in params.items()}
    for batch in batches:
        for g in range(num_groups):
            rows = (batch["group_ids"] == g).nonzero().flatten().tolist()
            if not rows:
                continue
            grad_sum = {name: torch.zeros_like(p) for name, p in params.items()}
            for i in rows:
                reference.zero_grad()
                logits = reference(pixel_values=batch["pixel_values"][i : i + 1]).logits
                F.cross_entropy(logits, batch["labels"][i : i + 1]).backward()
                for name, p in params.items():
                    grad_sum[name] += p.grad
            for name, p in params.items():
                expected[name][g] += (p.detach() * grad_sum[name] / len(rows)) ** 2
    return expected


def retained_shares(layer, kept):
    retained = layer[:, kept].sum(dim=1, dtype=torch.float64)
    return retained / retained.sum()


def test_group_importance_matches_naive_per_sample_autograd_and_leaves_model_untouched():
    model = make_model()
    model.norm.eval()  # a submodule the user froze in eval mode must stay in eval mode
    parameters = prunable_parameters(model, keep_first_last_dense=False)
    assert set(parameters) == {"conv.weight", "hidden.weight", "head.weight"}
    batches = make_batches()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    masks = {name: torch.rand(p.shape, generator=generator) > 0.3 for name, p in parameters.items()}

    importance = group_importance(model, parameters, iter(batches), num_groups=3, masks=masks)

    expected = naive_importance(model, list(parameters), batches, num_groups=3)
    for name, p in parameters.items():
        assert importance[name].shape == (3, *p.shape) and importance[name].dtype == torch.float32
        torch.testing.assert_close(importance[name], expected[name] * masks[name], rtol=1e-4, atol=1e-10)
        # pruned weights score 0 although they are non-zero here and the naive importance is not
        assert (importance[name][:, ~masks[name]] == 0).all()
        assert (expected[name][:, ~masks[name]] > 0).any(), name
    # no optimizer step, no gradient left behind, running statistics frozen, training flags restored
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.conv.training and not model.norm.training


def test_group_importance_without_masks_counts_every_weight_and_stops_at_max_batches():
    model = make_model()
    parameters = prunable_parameters(model, keep_first_last_dense=False)
    batches = make_batches()
    importance = group_importance(model, parameters, batches, num_groups=3, max_batches=1)
    expected = naive_importance(model, list(parameters), batches[:1], num_groups=3)
    for name in parameters:
        torch.testing.assert_close(importance[name], expected[name], rtol=1e-4, atol=1e-10)


def test_group_importance_refuses_group_ids_outside_num_groups():
    model = make_model()
    with pytest.raises(ValueError, match="outside"):
        group_importance(model, prunable_parameters(model, False), make_batches(num_groups=3), num_groups=2)


def test_target_shares_by_hand():
    importance = {
        "a": torch.tensor([[1.0, 3.0], [2.0, 2.0]]),  # 4 vs 4
        "b": torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]]),  # 1 vs 3, weight of shape [1, 3]
        "c": torch.zeros(2, 4),  # no importance at all: uniform
    }
    shares = target_shares(importance)
    torch.testing.assert_close(shares["a"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(shares["b"], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(shares["c"], torch.tensor([0.5, 0.5], dtype=torch.float64))


# Two groups A, B with equal targets, six weights w0..w5.
HAND_IMPORTANCE = torch.tensor(
    [
        [4.0, 3.0, 0.0, 1.0, 2.0, 0.0],  # I_A
        [0.0, 1.0, 3.0, 0.0, 2.0, 2.0],  # I_B
    ]
)
HAND_SHARES = torch.tensor([0.5, 0.5])


def test_greedy_select_hand_worked_example():
    # keep 4, one weight per step. R = retained importance (A, B), r = R / ΣR, deficit = S − r.
    # 1. R = (0, 0): r = (0, 0), deficits (0.5, 0.5) tie -> lowest group index, A. A's best: w0 (4).
    #    R = (4, 0).
    # 2. r = (1, 0), deficits (-0.5, 0.5) -> B. B's best: w2 (3). R = (4, 3).
    # 3. r = (4/7, 3/7), deficits (-1/14, 1/14) -> B. B's best not kept: w4 and w5 tie at 2 -> lowest weight
    #    index, w4. R = (4 + 2, 3 + 2) = (6, 5).
    # 4. r = (6/11, 5/11), deficits (-1/22, 1/22) -> B. B's best not kept: w5 (2). R = (6, 7).
    # Kept {w0, w2, w4, w5}. Ranking by summed importance (4, 4, 3, 1, 4, 2) would keep w1 instead of w5.
    kept = greedy_select(HAND_IMPORTANCE, keep=4, shares=HAND_SHARES)
    assert kept.tolist() == [True, False, True, False, True, True]


def test_greedy_select_hand_worked_chunks():
    # chunk 2, keep 4:
    # 1. deficits tie -> A keeps its two best: w0 (4), w1 (3). R = (4 + 3, 0 + 1) = (7, 1).
    # 2. r = (7/8, 1/8) -> B keeps its two best not kept: w2 (3), then w4 (tie with w5, lower index).
    # Kept {w0, w1, w2, w4}. With keep 3 the second step takes only one weight, w2: exactly `keep` kept.
    assert greedy_select(HAND_IMPORTANCE, 4, HAND_SHARES, chunk=2).tolist() == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]
    assert greedy_select(HAND_IMPORTANCE, 3, HAND_SHARES, chunk=2).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert greedy_select(HAND_IMPORTANCE, 0, HAND_SHARES).sum() == 0
    assert greedy_select(HAND_IMPORTANCE, 6, HAND_SHARES).all()


def random_layer(num_groups=4, n=2000, seed=0):
    # I_g(w) = (w · grad_g)² with group gradients sharing a common part, as for real groups of one task
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(n, generator=generator)
    shared = torch.randn(n, generator=generator)
    grads = 0.6 * shared + torch.randn(num_groups, n, generator=generator) * torch.rand(
        num_groups, 1, generator=generator
    )
    return (weights * grads) ** 2


@pytest.mark.parametrize("chunk, min_overlap", [(5, 0.98), (25, 0.95)])
def test_chunked_greedy_matches_exact_greedy_closely(chunk, min_overlap):
    layer = random_layer()
    shares = target_shares({"layer": layer})["layer"]
    exact = greedy_select(layer, 500, shares, chunk=1)
    chunked = greedy_select(layer, 500, shares, chunk=chunk)
    assert exact.sum() == chunked.sum() == 500
    overlap = float((exact & chunked).sum()) / 500
    print(f"chunk {chunk}: overlap with exact greedy {overlap:.3f}")
    assert overlap >= min_overlap
    # both keep every group's retained share near its target
    assert (retained_shares(layer, chunked) - shares).abs().max() < 0.02


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_layers_selected_in_lockstep_equal_the_greedy_one_layer_at_a_time(device):
    """`greedy_select_layers` (the accelerator path) against `greedy_select`, the reference loop: random layers
    of several sizes, keeps and chunks (including keep 0, keep n and chunk 1), and one layer built so that the
    lockstep window runs short (the later groups' orders are entirely taken by the first group's), so that blocks
    of steps are undone and rerun with a wider window."""
    generator = torch.Generator().manual_seed(0)
    layers, keeps, chunks = [], [], []
    for n, keep, chunk in ((1, 0, 1), (7, 7, 2), (300, 40, 1), (2000, 500, 5), (2000, 1200, 25), (97, 30, 3)):
        layers.append(random_layer(num_groups=3, n=n, seed=n + keep))
        keeps.append(keep)
        chunks.append(chunk)
    base = torch.rand(200, generator=generator)
    layers.append(torch.stack([base, 1e-3 * base, 1e-3 * base]))  # one order for every group, shares ~1 / 0 / 0
    keeps.append(150)
    chunks.append(1)
    shares = [target_shares({"l": layer})["l"] for layer in layers]
    expected = [greedy_select(*args[:3], chunk=args[3]) for args in zip(layers, keeps, shares, chunks)]
    for block in (1, 7, 32, 10_000):  # blocks undone and rerun at any step, or never
        fast = greedy_select_layers([layer.to(device) for layer in layers], keeps, shares, chunks, block=block)
        for i, keep in enumerate(keeps):
            assert torch.equal(fast[i].cpu(), expected[i]), (block, i)
            assert int(fast[i].sum()) == keep


def test_greedy_equalises_retained_shares_where_magnitude_pruning_starves_a_group():
    # Group A's important weights are large, group B's are small in magnitude but matter as much to B.
    generator = torch.Generator().manual_seed(0)
    n = 400
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    magnitude = torch.cat(
        [1 + torch.rand(n // 2, generator=generator), 0.05 + 0.05 * torch.rand(n // 2, generator=generator)]
    )
    weight = sign * magnitude
    noise = torch.randn(2, n, generator=generator)
    grad_a = torch.cat([noise[0, : n // 2], 0.01 * noise[0, n // 2 :]])
    grad_b = torch.cat([0.01 * noise[1, : n // 2], 20 * noise[1, n // 2 :]])
    importance = torch.stack([(weight * grad_a) ** 2, (weight * grad_b) ** 2])
    target_b = float(target_shares({"w": importance})["w"][1])
    assert 0.3 < target_b < 0.7

    pruner = MagnitudePruner({"w": nn.Parameter(weight.clone())}, "layerwise")
    pruner.prune_to(0.5)
    magnitude_kept = pruner.masks["w"]
    assert float(retained_shares(importance, magnitude_kept)[1]) < 0.05  # B keeps under 5 % of the importance

    greedy_kept = fairgrape_masks({"w": importance}, 0.5, {"w": torch.ones(n, dtype=torch.bool)})["w"]
    assert int(greedy_kept.sum()) == int(magnitude_kept.sum()) == n // 2
    assert abs(float(retained_shares(importance, greedy_kept)[1]) - target_b) < 0.01


def test_geometric_sparsities_by_hand():
    assert geometric_sparsities(0.875, 3) == pytest.approx([0.5, 0.75, 0.875])  # keep half per round
    assert geometric_sparsities(0.99, 2) == pytest.approx([0.9, 0.99])  # keep a tenth per round
    assert geometric_sparsities(0.9, 1) == [0.9]
    assert geometric_sparsities(0.97, 7)[-1] == 0.97  # exactly, not 1 − 0.03^(7/7)
    with pytest.raises(ValueError, match="rounds"):
        geometric_sparsities(0.9, 0)


def test_fairgrape_masks_are_nested_across_rounds_with_exact_counts_per_layer():
    generator = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (4, 3, 3, 3), "fc.weight": (10, 33)}
    masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}
    for sparsity in geometric_sparsities(0.9, 3):
        # re-scored each round; pruned weights get importance too here, so reviving one would be possible
        importance = {name: torch.rand(3, *shape, generator=generator) for name, shape in shapes.items()}
        new = fairgrape_masks(importance, sparsity, masks, chunk_fraction=0.05)
        for name, shape in shapes.items():
            n = masks[name].numel()
            assert new[name].shape == shape and new[name].dtype == torch.bool
            assert int(new[name].sum()) == n - round(sparsity * n), (name, sparsity)
            assert not (new[name] & ~masks[name]).any(), f"{name} revived a pruned weight"
        masks = new
    with pytest.raises(ValueError, match="never come back"):
        fairgrape_masks(importance, 0.5, masks)


def test_masks_load_into_the_magnitude_pruner():
    model = make_model()
    parameters = prunable_parameters(model, keep_first_last_dense=False)
    pruner = MagnitudePruner(parameters, "layerwise")
    for sparsity in geometric_sparsities(0.8, 2):
        importance = group_importance(model, parameters, make_batches(), num_groups=3, masks=pruner.masks)
        pruner.load_state_dict(fairgrape_masks(importance, sparsity, pruner.masks))
    for name, p in parameters.items():
        assert int((p == 0).sum()) == round(0.8 * p.numel()), name


def test_disparity_std_by_hand():
    # changes (0.05, 0.0, 0.1): mean 0.05, deviations (0, -0.05, 0.05), population variance 0.005 / 3
    assert disparity_std([0.9, 0.8, 0.7], [0.85, 0.8, 0.6]) == pytest.approx((0.005 / 3) ** 0.5)
    assert disparity_std(torch.tensor([0.9, 0.8]), torch.tensor([0.8, 0.7])) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same non-zero number"):
        disparity_std([0.9], [0.8, 0.7])
