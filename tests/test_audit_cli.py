"""`scripts/audit.py` on two saved folders: it writes the report, plot and card and nothing else, and prints no
setting it does not know."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import audit


def test_the_audit_leaves_only_its_outputs_and_prints_no_unknown_target(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)  # fmt: skip
    for name in ("dense", "sparse"):
        ViTForImageClassification(config).save_pretrained(tmp_path / name)
    out = tmp_path / "audit"
    report = audit.main(
        ["--dense_model", str(tmp_path / "dense"), "--sparse_model", str(tmp_path / "sparse"), "--output_dir",
         str(out), "--digits_variant", "balanced", "--batch_size", "512"]
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "excess_gaps.png", "report.json"]
    header = capsys.readouterr().out.split("method=audit", 1)[1].splitlines()[0]
    assert report["target_sparsity"] is None and "target_sparsity" not in header and "None" not in header
    assert f"sparsity={report['sparsity']:.4f}" in header
