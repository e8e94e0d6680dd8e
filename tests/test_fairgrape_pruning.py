"""FairGRAPE as a pruning method of CEAGTrainer and run_ceag.py (the algorithm is tested in test_fairgrape.py)."""

import itertools
import json

import pytest

from hf_ceag import CEAGConfig, CEAGTrainer
from hf_ceag.pruning.schedule import fairgrape_round_steps

run_ceag = pytest.importorskip("scripts.run_ceag")


def test_round_steps_and_config_rules(tmp_path):
    assert fairgrape_round_steps(0, 10, 3) == [0, 5, 10]
    assert fairgrape_round_steps(4, 4, 1) == [4]
    with pytest.raises(ValueError, match="pruning_method='fairgrape' runs with mitigation='none'"):
        CEAGConfig(output_dir=str(tmp_path), report_to="none", pruning_method="fairgrape", mitigation="ceag")
    with pytest.raises(ValueError, match="fairgrape_rounds=0"):
        CEAGConfig(output_dir=str(tmp_path), report_to="none", mitigation="none", fairgrape_rounds=0)


def test_trainer_prunes_in_nested_fairgrape_rounds(tiny_model, digits, make_config, monkeypatch):
    config = make_config(
        mitigation="none", pruning_method="fairgrape", fairgrape_rounds=3, fairgrape_calibration_batches=2,
        target_sparsity=0.875, pruning_end_epoch=0.2, max_steps=10,
    )  # fmt: skip
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], eval_dataset={"test": digits["test"]})
    seen = []
    original = trainer.pruner.load_state_dict

    def record(masks):
        seen.append({k: m.clone() for k, m in masks.items()})
        original(masks)

    monkeypatch.setattr(trainer.pruner, "load_state_dict", record)
    trainer.train()
    assert len(seen) == 3
    for earlier, later in itertools.pairwise(seen):
        assert all(not (later[k] & ~earlier[k]).any() for k in earlier)  # nested
    for name, p in trainer.pruner.parameters.items():
        assert int((p == 0).sum()) == p.numel() - (p.numel() - round(0.875 * p.numel())), name
    report = trainer.group_report()
    assert report["method"] == "fairgrape" and report["pruning_seconds"] > 0
    assert "accuracy_change_std" in report["splits"]["test"]


def test_cli_pruning_method_fairgrape(tmp_path):
    reports = run_ceag.main(
        [
            "--output_dir", str(tmp_path), "--pruning_method", "fairgrape", "--dense_epochs", "1", "--allow_weak_dense_model", "true",
            "--num_train_epochs", "2", "--pruning_end_epoch", "1", "--fairgrape_calibration_batches", "2",
            "--digits_variant", "imbalanced", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert list(reports) == ["fairgrape"]
    saved = json.loads((tmp_path / "fairgrape" / "report.json").read_text())
    assert saved["method"] == "fairgrape" and set(saved["splits"]) == {"train", "test"}
    assert (tmp_path / "fairgrape" / "README.md").exists()
