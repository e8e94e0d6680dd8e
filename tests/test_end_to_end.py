"""The README's first command, in-process: the embedded default run (digits, imbalanced, fixed seed)."""

import json
import sys
from pathlib import Path

import pytest

run_ceag = pytest.importorskip("scripts.run_ceag")

SLACK = 0.005  # allowed excess over the tolerance for CEAG's training max gap


def test_default_run_ceag_holds_every_group_within_tolerance_where_nft_does_not(tmp_path, capsys):
    out = tmp_path / "run"
    reports = run_ceag.main(["--output_dir", str(out), "--disable_tqdm", "true"])
    printed = capsys.readouterr().out
    nft, ceag = reports["nft"], reports["ceag"]
    eps = ceag["tolerance"]

    assert nft["splits"]["train"]["max_excess_gap"] > eps
    assert ceag["splits"]["train"]["max_excess_gap"] <= eps + SLACK
    assert ceag["splits"]["test"]["accuracy_sparse"] >= nft["splits"]["test"]["accuracy_sparse"] - 0.02
    assert ceag["splits"]["train"]["accuracy_sparse"] >= nft["splits"]["train"]["accuracy_sparse"] - 0.02

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

    # the card a person reads on the Hub, and an audit from the folders alone giving the same report
    card = (out / "ceag" / "README.md").read_text()
    assert "## Verdict" in card and "train: every one of the 10 judged groups" in card
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import audit

    audited = audit.main(
        [
            "--dense_model",
            str(out / "dense"),
            "--sparse_model",
            str(out / "ceag"),
            "--output_dir",
            str(tmp_path / "a"),
        ]
    )
    assert audited["splits"] == json.loads((out / "ceag" / "report.json").read_text())["splits"]

    # a second run reuses the dense model
    run_ceag.main(
        ["--output_dir", str(out), "--disable_tqdm", "true", "--methods", "none", "--num_train_epochs", "4"]
    )
    assert "Reusing the dense model" in capsys.readouterr().out
