"""The excess accuracy gap ψ_g, the one formula the trainer, the logs and the reports share.

Δ_g = Acc_dense(g) − Acc_sparse(g)      accuracy lost by group g
Δ   = Acc_dense    − Acc_sparse         accuracy lost overall
ψ_g = Δ_g − Δ                           excess accuracy gap of group g (DESIGN §2)
"""

from __future__ import annotations

import torch


def excess_gaps(
    dense_group: torch.Tensor,
    sparse_group: torch.Tensor,
    dense_overall: torch.Tensor,
    sparse_overall: torch.Tensor,
) -> torch.Tensor:
    """ψ_g = (dense_group − sparse_group) − (dense_overall − sparse_overall), elementwise over groups."""
    return (dense_group - sparse_group) - (dense_overall - sparse_overall)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_g w_g v_g / Σ_g w_g over the groups where `mask` is true (all groups if `mask` is None)."""
    if mask is not None:
        weights = weights * mask
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def buffer_excess_gaps(
    dense_group_accuracy: torch.Tensor,
    sparse_group_accuracy: torch.Tensor,
    group_weights: torch.Tensor,
    observed: torch.Tensor,
) -> torch.Tensor:
    """ψ̂_g from per-group accuracy estimates, for the groups in `observed` (others get 0).

    The overall accuracies are the training-share-weighted means over the observed groups, for the dense
    and the sparse model alike, so that Δ compares the same population as the Δ_g: Δ is then the weighted mean
    of the Δ_g, computed as such (one mean rather than two; this runs every training step).
    """
    lost = dense_group_accuracy - sparse_group_accuracy  # Δ_g
    psi = lost - weighted_mean(lost, group_weights, observed)
    return torch.where(observed, psi, 0.0)
