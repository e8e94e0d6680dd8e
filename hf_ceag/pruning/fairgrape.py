"""FairGRAPE (Lin, Kim & Joo, ECCV 2022): group-aware importance pruning, the baseline CEAG is compared with.

Per prunable weight w and group g, the importance is the squared first-order Taylor term of group g's task
loss, summed over calibration batches b:

    I_g(w) = Σ_b (w · ∂L_{g,b}/∂w)²        L_{g,b} = mean cross-entropy of group g's samples in batch b

Per layer l, group g's target share of the layer's importance is

    S_{l,g} = Σ_{w∈l} I_g(w) / Σ_{g'} Σ_{w∈l} I_{g'}(w)

and each layer keeps the same fraction of its weights, chosen greedily so that every group retains about its
target share (`greedy_select`). Pruning proceeds in rounds on a geometric schedule (`geometric_sparsities`),
re-scoring every round with masks nested across rounds; fine-tuning between rounds belongs to the trainer.

Memory, for a layer of n weights and G groups: the importance accumulator holds G · n float32 values
(4·G·n bytes; e.g. 100 groups × a 2.4 M-weight conv = 0.94 GB), and all layers' accumulators coexist while
scoring, since every backward pass yields every layer's gradient (`accumulator_device="cpu"` keeps them off
the accelerator). Selection then runs one layer at a time, adding a transient G · n int64 sort order
(8·G·n bytes) for that layer only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.groups import group_means


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample, in float32 (the default `loss_fn` of `group_importance`)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def group_importance(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    num_groups: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_sample_cross_entropy,
    masks: Mapping[str, torch.Tensor] | None = None,
    group_key: str = "group_ids",
    max_batches: int | None = None,
    accumulator_device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group importance of every weight in `parameters`: I_g(w) = Σ_b (w · ∂L_{g,b}/∂w)².

    Returns, per weight name, a float32 tensor of shape [num_groups, *weight.shape].

    Each batch (a mapping with `pixel_values`, `labels` and `group_key`, a long tensor of group ids in
    [0, num_groups)) takes ONE forward pass, giving per-sample losses `loss_fn(logits, labels)` and from them
    every group's mean loss L_{g,b}; then one backward pass per group present in the batch (`retain_graph`
    for all but the last). Sharing the forward costs 1 + G passes per batch instead of 2·G, at the price of
    keeping one batch's activations alive, as any training step does. Gradients come from
    `torch.autograd.grad`, so each (batch, group) gets fresh gradients, nothing accumulates in `.grad`, and
    no optimizer step is taken: the weights are left exactly as they were.

    The model is scored in eval mode (BatchNorm uses and keeps its running statistics, dropout is off), and
    every module's training flag is restored afterwards. Weights whose mask is False (already pruned) score
    0. `max_batches` stops after that many batches; `model` must be the bare module (not DDP-wrapped).
    """
    if num_groups < 1:
        raise ValueError(f"group_importance: num_groups must be >= 1, got {num_groups}.")
    if not parameters:
        raise ValueError("group_importance: no parameters to score; pass prunable_parameters(model, ...).")
    frozen = [name for name, p in parameters.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"group_importance: parameters {frozen} do not require grad; unfreeze them or drop them.")
    if masks is not None and set(masks) != set(parameters):
        raise ValueError(
            f"group_importance: masks are for {sorted(masks)}, parameters are {sorted(parameters)}; "
            "pass the pruner's masks for the same parameters."
        )
    importance = {
        name: torch.zeros((num_groups, *p.shape), dtype=torch.float32, device=accumulator_device or p.device)
        for name, p in parameters.items()
    }
    training = {module: module.training for module in model.modules()}
    model.eval()
    seen = 0
    try:
        with torch.enable_grad():
            for batch in itertools.islice(batches, max_batches):
                _score_batch(model, parameters, batch, num_groups, loss_fn, group_key, importance)
                seen += 1
    finally:
        for module, mode in training.items():
            module.training = mode  # per module: model.train(mode) would overwrite submodules kept in eval
    if seen == 0:
        raise ValueError("group_importance: `batches` yielded no calibration batch; pass at least one.")
    if masks is not None:
        for name, scores in importance.items():
            scores.mul_(masks[name].to(scores.device, torch.bool))
    return importance


def _score_batch(model, parameters, batch, num_groups, loss_fn, group_key, importance) -> None:
    weights = list(parameters.values())
    device = weights[0].device
    group_ids = batch[group_key].to(device, torch.long).reshape(-1)
    if group_ids.numel() and (int(group_ids.min()) < 0 or int(group_ids.max()) >= num_groups):
        raise ValueError(
            f"group_importance: batch[{group_key!r}] holds ids outside [0, {num_groups}); "
            "pass num_groups covering every group id."
        )
    logits = model(pixel_values=batch["pixel_values"].to(device)).logits
    group_loss, counts = group_means(loss_fn(logits, batch["labels"].to(device)).float(), group_ids, num_groups)
    present = counts.nonzero().flatten().tolist()
    for i, g in enumerate(present):
        grads = torch.autograd.grad(group_loss[g], weights, retain_graph=i < len(present) - 1, allow_unused=True)
        for (name, w), grad in zip(parameters.items(), grads):
            if grad is not None:  # a weight the loss does not reach scores 0
                term = (w.detach().float() * grad.float()).square_()
                importance[name][g].add_(term.to(importance[name].device))


def target_shares(importance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, each group's share of the layer's importance.

        S_{l,g} = Σ_{w∈l} I_g(w) / Σ_{g'} Σ_{w∈l} I_{g'}(w)

    Returns float64 tensors of shape [num_groups] summing to 1; a layer with no importance at all gets
    uniform shares 1/G.
    """
    return {name: _shares(scores.reshape(scores.shape[0], -1)) for name, scores in importance.items()}


def _shares(layer: torch.Tensor) -> torch.Tensor:
    totals = layer.sum(dim=1, dtype=torch.float64)
    total = totals.sum()
    uniform = torch.full_like(totals, 1.0 / totals.numel())
    return torch.where(total > 0, totals / total.clamp(min=torch.finfo(torch.float64).tiny), uniform)


def greedy_select(importance_layer: torch.Tensor, keep: int, shares: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """Choose `keep` of the layer's n weights so that every group retains about its target share of importance.

    `importance_layer` is [G, n] (I_g(w) per group and weight), `shares` is [G] (the targets S_g). With
    R_g = Σ_{w kept} I_g(w) the importance group g retains and r_g = R_g / Σ_{g'} R_{g'} its retained share
    (r_g = 0 while nothing is retained), each step:

    1. picks the group g* = argmax_g (S_g − r_g), the one furthest below its target; ties go to the lowest
       group index;
    2. keeps g*'s most important weight not yet kept (ties go to the lowest weight index), or with
       `chunk > 1` its next `chunk` such weights (fewer on the last step, so exactly `keep` are kept);
    3. adds the kept weights' importance to every group's R_g.

    `chunk=1` is the exact one-at-a-time greedy. Each group's weights are sorted once; a step costs a few
    tensor operations, so a layer takes about keep / chunk steps. Returns a BoolTensor [n], True = kept.
    """
    if importance_layer.dim() != 2:
        raise ValueError(
            f"greedy_select: importance_layer must be [groups, weights], got {tuple(importance_layer.shape)}."
        )
    num_groups, n = importance_layer.shape
    if not 0 <= keep <= n:
        raise ValueError(f"greedy_select: keep must be in [0, {n}] (the layer's weights), got {keep}.")
    if tuple(shares.shape) != (num_groups,):
        raise ValueError(f"greedy_select: shares must have shape ({num_groups},), got {tuple(shares.shape)}.")
    if chunk < 1:
        raise ValueError(f"greedy_select: chunk must be >= 1 (1 = exact greedy), got {chunk}.")
    device = importance_layer.device
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    if keep == n:
        return kept.fill_(True)
    order = torch.sort(importance_layer, dim=1, descending=True, stable=True).indices
    start = [0] * num_groups  # in group g's order, every weight before start[g] is kept
    target = shares.to(device, torch.float64)
    retained = torch.zeros(num_groups, dtype=torch.float64, device=device)
    tiny = torch.finfo(torch.float64).tiny
    count = 0
    while count < keep:
        share = retained / retained.sum().clamp(min=tiny)
        g = int(torch.argmax(target - share))  # argmax returns the first maximum: lowest group index on ties
        take = min(chunk, keep - count)
        chosen, start[g] = _next_unkept(order[g], kept, start[g], take)
        kept[chosen] = True
        retained += importance_layer[:, chosen].sum(dim=1, dtype=torch.float64)
        count += take
    return kept


def _next_unkept(row: torch.Tensor, kept: torch.Tensor, start: int, take: int) -> tuple[torch.Tensor, int]:
    # The first `take` not-yet-kept entries of `row` from `start` on, found in a window that doubles until it
    # holds enough; there always are enough, since keep < n and only kept weights are skipped.
    window = 2 * take
    while True:
        candidates = row[start : start + window]
        free = (~kept[candidates]).nonzero().flatten()
        if free.numel() >= take or start + window >= row.numel():
            free = free[:take]
            return candidates[free], start + int(free[-1]) + 1
        window *= 2


def greedy_select_layers(
    layers: Sequence[torch.Tensor],
    keeps: Sequence[int],
    shares: Sequence[torch.Tensor],
    chunks: Sequence[int],
    block: int = 32,
) -> list[torch.Tensor]:
    """`greedy_select` for several layers at once, in lockstep, with the same result.

    Step t of every layer runs in the same few tensor operations over all layers: each layer's group g* looks
    at a window of the next W entries of its order and keeps the first `take` not yet kept. The steps run in
    blocks of `block`, with no host-device synchronisation inside a block and one flag read after it. If some
    layer's window held fewer than `take` free entries in that block (the other groups had already kept most
    of it: group orders overlap), the block is undone and run again with a window four times wider, which
    stays for the rest of the selection; a window as long as the longest layer never runs short. So the result
    is always the exact chunked greedy's, in one pass. Layers are `[G, n_l]` on one device; the selection holds
    about 12·G + 1 bytes per weight on top of them: each group's order (int64) and a float32 copy of the
    importance, and the kept flags.
    """
    if not layers:
        return []
    lockstep = _Lockstep(layers, keeps, shares, chunks)
    window = min(2 * max(chunks), lockstep.longest)
    step = 0
    while step < lockstep.steps:
        stop = min(step + block, lockstep.steps)
        saved = lockstep.save() if window < lockstep.longest else None
        short = lockstep.run(step, stop, window)
        if saved is not None and bool(short):  # the one read per block
            lockstep.restore(saved)
            window = min(4 * window, lockstep.longest)
            continue
        step = stop
    return lockstep.masks()


class _Lockstep:
    # The state of `greedy_select_layers`: every layer's weights side by side in one flat index space
    # [0, total), plus one dummy entry (index `total`) that masked-out writes and gathers go to.

    def __init__(self, layers, keeps, shares, chunks):
        device, self.num_groups = layers[0].device, layers[0].shape[0]
        self.sizes = [layer.shape[1] for layer in layers]
        self.longest, self.total = max(self.sizes), sum(self.sizes)
        starts = [0, *itertools.accumulate(self.sizes[:-1])]
        num_layers = len(layers)
        self.offsets = torch.tensor(starts, device=device)[:, None]
        self.last = torch.tensor(self.sizes, device=device)[:, None] - 1
        keep_t = torch.tensor(list(keeps), device=device)
        chunk_t = torch.tensor(list(chunks), device=device)
        self.steps = max((math.ceil(k / c) if k else 0 for k, c in zip(keeps, chunks)), default=0)
        self.chunk = max(chunks)
        counts = torch.arange(self.steps, device=device)[:, None] * chunk_t
        self.takes = (keep_t - counts).clamp(min=0).minimum(chunk_t)  # [steps, L]; 0 once a layer is done
        zero_row = torch.zeros(1, self.num_groups, device=device)
        self.rows_of = torch.cat([*(layer.float().T for layer in layers), zero_row])  # [total + 1, G]
        order = torch.full((self.num_groups, self.total), self.total, dtype=torch.long, device=device)
        for layer, offset in zip(layers, starts):
            sorted_ids = torch.sort(layer, dim=1, descending=True, stable=True).indices
            order[:, offset : offset + layer.shape[1]] = sorted_ids + offset
        self.order = order.view(-1)  # group g's order of layer l at g * total + offsets[l] + position
        self.target = torch.stack([share.to(device, torch.float64) for share in shares])  # [L, G]
        self.kept = torch.zeros(self.total + 1, dtype=torch.bool, device=device)
        self.start = torch.zeros(num_layers, self.num_groups, dtype=torch.long, device=device)
        self.retained = torch.zeros(num_layers, self.num_groups, dtype=torch.float64, device=device)
        self.positions = torch.arange(self.longest, device=device)
        self.tiny = torch.finfo(torch.float64).tiny

    def save(self):
        return self.kept.clone(), self.start.clone(), self.retained.clone()

    def restore(self, saved) -> None:
        for tensor, copy in zip((self.kept, self.start, self.retained), saved):
            tensor.copy_(copy)

    def run(self, begin: int, end: int, window: int) -> torch.Tensor:
        short = torch.zeros((), dtype=torch.bool, device=self.kept.device)
        for step in range(begin, end):
            short |= self._step(self.takes[step][:, None], window)
        return short

    def _step(self, take: torch.Tensor, window: int) -> torch.Tensor:
        share = self.retained / self.retained.sum(dim=1, keepdim=True).clamp(min=self.tiny)
        g = torch.argmax(self.target - share, dim=1, keepdim=True)  # first maximum: lowest group index on ties
        first = self.start.gather(1, g)  # [L, 1]
        index = first + self.positions[:window]  # [L, W] positions in g's order of each layer
        inside = index <= self.last
        candidates = self.order[g * self.total + self.offsets + index.minimum(self.last)]
        free = inside & ~self.kept[candidates]
        taken = free.cumsum(dim=1)
        chosen = free & (taken <= take)
        self.kept.index_put_((torch.where(chosen, candidates, self.total),), self.kept.new_ones(()))
        # the chosen weights, compacted to [L, chunk] slots in the order taken (the spare slot collects the rest)
        slot = torch.where(chosen, taken - 1, self.chunk)
        picked = torch.full((len(self.sizes), self.chunk + 1), self.total, device=slot.device)
        picked.scatter_(1, slot, candidates)
        self.retained += self.rows_of[picked[:, : self.chunk]].sum(dim=1, dtype=torch.float64)
        reached = (taken < take).sum(dim=1, keepdim=True)  # window index of the take-th free entry
        self.start.scatter_(1, g, torch.where(take > 0, first + reached + 1, first))
        return (taken[:, -1:] < take).any()

    def masks(self) -> list[torch.Tensor]:
        return list(self.kept[: self.total].split(self.sizes))


def fairgrape_masks(
    importance: Mapping[str, torch.Tensor],
    sparsity: float,
    current_masks: Mapping[str, torch.Tensor],
    chunk_fraction: float = 1e-3,
    max_batch_values: int | None = None,
) -> dict[str, torch.Tensor]:
    """New masks (True = kept, shaped like each weight) pruning every layer to `sparsity` with `greedy_select`.

    Per layer of n weights, keeps K = n − round(sparsity · n) weights (= round((1 − sparsity) · n) except at
    exact halves, where it matches `MagnitudePruner.prune_to`, so both methods prune the same count). Only
    weights kept by `current_masks` are candidates, so masks are nested and no pruned weight comes back; the
    target shares S_{l,g} are computed over those candidates. Each greedy step keeps
    chunk = max(1, round(chunk_fraction · K)) weights (chunk_fraction=0 gives the exact greedy).

    On an accelerator the layers are selected together (`greedy_select_layers`), in batches of at most
    `max_batch_values` importance values (groups × weights), so that a round costs about a thousand steps of a
    few kernel launches each, not a thousand per layer, each reading values back to the host. By default a
    batch may use a quarter of the GPU memory free when selection starts (at 12 bytes per value, see
    `greedy_select_layers`), or 2**28 values elsewhere. On the CPU, where reading back is free and gathers from
    large tensors are not, one layer at a time (`greedy_select`). Both give the same masks.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"fairgrape_masks: sparsity must be in [0, 1), got {sparsity}.")
    if chunk_fraction < 0:
        raise ValueError(f"fairgrape_masks: chunk_fraction must be >= 0 (0 = exact greedy), got {chunk_fraction}.")
    if set(importance) != set(current_masks):
        raise ValueError(
            f"fairgrape_masks: importance is for {sorted(importance)}, current_masks for {sorted(current_masks)}; "
            "score the same parameters the pruner masks."
        )
    selected = {}  # name -> (candidates, [G, m] importance of the candidates, keep)
    for name, scores in importance.items():
        current = current_masks[name]
        if scores[0].numel() != current.numel():
            raise ValueError(
                f"fairgrape_masks: {name!r} has importance for {scores[0].numel()} weights but a mask of "
                f"{current.numel()}; importance must be [groups, *weight.shape]."
            )
        candidates = current.to(scores.device, torch.bool).flatten().nonzero().flatten()
        keep = current.numel() - round(sparsity * current.numel())
        if keep > candidates.numel():
            raise ValueError(
                f"fairgrape_masks: {name!r} keeps {candidates.numel()} weights already, fewer than the {keep} "
                f"that sparsity {sparsity} asks for; pruned weights never come back, so ask for a sparsity at "
                "least the current one."
            )
        layer = scores.reshape(scores.shape[0], -1)
        if candidates.numel() < current.numel():  # else every weight is a candidate: no copy
            layer = layer[:, candidates]
        selected[name] = (candidates, layer.float(), keep)
    if max_batch_values is None:
        max_batch_values = _default_batch_values(next(iter(selected.values()))[1].device)
    batches, batch, values = [], [], 0
    for name, (_, layer, _) in selected.items():
        if batch and values + layer.numel() > max_batch_values:
            batches.append(batch)
            batch, values = [], 0
        batch.append(name)
        values += layer.numel()
    batches.append(batch)
    if all(layer.device.type == "cpu" for _, layer, _ in selected.values()):
        batches = [[name] for name in selected]  # one layer at a time, with greedy_select
    masks = {}
    for names in batches:
        layers = [selected[name][1] for name in names]
        keeps = [selected[name][2] for name in names]
        chunks = [max(1, round(chunk_fraction * keep)) for keep in keeps]
        shares = [_shares(layer) for layer in layers]
        if layers[0].device.type == "cpu":
            chosen = [greedy_select(layers[0], keeps[0], shares[0], chunk=chunks[0])]
        else:
            chosen = greedy_select_layers(layers, keeps, shares, chunks)
        for name, kept in zip(names, chosen):
            candidates, current = selected[name][0], current_masks[name]
            mask = torch.zeros(current.numel(), dtype=torch.bool, device=candidates.device)
            mask[candidates[kept]] = True
            masks[name] = mask.view(current.shape).to(current.device)
    return masks


def _default_batch_values(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(2**20, free // 4 // 12)
    return 2**28


def geometric_sparsities(target_sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each of `rounds` rounds that each keep the same fraction q of the surviving weights.

    With density d_T = 1 − target_sparsity and q = d_T^(1/rounds), round r (1-based) ends at sparsity
    s_r = 1 − q^r = 1 − d_T^(r/rounds); the last value is exactly `target_sparsity`.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"geometric_sparsities: target_sparsity must be in [0, 1), got {target_sparsity}.")
    if rounds < 1:
        raise ValueError(f"geometric_sparsities: rounds must be >= 1, got {rounds}.")
    density = 1.0 - target_sparsity
    return [1.0 - density ** (r / rounds) for r in range(1, rounds)] + [target_sparsity]


def disparity_std(
    dense_group_acc: Sequence[float] | torch.Tensor, sparse_group_acc: Sequence[float] | torch.Tensor
) -> float:
    """FairGRAPE's disparity metric: the standard deviation over groups of the accuracy change.

    With Δ_g = Acc_dense(g) − Acc_sparse(g) for the G groups and Δ̄ their mean,
    std = sqrt(Σ_g (Δ_g − Δ̄)² / G), the population standard deviation (the sign convention of Δ does not
    matter).
    """
    dense = torch.as_tensor(dense_group_acc, dtype=torch.float64).flatten()
    sparse = torch.as_tensor(sparse_group_acc, dtype=torch.float64).flatten()
    if dense.numel() != sparse.numel() or dense.numel() == 0:
        raise ValueError(
            f"disparity_std: need the same non-zero number of groups, got {dense.numel()} dense and "
            f"{sparse.numel()} sparse accuracies."
        )
    change = dense - sparse
    return math.sqrt(float(((change - change.mean()) ** 2).mean()))
