"""`load_best_model_at_end` with `CEAGTrainer`: only checkpoints at the final sparsity, with their accuracy drop
within `max_accuracy_drop`, can be the best model; the report and the card say which checkpoint was loaded."""

import json
import warnings

import pytest

from hf_ceag.model_selection import not_a_candidate, selection_split


def test_not_a_candidate_by_hand():
    fine = {"eval_loss": 0.3, "eval_accuracy_drop": 0.02, "eval_accuracy/a_accuracy_drop": 0.9}
    one = ["eval"]  # a single eval dataset
    assert (
        not_a_candidate(10, 10, fine, "loss", one, 0.1) == ""
    )  # the step pruning ends at is at the final sparsity
    assert not_a_candidate(10, None, fine, "eval_loss", one, 0.1) == ""  # no schedule: nothing to wait for
    assert "pruning ends at step 11" in not_a_candidate(10, 11, fine, "loss", one, 0.1)
    assert "eval_accuracy_drop = 0.0200 > max_accuracy_drop = 0.01" in not_a_candidate(
        10, 10, fine, "loss", one, 0.01
    )
    # several eval splits: only the drop of the split the metric is measured on counts (never the test split's)
    two = {"eval_val_accuracy_drop": 0.02, "eval_test_accuracy_drop": 0.05, "eval_val_b_accuracy_drop": 0.3}
    splits = ["val", "test", "val_b"]
    assert not_a_candidate(20, 10, two, "val_max_excess_gap", splits, 0.04) == ""
    why = not_a_candidate(20, 10, two, "eval_test_max_excess_gap", splits, 0.04)
    assert "eval_test_accuracy_drop = 0.0500 > max_accuracy_drop = 0.04" in why
    assert "eval_val_b_accuracy_drop = 0.3000" in not_a_candidate(20, 10, two, "val_b_loss", splits, 0.04)
    # the audited split a metric is measured on: the longest name that prefixes it
    assert selection_split("eval_step_metric", ["train", "eval"]) == "eval"
    assert selection_split("eval_val_b_loss", ["train", "val", "val_b", "test"]) == "val_b"
    assert selection_split("eval_val_loss", ["train", "val", "val_b", "test"]) == "val"
    assert selection_split("eval_other_loss", ["train", "val"]) is None


def _run(make_config, digits, tiny_model, output_dir, **overrides):
    """A 24-step run that evaluates and saves every 4 steps (pruning ends at step 8), selecting on `step_metric`:
    minus the step, so that the Trainer's own rule would pick the latest checkpoint, or the step itself (with
    `earliest`), so that it would pick the first one, taken mid-pruning."""
    from hf_ceag import CEAGTrainer

    earliest = overrides.pop("earliest", False)
    config = make_config(
        output_dir=str(output_dir), max_steps=24, eval_strategy="steps", eval_steps=4, save_strategy="steps",
        save_steps=4, load_best_model_at_end=True, metric_for_best_model="step_metric", greater_is_better=False,
        **overrides,
    )  # fmt: skip
    holder = {}

    def step_metric(prediction):
        step = holder["trainer"].state.global_step
        return {"step_metric": float(step if earliest else -step)}

    trainer = CEAGTrainer(
        tiny_model, config, train_dataset=digits["train"], eval_dataset=digits["test"], compute_metrics=step_metric
    )
    holder["trainer"] = trainer
    trainer.train()
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_step_metric" in h}
    return trainer, evals


def test_a_checkpoint_taken_while_pruning_is_never_loaded(make_config, digits, tiny_model, tmp_path):
    trainer, evals = _run(make_config, digits, tiny_model, tmp_path / "early", earliest=True)
    end, args = trainer.schedule.end, trainer.args
    assert min(evals) < end <= max(evals)  # the Trainer's own rule would pick a checkpoint from before the end
    # independently: the smallest step_metric among the checkpoints at or after the end, within the accuracy floor
    allowed = [s for s, h in evals.items() if s >= end and h["eval_accuracy_drop"] <= args.max_accuracy_drop]
    assert allowed
    expected = min(allowed, key=lambda s: evals[s]["eval_step_metric"])
    assert trainer.state.best_global_step == expected >= end
    assert trainer.pruner.sparsity() == pytest.approx(args.target_sparsity, abs=1e-3)
    trainer.save_model(str(tmp_path / "final"))
    report = json.loads((tmp_path / "final" / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(args.target_sparsity, abs=1e-3)
    selected = report["selected_checkpoint"]
    assert selected["checkpoint"] == f"checkpoint-{expected}" and selected["step"] == expected
    assert selected["metric"] == "eval_step_metric" and selected["value"] == evals[expected]["eval_step_metric"]
    assert "chosen for its eval_step_metric on these rows" in report["split_rows"]["eval"]
    card = (tmp_path / "final" / "README.md").read_text()
    assert (
        f"| selected checkpoint | checkpoint-{expected} (step {expected} of 24): the best eval_step_metric" in card
    )


def test_the_accuracy_floor_rules_out_checkpoints(make_config, digits, tiny_model, tmp_path):
    # a first run shows each checkpoint's accuracy drop; a floor just under the last one's rules it out
    from transformers import set_seed

    from hf_ceag import build_classifier

    trainer, evals = _run(make_config, digits, tiny_model, tmp_path / "free", max_accuracy_drop=1.0)
    end = trainer.schedule.end
    assert trainer.state.best_global_step == 24  # the latest, as the Trainer's own rule says
    drops = {s: h["eval_accuracy_drop"] for s, h in evals.items() if s >= end}
    for h in evals.values():  # the metric is the dense accuracy minus the sparse one on the same rows
        dense = trainer.dense_correct["eval"].double().mean().item()
        assert h["eval_accuracy_drop"] == pytest.approx(dense - h["eval_accuracy"], abs=1e-9)
    floor = drops[24] - 1e-6
    allowed = [s for s, d in drops.items() if d <= floor]
    set_seed(0)
    again = build_classifier("test_resnet", num_labels=10, channels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, evals2 = _run(make_config, digits, again, tmp_path / "floor", max_accuracy_drop=max(floor, 0.0))
    assert {s: h["eval_accuracy_drop"] for s, h in evals2.items() if s >= end} == pytest.approx(drops)  # same run
    if allowed and floor >= 0:
        assert trainer.state.best_global_step == max(allowed) < 24
    else:  # nothing qualified: the last step's model stays, and the user is told
        assert trainer.state.best_model_checkpoint is None
        assert any("no checkpoint could be the best model" in str(w.message) for w in caught)


def test_selecting_on_a_validation_split_carved_from_the_training_rows(make_config, digits, tiny_model, tmp_path):
    # the pattern the docs give: a group-stratified validation split for selection, the test split left alone
    from hf_ceag import CEAGTrainer

    carved = digits["train"].train_test_split(test_size=0.2, stratify_by_column="group", seed=0)
    config = make_config(
        output_dir=str(tmp_path / "out"), max_steps=24, eval_strategy="steps", eval_steps=4, save_strategy="steps",
        save_steps=4, load_best_model_at_end=True, metric_for_best_model="validation_max_excess_gap",
        greater_is_better=False, max_accuracy_drop=0.5,
    )  # fmt: skip
    eval_splits = {"validation": carved["test"], "test": digits["test"]}
    trainer = CEAGTrainer(tiny_model, config, train_dataset=carved["train"], eval_dataset=eval_splits)
    trainer.train()
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_validation_max_excess_gap" in h}
    end = trainer.schedule.end
    allowed = [s for s, h in evals.items() if s >= end and h["eval_validation_accuracy_drop"] <= 0.5]
    expected = min(allowed, key=lambda s: (evals[s]["eval_validation_max_excess_gap"], s))  # the first of ties
    assert trainer.state.best_global_step == expected
    trainer.save_model(str(tmp_path / "final"))
    report = json.loads((tmp_path / "final" / "report.json").read_text())
    assert report["selected_checkpoint"]["split"] == "validation"
    assert "chosen for its eval_validation_max_excess_gap on these rows" in report["split_rows"]["validation"]
    assert report["split_rows"]["test"] == "evaluation rows, never trained on"
    assert report["splits"]["validation"]["groups"][0]["n"] + report["splits"]["train"]["groups"][0]["n"] == sum(
        1 for g in digits["train"]["group"] if g == 0
    )


def test_a_metric_no_split_reports_is_refused_before_training(make_config, digits, tiny_model, tmp_path):
    from hf_ceag import CEAGTrainer

    config = make_config(
        output_dir=str(tmp_path / "out"),
        max_steps=24,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        load_best_model_at_end=True,
    )  # fmt: skip  (metric_for_best_model: the Trainer's default, "loss")
    evaluated = {"validation": digits["test"], "test": digits["test"]}
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], eval_dataset=evaluated)
    with pytest.raises(
        ValueError, match="metric_for_best_model='loss'.*e.g. metric_for_best_model='validation_max"
    ):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").glob("*"))  # nothing written yet
