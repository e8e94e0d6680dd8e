import math

import pytest
import torch

from hf_ceag import excess_gaps, split_report
from hf_ceag.constraints.gaps import buffer_excess_gaps


def test_excess_gap_by_hand():
    # dense: group accuracies 0.9, 0.8; overall 0.85. sparse: 0.88, 0.6; overall 0.74.
    psi = excess_gaps(torch.tensor([0.9, 0.8]), torch.tensor([0.88, 0.6]), torch.tensor(0.85), torch.tensor(0.74))
    # Δ = 0.11; Δ_0 = 0.02 → ψ_0 = -0.09; Δ_1 = 0.2 → ψ_1 = 0.09
    torch.testing.assert_close(psi, torch.tensor([-0.09, 0.09]))


def test_buffer_gaps_weight_observed_groups_by_training_share():
    dense = torch.tensor([1.0, 0.5, 0.9])
    sparse = torch.tensor([0.8, 0.5, 0.0])
    weights = torch.tensor([0.75, 0.25, 0.0])
    observed = torch.tensor([True, True, False])
    psi = buffer_excess_gaps(dense, sparse, weights, observed)
    dense_all, sparse_all = 0.75 * 1.0 + 0.25 * 0.5, 0.75 * 0.8 + 0.25 * 0.5
    expected = [(1.0 - 0.8) - (dense_all - sparse_all), (0.5 - 0.5) - (dense_all - sparse_all), 0.0]
    torch.testing.assert_close(psi, torch.tensor(expected))


def test_split_report_against_naive_count():
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 4, (300,), generator=gen)
    dense = torch.rand(300, generator=gen) < 0.9
    sparse = torch.rand(300, generator=gen) < 0.8
    names = ["a", "b", "c", "d", "unseen"]
    report = split_report(groups, dense, sparse, names, tolerance=0.01, num_constrained_groups=4)
    overall_d = sum(dense.tolist()) / 300
    overall_s = sum(sparse.tolist()) / 300
    worst = -math.inf
    for g, entry in enumerate(report["groups"]):
        rows = [i for i in range(300) if groups[i] == g]
        acc_d = sum(bool(dense[i]) for i in rows) / len(rows)
        acc_s = sum(bool(sparse[i]) for i in rows) / len(rows)
        assert entry["name"] == names[g] and entry["n"] == len(rows)
        assert entry["accuracy_dense"] == pytest.approx(acc_d)
        assert entry["accuracy_sparse"] == pytest.approx(acc_s)
        assert entry["excess_gap"] == pytest.approx((acc_d - acc_s) - (overall_d - overall_s))
        worst = max(worst, entry["excess_gap"])
    assert len(report["groups"]) == 4  # group "unseen" has no rows in this split
    assert report["max_excess_gap"] == pytest.approx(worst)
    assert report["satisfied"] == (worst <= 0.01)


def test_a_split_with_no_judged_group_saves_valid_json_and_a_card_without_nan(tmp_path):
    """A figure that does not exist (NaN, e.g. of a split without rows) is saved as null in report.json (bare NaN
    is not JSON), and the card's model-index leaves it out rather than write `.nan`."""
    import json

    import yaml

    from hf_ceag import save_report
    from hf_ceag.audit.model_card import build_model_card
    from hf_ceag.audit.report import build_report

    groups = torch.tensor([0, 0, 1, 1, 1])
    correct = torch.tensor([True, False, True, True, False])
    split = split_report(groups, correct, correct, ["a", "b"], tolerance=0.01, min_samples=10)
    # the headline covers groups too small to judge: it exists, with the group it comes from and its flag
    assert split["judged_groups"] == 0 and split["max_excess_gap"] == 0.0
    assert split["max_excess_gap_status"] == "too few samples"
    split.update(max_excess_gap=float("nan"), excess_gap_spread=float("nan"))  # figures that do not exist
    report = build_report("ceag", 0.01, 0.5, 0.5, {"train": split})

    path = save_report(report, str(tmp_path))
    with open(path) as f:
        saved = json.load(f, parse_constant=lambda name: pytest.fail(f"report.json holds {name}"))
    assert saved["splits"]["train"]["max_excess_gap"] is None
    assert saved["splits"]["train"]["excess_gap_spread"] is None
    assert saved["splits"]["train"]["groups"][0]["accuracy_sparse"] == 0.5  # finite figures are kept

    card = build_model_card(report, model_name="m", repo_or_path="m", training={}).content
    metadata = yaml.safe_load(card.split("---")[1])  # the YAML front matter the Hub reads
    values = [m["value"] for entry in metadata["model-index"][0]["results"] for m in entry["metrics"]]
    assert values and all(math.isfinite(v) for v in values)
    names = [m["name"] for entry in metadata["model-index"][0]["results"] for m in entry["metrics"]]
    assert "accuracy (train)" in names and "max excess accuracy gap (train)" not in names


def test_a_constraint_margin_trains_below_tolerance_and_reports_at_tolerance(
    tiny_model, digits, make_config, tmp_path
):
    from hf_ceag import CEAGTrainer

    config = make_config(mitigation="ceag", constraint_margin=0.02, max_steps=6, pruning_end_epoch=0.05)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], eval_dataset=digits["test"])
    trainer.train()
    assert trainer.problem.tolerance == pytest.approx(0.01 - 0.02)
    report = trainer.group_report()
    assert report["tolerance"] == 0.01 and report["constraint_margin"] == 0.02
    for split in report["splits"].values():
        assert split["satisfied"] == (split["max_excess_gap"] <= 0.01)
    trainer.save_model(str(tmp_path))  # the card says the model was trained below the tolerance it is judged at
    card = (tmp_path / "README.md").read_text()
    assert "| tolerance ε | 0.01 |\n| training margin δ | 0.02: trained at ε − δ = -0.01, judged at ε |" in card
