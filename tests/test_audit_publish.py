"""Report intervals and statuses, the evaluate metric, per-group eval logs, model card, the
push_to_hub gate, timm-loadable folders and scripts/audit.py."""

import copy
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import evaluate
import pytest
import torch
from huggingface_hub import ModelCard

import hf_ceag
from hf_ceag import CEAGTrainer, split_report
from hf_ceag.audit.model_card import build_model_card, violation_warning
from hf_ceag.audit.report import (
    INCONCLUSIVE,
    SATISFIED,
    STATUS_COLORS,
    TOO_FEW,
    UNCONSTRAINED,
    VIOLATED,
    bootstrap_gap_intervals,
    build_report,
    format_report,
    gap_status,
    report_markdown,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import audit


def test_wilson_interval_by_hand_and_coverage():
    lo, hi = wilson_interval(torch.tensor(8), torch.tensor(10))
    assert (float(lo), float(hi)) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook values
    torch.manual_seed(0)
    n, p = 50, 0.8
    hits = torch.distributions.Binomial(n, torch.full((4000,), p)).sample()
    lo, hi = wilson_interval(hits, torch.full((4000,), n))
    coverage = float(((lo <= p) & (p <= hi)).double().mean())
    assert 0.93 <= coverage <= 0.97, coverage


def naive_bootstrap_intervals(groups, dense, sparse, num_groups, rounds=1500, seed=0):
    """ψ_g's 95 % percentile interval by resampling rows one by one within each group: the ground truth for
    `bootstrap_gap_intervals`' binomial-chain draws."""
    rng = random.Random(seed)
    n = len(groups)
    rows = {g: [i for i in range(n) if groups[i] == g] for g in range(num_groups)}
    rows = {g: r for g, r in rows.items() if r}
    psis = []
    for _ in range(rounds):
        picks = {g: [rng.choice(r) for _ in r] for g, r in rows.items()}
        d = {g: sum(bool(dense[i]) for i in p) / len(p) for g, p in picks.items()}
        s = {g: sum(bool(sparse[i]) for i in p) / len(p) for g, p in picks.items()}
        all_d = sum(sum(bool(dense[i]) for i in p) for p in picks.values()) / n
        all_s = sum(sum(bool(sparse[i]) for i in p) for p in picks.values()) / n
        psis.append([(d[g] - s[g]) - (all_d - all_s) for g in rows])
    quantiles = torch.quantile(
        torch.tensor(psis, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0
    ).T
    return dict(zip(rows, quantiles.tolist()))


def test_bootstrap_interval_matches_a_naive_resampling_loop():
    gen = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 3, (240,), generator=gen)
    dense = torch.rand(240, generator=gen) < 0.9
    sparse = torch.rand(240, generator=gen) < 0.75
    fast = bootstrap_gap_intervals(groups, dense, sparse, 3, samples=4000, seed=0)
    naive = naive_bootstrap_intervals(groups, dense, sparse, 3)
    torch.testing.assert_close(
        fast, torch.tensor([naive[g] for g in range(3)], dtype=torch.float64), rtol=0, atol=0.02
    )


def test_statuses_spread_and_counts():
    groups = torch.tensor([0] * 40 + [1] * 40 + [2] * 5 + [3] * 30)
    dense = torch.ones(115, dtype=torch.bool)
    sparse = torch.ones(115, dtype=torch.bool)
    sparse[:20] = False  # group 0 loses 20/40 = 0.5: its whole ψ_g interval lies above ε
    report = split_report(groups, dense, sparse, ["a", "b", "tiny", "new"], 0.05, num_constrained_groups=3)
    status = {g["name"]: g["status"] for g in report["groups"]}
    assert status == {"a": VIOLATED, "b": "satisfied", "tiny": TOO_FEW, "new": UNCONSTRAINED}
    overall = 20 / 115
    assert report["max_excess_gap"] == pytest.approx(0.5 - overall)
    assert report["excess_gap_spread"] == pytest.approx((0.5 - overall) - (0 - overall))
    assert report["violated_groups"] == 1 and report["too_few_samples_groups"] == 1 and not report["satisfied"]
    assert (report["judged_groups"], report["satisfied_groups"], report["inconclusive_groups"]) == (2, 1, 0)


TOLERANCE = 0.1
# name: (rows, rows the sparse model gets wrong; the dense model gets every row right)
HAND_BUILT = {
    "clear": (200, 0),  # ψ_g ≈ -0.15: all of its interval below ε
    "bad": (100, 40),  # ψ_g ≈ +0.25: all of its interval above ε
    "under": (40, 9),  # ψ_g just under ε, but 40 rows: the interval straddles ε
    "over": (40, 11),  # ψ_g just over ε, the interval straddles ε too
    "tiny": (5, 5),  # below min_samples: not judged, whatever its ψ_g
    "new": (30, 0),  # unseen in training: not constrained
}


def hand_built_split(names=tuple(HAND_BUILT), bootstrap_samples=1000):
    ids, sparse = [], []
    for g, name in enumerate(names):
        rows, wrong = HAND_BUILT[name]
        ids += [g] * rows
        sparse += [False] * wrong + [True] * (rows - wrong)
    groups, sparse = torch.tensor(ids), torch.tensor(sparse)
    constrained = len(names) - ("new" in names)
    report = split_report(
        groups, torch.ones_like(sparse), sparse, list(names), TOLERANCE,
        num_constrained_groups=constrained, bootstrap_samples=bootstrap_samples,
    )  # fmt: skip
    return report, groups, sparse


def test_an_interval_straddling_eps_is_inconclusive_by_an_independent_bootstrap():
    report, groups, sparse = hand_built_split()
    by_name = {g["name"]: g for g in report["groups"]}
    assert {name: g["status"] for name, g in by_name.items()} == {
        "clear": SATISFIED, "bad": VIOLATED, "under": INCONCLUSIVE, "over": INCONCLUSIVE,
        "tiny": TOO_FEW, "new": UNCONSTRAINED,
    }  # fmt: skip
    # the point estimates alone would call "under" satisfied and "over" violated
    assert by_name["under"]["excess_gap"] < TOLERANCE < by_name["over"]["excess_gap"]
    assert TOLERANCE - 0.05 < by_name["under"]["excess_gap"] and by_name["over"]["excess_gap"] < TOLERANCE + 0.05
    counts = (
        "judged_groups",
        "satisfied_groups",
        "inconclusive_groups",
        "violated_groups",
        "groups_over_tolerance",
    )
    assert [report[k] for k in counts] == [4, 1, 2, 1, 3]  # over ε: "bad", "over" and the unjudged "tiny"
    assert report["status_basis"] == "95% bootstrap interval" and not report["satisfied"]
    # the headline leaves no group out: "tiny" (5 rows, all lost) is the max, shown with its flag
    assert (report["max_excess_gap_group"], report["max_excess_gap_status"]) == ("tiny", TOO_FEW)
    assert report["max_excess_gap"] == max(g["excess_gap"] for g in report["groups"])
    # the rule, on intervals drawn row by row: each judged group's naive interval lies on the side of ε its
    # status says, with a margin well beyond the two bootstraps' Monte Carlo error
    naive = naive_bootstrap_intervals(groups, torch.ones_like(sparse), sparse, len(HAND_BUILT))
    for g, name in enumerate(HAND_BUILT):
        low, high = naive[g]
        assert by_name[name]["excess_gap_ci"] == pytest.approx([low, high], abs=0.02), name
        if by_name[name]["status"] == SATISFIED:
            assert high < TOLERANCE - 0.05, name
        elif by_name[name]["status"] == VIOLATED:
            assert low > TOLERANCE + 0.05, name
        elif by_name[name]["status"] == INCONCLUSIVE:
            assert low < TOLERANCE - 0.05 and high > TOLERANCE + 0.05, name


def test_gap_status_endpoints_equal_to_eps_and_the_point_estimate_without_an_interval():
    assert gap_status(0.0, [-0.1, 0.1], 0.1) == SATISFIED  # ψ_g ≤ ε: an upper end at ε is within
    assert gap_status(0.2, [0.1, 0.3], 0.1) == INCONCLUSIVE  # a lower end at ε is not above it
    assert gap_status(0.1, [0.1, 0.1], 0.1) == SATISFIED
    assert gap_status(0.2, [0.1000001, 0.3], 0.1) == VIOLATED
    assert gap_status(0.05, [0.11, 0.2], 0.1) == VIOLATED  # the interval decides, not the point estimate
    assert gap_status(0.1, None, 0.1) == SATISFIED and gap_status(0.1000001, None, 0.1) == VIOLATED
    report, _, _ = hand_built_split(bootstrap_samples=0)  # no intervals (the evaluate metric, the logs)
    status = {g["name"]: g["status"] for g in report["groups"]}
    assert (status["under"], status["over"]) == (SATISFIED, VIOLATED)
    assert report["status_basis"] == "point estimate" and report["inconclusive_groups"] == 0


def test_verdict_markdown_terminal_and_card_count_inconclusive_groups_apart(tmp_path):
    train, _, _ = hand_built_split()
    report = build_report("ceag", TOLERANCE, 0.5, 0.5, {"train": train, "test": copy.deepcopy(train)})
    counts = "1 satisfied, 2 inconclusive, 1 violated of 4 judged groups"
    verdict = report["splits"]["train"]["verdict"]
    assert verdict.startswith(f"train: {counts}: 1 group(s) lost more than ε = 0.1")
    assert "95% bootstrap interval" in verdict and "1 group(s) have fewer than 20 samples" in verdict
    table = report_markdown(report, "train")
    assert re.search(r"^\| under \| 40 \| .* \| inconclusive \|$", table, flags=re.MULTILINE)
    assert table.splitlines()[-1].endswith(f"| {counts} |")
    terminal = format_report(report)
    assert re.search(r"^  under +40 .* inconclusive$", terminal, flags=re.MULTILINE)
    assert f"max <= eps: NO  {counts}" in terminal and verdict in terminal

    # publishing is gated as strictly as the point estimates say: a violated group, or an inconclusive one whose
    # point ψ_g is over ε, blocks it ("bad" and "over"); inconclusive ones within ε do not, and the card names them
    assert violation_warning(report).startswith("On its training data, 3 group(s) exceed the tolerance ε = 0.1")
    unsure, _, _ = hand_built_split(("clear", "under", "over", "tiny", "new"))
    unsure_report = build_report("ceag", TOLERANCE, 0.5, 0.5, {"train": unsure})
    assert unsure_report["splits"]["train"]["verdict"].startswith(
        "train: 1 satisfied, 2 inconclusive, 0 violated of 3 judged groups: no group is shown to lose more than ε"
    )
    assert violation_warning(unsure_report) is not None  # "over": inconclusive, but its point ψ_g is over ε
    within = copy.deepcopy(unsure_report)  # the same groups, none over ε by its point estimate
    within["splits"]["train"].update(groups_over_tolerance=0, violated_groups=0)
    assert violation_warning(within) is None
    card = build_model_card(within, model_name="m", repo_or_path="m", training={}).text
    flat = " ".join(card.split())
    assert "Warning" not in card
    assert "- Inconclusive on train: under, over." in card
    assert "**inconclusive** when it straddles ε. An inconclusive group is neither shown to be within ε" in flat
    assert "1 satisfied, 2 inconclusive, 0 violated of 3 judged groups" in card


def test_evaluate_metric_loads_offline_and_matches_the_report():
    gen = torch.Generator().manual_seed(2)
    groups = torch.randint(0, 4, (200,), generator=gen)
    labels = torch.randint(0, 3, (200,), generator=gen)
    dense_pred = torch.where(torch.rand(200, generator=gen) < 0.9, labels, (labels + 1) % 3)
    sparse_pred = torch.where(torch.rand(200, generator=gen) < 0.8, labels, (labels + 1) % 3)
    names = ["g0", "g1", "g2", "g3"]
    metric = evaluate.load(hf_ceag.EXCESS_ACCURACY_GAP_METRIC)
    result = metric.compute(
        predictions=sparse_pred.tolist(), references=labels.tolist(), groups=[names[g] for g in groups],
        dense_predictions=dense_pred.tolist(), tolerance=0.01,
    )  # fmt: skip
    report = split_report(groups, dense_pred == labels, sparse_pred == labels, names, 0.01, min_samples=1)
    assert result["max_excess_gap"] == pytest.approx(report["max_excess_gap"])
    for entry in report["groups"]:
        assert result["excess_gap"][entry["name"]] == pytest.approx(entry["excess_gap"])
    by_accuracy = metric.compute(
        predictions=sparse_pred.tolist(), references=labels.tolist(), groups=[names[g] for g in groups],
        dense_group_accuracies={e["name"]: e["accuracy_dense"] for e in report["groups"]},
    )  # fmt: skip
    assert by_accuracy["excess_gap"] == pytest.approx(result["excess_gap"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    from transformers import set_seed

    from hf_ceag import CEAGConfig, build_classifier

    set_seed(0)
    out = tmp_path_factory.mktemp("trained")
    config = CEAGConfig(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=32, per_device_eval_batch_size=256,
        learning_rate=0.01, optim="sgd", pruning_end_epoch=0.1, target_sparsity=0.8, buffer_size=4,
        report_to="none", save_strategy="no", disable_tqdm=True, hub_token="hf_SECRETTOKEN123", seed=0,
        allow_weak_dense_model=True,
    )  # fmt: skip
    model = build_classifier("test_resnet", 10, channels=1)
    trainer = CEAGTrainer(model, config, train_dataset=digits["train"], eval_dataset={"test": digits["test"]})
    trainer.train()
    return trainer


def test_evaluate_logs_per_group_accuracy_and_gap_from_one_pass(trained):
    metrics = trained.evaluate()
    report = trained.group_report()
    test = {g["name"]: g for g in report["splits"]["test"]["groups"]}
    for name, group in test.items():
        assert metrics[f"eval_test_accuracy/{name}"] == pytest.approx(group["accuracy_sparse"])
        assert metrics[f"eval_test_excess_gap/{name}"] == pytest.approx(group["excess_gap"])
    assert metrics["eval_test_max_excess_gap"] == pytest.approx(report["splits"]["test"]["max_excess_gap"])
    assert any("eval_test_accuracy/3" in entry for entry in trained.state.log_history)


def test_saved_folder_card_and_timm_loading(trained, tmp_path):
    import timm
    from transformers import AutoModelForImageClassification

    folder = tmp_path / "sparse"
    trained.save_model(str(folder))
    for name in ("model.safetensors", "config.json", "README.md", "report.json", "excess_gaps.png"):
        assert (folder / name).exists(), name
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"pruning", "sparse", "fairness"} <= set(data["tags"])
    report = json.loads((folder / "report.json").read_text())
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["accuracy (test)"] == pytest.approx(report["splits"]["test"]["accuracy_sparse"], abs=1e-6)
    assert results["max excess accuracy gap (train)"] == pytest.approx(
        report["splits"]["train"]["max_excess_gap"], abs=1e-6
    )
    assert ModelCard(str(card)).data.to_dict() == data  # round trip
    text = card.text
    for expected in ("## Verdict", "Per-group results: train", "Per-group results: test", "## Limitations",
                     "excess_gaps.png", "## Per-layer sparsity", "## How to load", "## Library versions"):  # fmt: skip
        assert expected in text, expected
    assert "| 3 | 27 |" in text  # a per-group row
    x = torch.randn(2, 1, 16, 16)
    rgb = x.expand(-1, 3, -1, -1)  # the grayscale model is saved to take RGB images (grey ones: the same logits)
    trained_model = copy.deepcopy(trained.model).cpu().eval()  # the trainer's may sit on a GPU
    hf = AutoModelForImageClassification.from_pretrained(str(folder), use_safetensors=True).eval()
    bare = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(bare(rgb), hf(pixel_values=rgb).logits)
        torch.testing.assert_close(hf(pixel_values=rgb).logits, trained_model(pixel_values=x).logits)
    assert "It was trained on 1-channel (grayscale) images and is saved to take RGB ones" in text


def test_push_to_hub_gate_and_no_token_in_files(trained):
    uploads = []

    def snapshot(folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        uploads.append((files, kwargs))

    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="me/sparse")
    api.upload_folder.side_effect = snapshot
    violated = json.loads(json.dumps(trained.group_report()))
    violated["splits"]["train"].update(
        satisfied=False, violated_groups=2, groups_over_tolerance=2, max_excess_gap=0.25
    )
    trained.report = violated
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        with pytest.raises(
            ValueError, match="push_to_hub refused: .*2 group\\(s\\) exceed .*allow_violated_constraints=True"
        ):
            trained.push_to_hub()
        assert not api.upload_folder.called and not api.create_repo.called
        trained.push_to_hub(allow_violated_constraints=True)
    files, _ = uploads[-1]
    card = files["README.md"].decode()
    assert 'from_pretrained("me/sparse")' in card and trained.args.output_dir not in card  # the Hub id
    assert card.split("---", 2)[2].lstrip().startswith("> **⚠️ Warning: this model fails hf-ceag's checks")
    assert {"model.safetensors", "config.json", "report.json", "excess_gaps.png"} <= set(files)
    assert not any(b"hf_SECRETTOKEN123" in content for content in files.values())


def test_audit_refuses_bad_input(tmp_path, digits):
    from transformers import ViTConfig, ViTForImageClassification

    def vit(num_labels, folder):
        config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, num_labels=num_labels)  # fmt: skip
        ViTForImageClassification(config).save_pretrained(folder)
        return str(folder)

    dense, sparse, other = vit(10, tmp_path / "d"), vit(10, tmp_path / "s"), vit(5, tmp_path / "o")
    common = ["--output_dir", str(tmp_path / "audit"), "--digits_variant", "balanced"]
    with pytest.raises(ValueError, match="different label sets: 10 classes .* vs 5 classes"):
        audit.main(["--dense_model", dense, "--sparse_model", other, *common])
    with pytest.raises(ValueError, match=r"'skin' is not in the train dataset. Available columns: .*'group'"):
        audit.main(["--dense_model", dense, "--sparse_model", sparse, "--group_columns", "skin", *common])
    with pytest.raises(ValueError, match=r"cannot take the data's images of shape \(1, 8, 8\) .*image_size=16"):
        audit.main(["--dense_model", dense, "--sparse_model", sparse, "--image_size", "8", *common])

    # a folder whose image processor records the size it was trained at: another --image_size is refused
    sized = tmp_path / "sized"
    shutil.copytree(sparse, sized)
    (sized / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 16, "width": 16}}))
    with pytest.raises(
        ValueError, match="--image_size 12, but the sparse model was trained at 16 px.*--image_size 16"
    ):
        audit.main(["--dense_model", dense, "--sparse_model", str(sized), "--image_size", "12", *common])

    # a dense model of another architecture (same labels)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match="is not the architecture of --sparse_model .*shapes, e.g. .*16.* vs .*32"
    ):
        audit.main(["--dense_model", str(tmp_path / "wide"), "--sparse_model", sparse, *common])

    # a sparse folder saved from torch.nn.utils.prune without prune.remove: its weights would not load
    model = ViTForImageClassification.from_pretrained(sparse)
    from torch.nn.utils import prune

    prune.l1_unstructured(model.classifier, "weight", amount=0.5)
    model.save_pretrained(tmp_path / "reparametrised")
    with pytest.raises(ValueError, match="weight_orig.*re-initialised weights.*prune.remove"):
        audit.main(["--dense_model", dense, "--sparse_model", str(tmp_path / "reparametrised"), *common])
    assert not os.path.exists(tmp_path / "audit" / "report.json")


def test_push_to_hub_from_the_cli_publishes_only_the_pruned_model(tmp_path):
    """`--push_to_hub true` used to create a Hub repo for the dense model too (with `--hub_model_id`, the same
    repo, which it then uploaded the dense model to)."""
    from scripts import run_ceag

    created, uploaded = [], []
    api = mock.MagicMock()
    api.create_repo.side_effect = lambda repo_id, **kwargs: (
        created.append(repo_id) or mock.MagicMock(repo_id=repo_id)
    )
    api.upload_folder.side_effect = lambda folder_path, **kwargs: uploaded.append(Path(folder_path).name)
    out = tmp_path / "run"
    fast = ["--digits_variant", "imbalanced", "--dense_epochs", "1", "--allow_weak_dense_model", "true", "--num_train_epochs", "2",
            "--pruning_end_epoch", "1", "--disable_tqdm", "true", "--tolerance", "1.0"]  # fmt: skip
    with mock.patch("transformers.trainer.hf_api", return_value=api):
        run_ceag.main(["--output_dir", str(out), *fast, "--methods", "none", "ceag", "--push_to_hub", "true",
                       "--hub_model_id", "me/digits", "--hub_token", "hf_SECRETTOKEN123"])  # fmt: skip
    assert created == ["me/digits-nft", "me/digits-ceag"]  # one repo per method, none for the dense model
    assert uploaded and set(uploaded) == {"nft", "ceag"}
    assert (out / "dense" / "model.safetensors").exists()
    assert b"hf_SECRETTOKEN123" not in (out / "dense" / "training_args.bin").read_bytes()


def test_card_names_no_local_path_and_the_saved_layer_names(trained, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setattr(trained, "hub_model_id", None)  # not pushed (an earlier test pushed it, to a fake Hub)
    folder = tmp_path / "deep" / "sparse"
    trained.save_model(str(folder))
    text = (folder / "README.md").read_text()
    assert str(tmp_path) not in text  # it used to show the absolute path under "How to load"
    assert 'from_pretrained("sparse")' in text and '"local-dir:sparse"' in text
    layers = re.findall(r"^\| `([^`]+)` \| [0-9.]+ \|$", text, flags=re.MULTILINE)
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert len(layers) == len(trained.pruner.parameters) and set(layers) <= keys  # not `timm_model.`-prefixed
    # no processing_class given: the digits loader's preprocessing is known, so the folder is pipeline-ready
    assert "pipeline(" in text and "holds no image processor" not in text
    assert (folder / "preprocessor_config.json").exists()


def test_card_layer_names_follow_the_renames_of_save_pretrained(tmp_path):
    """transformers 5 saves ViT's weights under other names than its parameters' (`vit.layers.0.mlp.fc1` is
    written as `vit.encoder.layer.0.intermediate.dense`): the card names what the file holds."""
    from safetensors import safe_open
    from transformers import ViTConfig, ViTForImageClassification

    from hf_ceag.models.saved_weights import saved_parameter_names

    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)  # fmt: skip
    model = ViTForImageClassification(config)
    model.save_pretrained(tmp_path)
    pruned = hf_ceag.prunable_parameters(model, keep_first_last_dense=True)
    names = saved_parameter_names(str(tmp_path / "model.safetensors"), pruned)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert set(names) == set(pruned) and set(names.values()) <= keys
    assert any(k != v for k, v in names.items())  # the renames exist, and are followed
    assert names["vit.layers.0.mlp.fc1.weight"] == "vit.encoder.layer.0.intermediate.dense.weight"


def test_card_metadata_when_known_and_a_non_image_model(trained, tmp_path):
    folder = tmp_path / "sparse"
    trained.save_model(str(folder))
    trained.create_model_card(
        output_dir=str(folder), finetuned_from="me/dense", dataset="uoft-cs/cifar100", license="apache-2.0"
    )
    data = ModelCard.load(folder / "README.md").data
    assert (data.base_model, data.datasets, data.license) == ("me/dense", ["uoft-cs/cifar100"], "apache-2.0")
    assert data.pipeline_tag == "image-classification"
    # a dense parent's license is carried over from its card when it has one
    dense = tmp_path / "dense"
    dense.mkdir()
    ModelCard("---\nlicense: mit\n---\n# dense\n").save(dense / "README.md")
    from hf_ceag.audit.model_card import build_model_card, dense_folder_license, model_task

    assert dense_folder_license(str(dense)) == "mit"
    # a text classifier is called one, and tagged with its task
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=8, vocab_size=30))  # fmt: skip
    task = model_task(bert)
    card = build_model_card(
        trained.group_report(), model_name="m", repo_or_path=str(folder), training={}, task=task
    )
    assert task == "text-classification" and card.data.pipeline_tag == task
    assert "sparse text classifier" in card.text and "image classifier" not in card.text
    assert "AutoModelForSequenceClassification" in card.text


def test_plot_shows_groups_in_one_order_with_a_legend_and_axis_labels(trained, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hf_ceag.audit.report import plot_excess_gaps

    report = json.loads(json.dumps(trained.group_report()))
    report["splits"]["test"]["groups"].reverse()  # a split listing its groups in another order
    report["splits"]["test"]["groups"][0].update(excess_gap=0.5, excess_gap_ci=[0.4, 0.6])  # ranked otherwise
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    plot_excess_gaps(report, str(tmp_path / "plot.png"))
    train, test = figures[0].axes
    assert [t.get_text() for t in train.get_xticklabels()] == [t.get_text() for t in test.get_xticklabels()]
    for ax in (train, test):
        assert ax.get_xlabel() == "group" and "excess accuracy gap" in ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "satisfied" in labels or "violated" in labels
        assert any(label.startswith("ε = ") for label in labels)


def test_plot_colours_inconclusive_groups_apart_in_the_legend(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from hf_ceag.audit.report import plot_excess_gaps

    train, _, _ = hand_built_split()
    report = build_report("ceag", TOLERANCE, 0.5, 0.5, {"train": train})
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    plot_excess_gaps(report, str(tmp_path / "plot.png"))
    (ax,) = figures[0].axes
    legend = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    for status in (SATISFIED, INCONCLUSIVE, VIOLATED):
        assert legend[status].get_facecolor() == to_rgba(STATUS_COLORS[status]), status
    assert len({STATUS_COLORS[s] for s in (SATISFIED, INCONCLUSIVE, VIOLATED)}) == 3
    bars = {t.get_text(): bar for t, bar in zip(ax.get_xticklabels(), ax.patches)}
    assert bars["under"].get_facecolor() == bars["over"].get_facecolor() == to_rgba(STATUS_COLORS[INCONCLUSIVE])


def test_a_useless_model_is_refused_for_publishing_by_its_accuracy_drop():
    """ψ_g is relative: a model that lost accuracy for every group alike has ψ ≈ 0 and "satisfies" every constraint.
    The overall drop beside it gates push_to_hub like a violated constraint (`max_accuracy_drop`)."""
    groups = torch.tensor([0] * 100 + [1] * 100)
    dense = torch.ones(200, dtype=torch.bool)
    sparse = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.1  # both groups near chance
    sparse[:100] = sparse[100:]  # exactly alike: ψ = 0 for both
    train = split_report(groups, dense, sparse, ["a", "b"], 0.01)
    assert train["max_excess_gap"] == pytest.approx(0.0) and train["satisfied"] and train["violated_groups"] == 0
    assert train["accuracy_drop"] == pytest.approx(1.0 - float(sparse.double().mean()))  # by hand
    report = build_report("ceag", 0.01, 0.9, 0.9, {"train": train}, max_accuracy_drop=0.1)
    warning = violation_warning(report)
    assert warning and "fell by" in warning and "max_accuracy_drop = 0.1" in warning
    assert f"drop +{train['accuracy_drop']:.3f}" in report["splits"]["train"]["verdict"]
    lenient = build_report("ceag", 0.01, 0.9, 0.9, {"train": copy.deepcopy(train)}, max_accuracy_drop=1.0)
    assert violation_warning(lenient) is None
    card = build_model_card(report, model_name="m", repo_or_path="m", training={}).text
    assert "Δ_g = dense_g − sparse_g" in card and "accuracy lost Δ_g" in card and "drop +" in card


def test_push_to_hub_refuses_a_collapsed_model_with_the_same_override(trained):
    from unittest import mock

    collapsed = json.loads(json.dumps(trained.group_report()))
    collapsed["max_accuracy_drop"] = 0.1
    collapsed["splits"]["test"].update(accuracy_drop=0.5, accuracy_sparse=0.1)
    trained.report = collapsed
    api = mock.MagicMock()
    try:
        with mock.patch("transformers.trainer.hf_api", return_value=api):
            with pytest.raises(
                ValueError, match="push_to_hub refused: .*test data, the overall accuracy fell by 0.500"
            ):
                trained.push_to_hub()
            assert not api.upload_folder.called
    finally:
        trained.report = None


def test_a_dense_model_at_chance_is_refused_before_any_pruning(tmp_path, digits, make_config):
    from hf_ceag import build_classifier

    model = build_classifier("test_resnet", 10, channels=1)  # untrained: at chance on the digits
    config = make_config(allow_weak_dense_model=False, save_strategy="no")
    trainer = CEAGTrainer(model, config, train_dataset=digits["train"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"training accuracy is 0\.\d+, at most 0\.05 above chance .*allow_weak_dense_model=True"
    ):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned
    assert trainer.state.global_step == 0 and not os.path.exists(os.path.join(config.output_dir, "checkpoint-1"))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda d: d, "scikit-learn digits"),  # hf-ceag's loader names its data
        (lambda d: __import__("datasets").Dataset.from_dict(d.with_format(None)[:]), None),  # in memory: unnamed
        (lambda d: d.with_format(None).select(range(10)), "scikit-learn digits"),
    ],
    ids=["digits loader", "in-memory", "selected rows"],
)
def test_the_dataset_name_is_the_datas_own_or_none(digits, make, name):
    from hf_ceag.data.encoding import dataset_display_name

    assert dataset_display_name(make(digits["train"])) == name


def test_card_of_unknown_data_names_no_dataset_and_warns_without_a_processor(tmp_path, digits, make_config):
    """An in-memory Dataset whose preprocessing hf-ceag cannot know: no image processor is invented (timm's default
    would misread every image), the save warns, the card says so and calls the data unnamed; a run from Python
    gets a Reproduce section with its CEAGConfig instead of "(not recorded)"."""
    import datasets

    from hf_ceag import build_classifier

    train = datasets.Dataset.from_dict(digits["train"].with_format(None)[:]).with_format("torch")
    test = datasets.Dataset.from_dict(digits["test"].with_format(None)[:]).with_format("torch")
    model = build_classifier("test_resnet", 10, channels=1)
    config = make_config(max_steps=4, pruning_end_epoch=0.05, mitigation="ceag", dual_lr=0.02)
    trainer = CEAGTrainer(model, config, train_dataset=train, eval_dataset={"test": test})
    trainer.train()
    assert trainer.processing_class is None
    with pytest.warns(UserWarning, match="holds no image processor: CEAGTrainer was given no processing_class"):
        trainer.save_model(str(tmp_path / "sparse"))
    assert not (tmp_path / "sparse" / "preprocessor_config.json").exists()
    card = ModelCard.load(tmp_path / "sparse" / "README.md")
    assert "This folder holds no image processor" in card.text and "pipeline(" not in card.text
    assert "an unnamed dataset" in card.text and "digits" not in card.content
    assert {r.dataset_name for r in card.data.eval_results} == {"unnamed dataset"}
    assert "(not recorded)" not in card.text and "config = CEAGConfig(output_dir='out', " in card.text
    assert "dual_lr=0.02" in card.text and "max_steps=4" in card.text and str(tmp_path) not in card.text
    assert "| group column(s) | group |" in card.text
