"""The README's first command, in-process: the default pipeline (dense training, NFT, CEAG, reports, cards,
audit, dense reuse) end to end. Fast settings here; whether the default *recipe* meets its claims is measured
over seeds and thread counts by `scripts/benchmark.py` (BENCHMARKS.md, part 0), never asserted from one run."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

run_ceag = pytest.importorskip("scripts.run_ceag")

FAST = ["--digits_variant", "imbalanced", "--dense_epochs", "4", "--num_train_epochs", "3", "--pruning_end_epoch", "1",
        "--buffer_size", "8", "--disable_tqdm", "true"]  # fmt: skip


def test_default_pipeline_writes_reports_cards_and_an_audit_that_agree(tmp_path, capsys, check_pipeline):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, not only the first of each place
        reports = run_ceag.main(["--output_dir", str(out), *FAST])
    printed = capsys.readouterr().out
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # the CLI sets what the machine needs
    nft, ceag = reports["nft"], reports["ceag"]
    for report in (nft, ceag):  # invariants of every run, whatever the float outcome
        for split in ("train", "test"):
            data = report["splits"][split]
            psi = [g["excess_gap"] for g in data["groups"]]
            assert data["max_excess_gap"] == pytest.approx(max(psi))
            weights = [g["n"] for g in data["groups"]]
            assert sum(w * p for w, p in zip(weights, psi)) == pytest.approx(0.0, abs=1e-9)  # ψ_g average to 0
        assert report["splits"]["train"]["accuracy_dense"] == nft["splits"]["train"]["accuracy_dense"]

    for name in ("dense", "nft", "ceag"):
        assert (out / name / "model.safetensors").exists()
    for name in ("nft", "ceag"):
        saved = json.loads((out / name / "report.json").read_text())
        for key in ("method", "tolerance", "target_sparsity", "sparsity", "splits"):
            assert key in saved
        assert saved["sparsity"] == pytest.approx(saved["target_sparsity"], abs=1e-3)
        for split in ("train", "test"):
            data = saved["splits"][split]
            for key in ("accuracy_dense", "accuracy_sparse", "max_excess_gap", "groups"):
                assert key in data
            assert {"name", "n", "accuracy_dense", "accuracy_sparse", "excess_gap"} <= set(data["groups"][0])
    assert "Summary" in printed and "max <= eps" in printed
    for name, report in reports.items():  # the summary counts each split's groups by status, as the report does
        for split, data in report["splits"].items():
            counted = data["satisfied_groups"] + data["inconclusive_groups"] + data["violated_groups"]
            assert counted == data["judged_groups"] and data["status_basis"] == "95% bootstrap interval"
            assert (
                f"{split} {data['max_excess_gap']:+.4f} ({'within' if data['satisfied'] else 'OVER'}; "
                f"{data['satisfied_groups']} satisfied, {data['inconclusive_groups']} inconclusive, "
                f"{data['violated_groups']} violated of {data['judged_groups']})"
            ) in printed, (name, split)

    # the card a person reads on the Hub, and an audit from the folders alone giving the same report
    card = (out / "ceag" / "README.md").read_text()
    assert "## Verdict" in card and "10 judged groups" in card
    assert str(tmp_path) not in card and "pruned from a dense model (local folder `dense`)" in card
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import audit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audited = audit.main(
            [
                "--dense_model",
                str(out / "dense"),
                "--sparse_model",
                str(out / "ceag"),
                "--output_dir",
                str(tmp_path / "a"),
                "--digits_variant",
                "imbalanced",
            ]
        )
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # it used to warn at each of 4 passes
    trained = json.loads((out / "ceag" / "report.json").read_text())
    assert audited["splits"] == trained["splits"]
    # one sparsity, one definition: the audit counts the layers the trainer pruned
    assert audited["sparsity"] == pytest.approx(trained["sparsity"], abs=1e-12)
    assert audited["sparsity_definition"] == trained["sparsity_definition"]
    assert audited["sparsity_all_conv_linear"] < audited["sparsity"]  # the first and last layers are dense

    # transformers' pipeline gives each folder's own predictions on grayscale PIL images and image files (8-bit:
    # pixel values within one grey level of the float digits); it used to crash on both, since pipeline converts
    # them to RGB (the 1-channel models are saved to take RGB: models/rgb_input.py)
    from PIL import Image
    from sklearn.datasets import load_digits

    from hf_ceag.data.images import digits_pixel_values

    digits = load_digits().images[:100]
    images = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L") for image in digits]
    for i in range(0, 100, 10):  # every tenth one as a file
        images[i].save(tmp_path / f"digit{i}.png")
        images[i] = str(tmp_path / f"digit{i}.png")
    for name in ("dense", "ceag"):
        check_pipeline(out / name, images, digits_pixel_values(digits, 16), atol=0.02)

    # a second run reuses the dense model; one that asks for other data or another model is refused, and the
    # dense folder is left as it was
    run_ceag.main(["--output_dir", str(out), *FAST, "--methods", "none", "--num_train_epochs", "2"])
    assert "Reusing the dense model" in capsys.readouterr().out
    weights = (out / "dense" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="image_size"):
        run_ceag.main(["--output_dir", str(out), *FAST, "--image_size", "8", "--methods", "none"])
    with pytest.raises(ValueError, match="digits_variant"):
        run_ceag.main(["--output_dir", str(out), *FAST, "--digits_variant", "balanced", "--methods", "none"])
    assert (out / "dense" / "model.safetensors").read_bytes() == weights


def test_the_default_data_runs_through_the_cli_with_large_groups(tmp_path):
    """The embedded default itself (styled digits), in miniature: every training group has >= 200 rows."""
    out = tmp_path / "styled"
    reports = run_ceag.main(
        ["--output_dir", str(out), "--dense_epochs", "1", "--num_train_epochs", "1", "--pruning_end_epoch", "0.5",
         "--methods", "ceag", "--disable_tqdm", "true"]
    )  # fmt: skip
    groups = reports["ceag"]["splits"]["train"]["groups"]
    assert [g["name"] for g in groups] == ["plain", "inverted"]
    assert min(g["n"] for g in groups) >= 200
    assert reports["ceag"]["sparsity"] == pytest.approx(run_ceag.RECIPE_DEFAULTS["target_sparsity"], abs=1e-3)
    made = json.loads((out / "dense" / run_ceag.DENSE_RECORD).read_text())
    assert made["digits_variant"] == "styled" and made["seed"] == 0


def test_choosing_the_checkpoint_on_a_validation_split_from_the_cli(tmp_path):
    """`--validation_split` keeps a share of each group's training rows out of the pruning run; the checkpoint is
    chosen on them, at the final sparsity, and the test split takes no part."""
    out = tmp_path / "chosen"
    reports = run_ceag.main(
        ["--output_dir", str(out), *FAST, "--methods", "ceag", "--validation_split", "0.25", "--eval_strategy", "epoch",
         "--save_strategy", "epoch", "--load_best_model_at_end", "true", "--metric_for_best_model",
         "validation_max_excess_gap", "--greater_is_better", "false", "--target_sparsity", "0.5"]
    )  # fmt: skip
    report = reports["ceag"]
    assert list(report["splits"]) == ["train", "validation", "test"]
    from hf_ceag import load_digits_dataset

    train = load_digits_dataset(image_size=16, seed=0, rare_groups=(3, 8))["train"]
    for g in range(10):  # every training row is on exactly one side, each group's split 75 / 25
        rows = sum(1 for x in train["group"] if x == g)
        n = {split: report["splits"][split]["groups"][g]["n"] for split in ("train", "validation")}
        assert n["train"] + n["validation"] == rows and n["validation"] == round(0.25 * rows)
    # the Trainer's record of each evaluation (in the last checkpoint): the best validation max ψ_g within
    # max_accuracy_drop (pruning ends with the first epoch, the first evaluation) is the checkpoint loaded
    last = max(out.glob("ceag/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    evals = {h["step"]: h for h in history if "eval_validation_max_excess_gap" in h}
    assert len(evals) == 3 and "from step 0 to " + str(min(evals)) in (out / "ceag" / "README.md").read_text()
    allowed = [s for s, h in evals.items() if h["eval_validation_accuracy_drop"] <= 0.1]
    expected = min(allowed, key=lambda s: (evals[s]["eval_validation_max_excess_gap"], s))
    selected = report["selected_checkpoint"]
    assert (selected["step"], selected["split"]) == (expected, "validation")
    # the audit of the loaded weights gives the figure the checkpoint was chosen for
    assert report["splits"]["validation"]["max_excess_gap"] == pytest.approx(
        evals[expected]["eval_validation_max_excess_gap"], abs=1e-9
    )
