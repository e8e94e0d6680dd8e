"""`evaluate` metric: the excess accuracy gap of every group between a dense and a sparse (pruned) model.

Load it offline by path:

    import evaluate, hf_ceag
    metric = evaluate.load(hf_ceag.EXCESS_ACCURACY_GAP_METRIC)

Give the sparse model's `predictions`, the `references`, each row's `groups`, and either the dense model's
`dense_predictions` on the same rows or its per-group accuracies `dense_group_accuracies` ({group: accuracy}).
The figures are those of hf_ceag's report (ψ_g = (dense_g − sparse_g) − (dense − sparse)).
"""

import datasets
import evaluate
import torch

from hf_ceag.audit.report import split_report
from hf_ceag.constraints.gaps import excess_gaps

_DESCRIPTION = "Excess accuracy gap ψ_g of every group between a dense and a pruned model (CEAG, ICLR 2024)."
_CITATION = """@inproceedings{hashemizadeh2024balancing,
  title={Balancing Act: Constraining Disparate Impact in Sparse Models},
  author={Hashemizadeh, Meraj and Ramirez, Juan and Sukumaran, Rohan and Farnadi, Golnoosh and
          Lacoste-Julien, Simon and Gallego-Posada, Jose},
  booktitle={ICLR}, year={2024}}"""
_KWARGS = """
Args:
    predictions (list of int): the sparse model's predicted classes.
    references (list of int): the true classes.
    groups (list of str or int): each row's group.
    dense_predictions (list of int, optional): the dense model's predicted classes on the same rows.
    dense_group_accuracies (dict, optional): the dense model's accuracy per group on these rows.
    tolerance (float): ε, default 0.01.
Returns:
    accuracy, accuracy_dense, max_excess_gap, satisfied, and per group: excess_gap, accuracy, n.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExcessAccuracyGap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "groups": datasets.Value("string"),
                }
            ),
        )

    def _compute(
        self, predictions, references, groups, dense_predictions=None, dense_group_accuracies=None, tolerance=0.01
    ):
        if (dense_predictions is None) == (dense_group_accuracies is None):
            raise ValueError(
                "excess_accuracy_gap: give exactly one of dense_predictions or dense_group_accuracies."
            )
        names = sorted(set(groups))
        ids = torch.tensor([names.index(g) for g in groups])
        sparse_correct = torch.tensor(predictions) == torch.tensor(references)
        if dense_predictions is not None:
            dense_correct = torch.tensor(dense_predictions) == torch.tensor(references)
            data = split_report(
                ids, dense_correct, sparse_correct, names, tolerance, min_samples=1, bootstrap_samples=0
            )
            per_group = {g["name"]: g for g in data["groups"]}
            return {
                "accuracy": data["accuracy_sparse"],
                "accuracy_dense": data["accuracy_dense"],
                "max_excess_gap": data["max_excess_gap"],
                "satisfied": data["satisfied"],
                "excess_gap": {name: per_group[name]["excess_gap"] for name in names},
                "accuracy_per_group": {name: per_group[name]["accuracy_sparse"] for name in names},
                "n": {name: per_group[name]["n"] for name in names},
            }
        missing = [n for n in names if str(n) not in {str(k) for k in dense_group_accuracies}]
        if missing:
            raise ValueError(f"excess_accuracy_gap: dense_group_accuracies lacks group(s) {missing}.")
        dense_by_name = {str(k): float(v) for k, v in dense_group_accuracies.items()}
        counts = torch.bincount(ids, minlength=len(names)).double()
        sparse_group = (
            torch.zeros(len(names), dtype=torch.float64).index_add(0, ids, sparse_correct.double()) / counts
        )
        dense_group = torch.tensor([dense_by_name[str(n)] for n in names], dtype=torch.float64)
        dense_overall = (dense_group * counts).sum() / counts.sum()
        sparse_overall = sparse_correct.double().mean()
        psi = excess_gaps(dense_group, sparse_group, dense_overall, sparse_overall)
        return {
            "accuracy": float(sparse_overall),
            "accuracy_dense": float(dense_overall),
            "max_excess_gap": float(psi.max()),
            "satisfied": bool(psi.max() <= tolerance),
            "excess_gap": dict(zip(names, psi.tolist())),
            "accuracy_per_group": dict(zip(names, sparse_group.tolist())),
            "n": dict(zip(names, counts.long().tolist())),
        }
