import copy

import pytest
import torch
from torch import nn

from hf_ceag import CubicSchedule, MagnitudePruner, prunable_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.body = nn.Conv2d(4, 8, 3)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x))).mean(dim=(2, 3))
        return self.head(torch.relu(self.hidden(x)))


def test_cubic_schedule_values_by_hand():
    s = CubicSchedule(initial=0.0, final=0.9, start=10, end=20, frequency=5)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(10) == 0.0
    assert s.sparsity_at(15) == pytest.approx(0.9 + (0.0 - 0.9) * 0.5**3)  # 0.7875
    assert s.sparsity_at(20) == 0.9 and s.sparsity_at(99) == 0.9
    assert [t for t in range(30) if s.is_pruning_step(t)] == [10, 15, 20]
    assert [t for t in range(30) if CubicSchedule(0, 0.5, 2, 9, 4).is_pruning_step(t)] == [2, 6, 9]


def test_prunable_parameters_keep_first_conv_and_last_linear_dense():
    net = Net()
    assert set(prunable_parameters(net, True)) == {"body.weight", "hidden.weight"}
    assert set(prunable_parameters(net, False)) == {"stem.weight", "body.weight", "hidden.weight", "head.weight"}


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_layerwise_sparsity_is_exact_per_layer(sparsity):
    torch.manual_seed(0)
    net = Net()
    pruner = MagnitudePruner(prunable_parameters(net, True), "layerwise")
    pruner.prune_to(sparsity)
    for name, p in pruner.parameters.items():
        assert int((p == 0).sum()) == round(sparsity * p.numel()), name
    # the kept weights are the largest in magnitude
    body = net.body.weight.detach().abs().flatten()
    kept = body[body > 0]
    assert kept.min() >= body[body == 0].max()
    assert (net.stem.weight != 0).all() and (net.head.weight != 0).all()


def test_global_sparsity_is_exact_overall_and_ranks_across_layers():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.hidden.weight.mul_(100.0)  # far larger than the conv weights: global pruning spares them first
    pruner = MagnitudePruner(prunable_parameters(net, True), "global")
    pruner.prune_to(0.5)
    total = sum(p.numel() for p in pruner.parameters.values())
    assert sum(int((p == 0).sum()) for p in pruner.parameters.values()) == round(0.5 * total)
    assert (net.hidden.weight != 0).all()  # 208 zeros to place, 288 smaller conv weights to take them
    assert pruner.sparsity() == pytest.approx(round(0.5 * total) / total)


def test_masks_are_nested():
    torch.manual_seed(0)
    net = Net()
    pruner = MagnitudePruner(prunable_parameters(net, False), "layerwise")
    pruner.prune_to(0.3)
    before = {k: m.clone() for k, m in pruner.masks.items()}
    with torch.no_grad():
        for p in pruner.parameters.values():
            p.add_(torch.randn_like(p))  # weights move; pruned ones must still stay pruned
    pruner.apply_masks()
    pruner.prune_to(0.6)
    for name, mask in pruner.masks.items():
        assert not (mask & ~before[name]).any()


OPTIMIZERS = {
    # zero-preserving: the pruner zeroes their first moments and adds no pass over the weights
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adamw_amsgrad_maximize": lambda params: torch.optim.AdamW(params, lr=0.01, amsgrad=True, maximize=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
    # any other: a post-step hook zeroes the pruned weights
    "rmsprop_momentum": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.9),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
}


def _steps(net, optimizer, pruner, n):
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    for _ in range(n):
        nn.functional.cross_entropy(net(x), y).backward()
        if pruner is not None:
            pruner.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()


def _pruned_weights_all_zero(pruner) -> bool:
    return all(bool((p[~pruner.masks[name]] == 0).all()) for name, p in pruner.parameters.items())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(name):
    torch.manual_seed(0)
    net = Net()
    optimizer = OPTIMIZERS[name](net.parameters())
    _steps(net, optimizer, None, 3)  # build momentum / Adam moments while dense
    pruner = MagnitudePruner(prunable_parameters(net, True), "layerwise", gradient_hooks=False)
    pruner.attach(optimizer)
    pruner.attach(optimizer)  # idempotent
    zero_preserving = name.startswith(("sgd", "adam"))
    assert bool(optimizer._optimizer_step_post_hooks) != zero_preserving  # the weights' pass only if needed
    for sparsity in (0.5, 0.8):  # gradual: the second pruning meets state built under the first masks
        before = {key: state.copy() for key, state in optimizer.state.items()}
        pruner.prune_to(sparsity)
        _steps(net, optimizer, pruner, 4)
        assert _pruned_weights_all_zero(pruner), sparsity
    if zero_preserving:
        # the test can fail: with the state as it was before the last pruning (first moments not zeroed at
        # the newly pruned entries) a step revives pruned weights
        net_copy = Net()
        net_copy.load_state_dict(net.state_dict())
        stale = OPTIMIZERS[name](net_copy.parameters())
        stale.load_state_dict(optimizer.state_dict())
        for p_copy, p in zip(net_copy.parameters(), net.parameters()):
            for key, value in before.get(p, {}).items():
                if key in ("momentum_buffer", "exp_avg"):
                    stale.state[p_copy][key] = value.clone()
        _steps(net_copy, stale, None, 1)
        copied = dict(zip(net.parameters(), net_copy.parameters()))
        assert any((copied[p][~pruner.masks[n]] != 0).any() for n, p in pruner.parameters.items()), (
            "zeroing the first moments made no difference: the test proves nothing"
        )


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_loading_optimizer_state_zeroes_the_pruned_first_moments(name):
    # A resume may bring state whose pruned entries are not zero (a checkpoint of an earlier version, which
    # zeroed the weights after each step instead): loading it into an attached optimizer zeroes them.
    torch.manual_seed(0)
    net = Net()
    donor = OPTIMIZERS[name](net.parameters())
    _steps(net, donor, None, 3)  # dense moments, nonzero everywhere
    checkpoint = copy.deepcopy(donor.state_dict())  # as read from disk
    key = "momentum_buffer" if name.startswith("sgd") else "exp_avg"
    optimizer = OPTIMIZERS[name](net.parameters())
    pruner = MagnitudePruner(prunable_parameters(net, True), "layerwise", gradient_hooks=False)
    pruner.attach(optimizer)
    pruner.prune_to(0.7)
    optimizer.load_state_dict(copy.deepcopy(checkpoint))  # (loading aliases tensors already in place)
    index = {p: i for i, p in enumerate(net.parameters())}
    for n, p in pruner.parameters.items():
        moment, saved, kept = optimizer.state[p][key], checkpoint["state"][index[p]][key], pruner.masks[n]
        assert (moment[~kept] == 0).all() and torch.equal(moment[kept], saved[kept]), n
        assert (saved[~kept] != 0).any(), n  # the test can fail
    _steps(net, optimizer, pruner, 3)
    assert _pruned_weights_all_zero(pruner)


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("seed", [0, 1])
def test_zeroed_first_moments_train_bit_for_bit_like_masking_the_weights_after_every_step(name, seed):
    """An independent re-implementation: the same steps and prunings with the pruned weights zeroed after every
    optimizer step instead (what any other optimizer gets, and what every optimizer got before), and their
    moments left as they are. Both give the same weights, bit for bit."""
    torch.manual_seed(seed)
    nets = [Net(), Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [OPTIMIZERS[name](net.parameters()) for net in nets]
    pruners = [MagnitudePruner(prunable_parameters(net, True), "layerwise", gradient_hooks=False) for net in nets]
    pruners[0].attach(optimizers[0])
    optimizers[1].register_step_post_hook(lambda *_: pruners[1].apply_masks())
    assert not optimizers[0]._optimizer_step_post_hooks  # the path under test makes no pass over the weights
    for sparsity in (None, 0.5, 0.8):  # dense steps first: the moments exist when the first pruning comes
        for net, optimizer, pruner in zip(nets, optimizers, pruners):
            if sparsity is not None:
                pruner.prune_to(sparsity)
            torch.manual_seed(seed + 10)  # the same batches for both
            _steps(net, optimizer, pruner, 4)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_model_without_prunable_layers_is_refused():
    with pytest.raises(ValueError, match="no prunable layers"):
        MagnitudePruner(prunable_parameters(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), True), "layerwise")


def test_measured_sparsity_counts_zeros_by_hand_and_reads_the_device_once():
    from torch.overrides import TorchFunctionMode

    from hf_ceag.pruning.magnitude import measured_sparsity

    reads = []
    host = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
            torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}  # fmt: skip

    class Reads(TorchFunctionMode):  # every way a tensor's value reaches the host (a sync each on a GPU)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in host:
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    weights = {
        "a": torch.tensor([[0.0, 1.0], [0.0, -0.0]]),
        "b": torch.tensor([0.0, 2.0, 3.0]),
        "c": torch.zeros(5),
    }
    with Reads():
        overall, per_weight = measured_sparsity(weights)
    assert reads == ["tolist"]
    assert overall == (3 + 1 + 5) / 12  # -0.0 is a zero
    assert per_weight == {"a": 3 / 4, "b": 1 / 3, "c": 1.0}
    with pytest.raises(ValueError, match="no weights given"):
        measured_sparsity({})


def test_dense_parent_sparsity_warns_only_about_a_parent_far_from_dense():
    import warnings

    from hf_ceag.pruning.magnitude import dense_parent_sparsity

    weights = {"a.weight": torch.ones(10, 10), "b.weight": torch.ones(100)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dense_parent_sparsity(weights) == 0.0
        weights["a.weight"][:5] = 0  # 50 of 200 zero
        assert dense_parent_sparsity(weights) == 0.25
    weights["b.weight"][:70] = 0  # 120 of 200
    with pytest.warns(UserWarning, match=r"already 60\.0 % sparse"):
        assert dense_parent_sparsity(weights) == 0.6
