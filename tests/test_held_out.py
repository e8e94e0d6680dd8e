"""Held-out duals (`constraint_split`): the split, the dense reference on the held-out rows, and the dual step's
estimates built from the model's eval-mode predictions on those rows, each checked against a naive loop."""

import copy
import os

import pytest
import torch
from interruptions import straight_and_stopped

from hf_ceag import CEAGTrainer, DenseReference
from hf_ceag.constraints.held_out import HeldOutRows
from hf_ceag.constraints.problems import GroupConstrainedProblem
from hf_ceag.data.encoding import hold_out_rows
from hf_ceag.data.groups import GROUP_ID_COLUMN, GroupIndex


def encoded(digits):
    train = digits["train"]
    return GroupIndex.from_dataset(train, ["group"]).encode(train, "train")


def pixels(dataset):
    return torch.as_tensor(dataset.with_format("numpy")[:]["pixel_values"])


def test_hold_out_rows_is_stratified_disjoint_and_seeded(digits):
    data = encoded(digits)
    ids = torch.tensor(data.with_format(None)[GROUP_ID_COLUMN])
    primal, held = hold_out_rows(data, 0.25, seed=3)
    assert len(primal) + len(held) == len(data)
    for g in ids.unique().tolist():
        n = int((ids == g).sum())
        assert sum(1 for v in held.with_format(None)[GROUP_ID_COLUMN] if v == g) == round(0.25 * n)
    # the rows themselves: disjoint, covering, and the same for the same seed (another one for another seed)
    key = "pixel_values"
    rows = {tuple(r[key].flatten().tolist()) for r in primal} | {tuple(r[key].flatten().tolist()) for r in held}
    assert len(rows) == len({tuple(r[key].flatten().tolist()) for r in data})
    again = hold_out_rows(data, 0.25, seed=3)[1]
    other = hold_out_rows(data, 0.25, seed=4)[1]
    assert torch.equal(pixels(again), pixels(held))
    assert not torch.equal(pixels(other), pixels(held))
    with pytest.raises(ValueError, match=r"constraint_split=0.001: group id \d+ has \d+ training rows, so 0"):
        hold_out_rows(data, 0.001, seed=3)


def test_held_out_duals_estimate_from_eval_predictions_on_held_out_rows(tiny_model, digits, make_config, tmp_path):
    dense = copy.deepcopy(tiny_model)
    config = make_config(mitigation="ceag", constraint_split=0.25, max_steps=8, pruning_end_epoch=0.1, dual_lr=0.5)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], eval_dataset=digits["test"])
    held = trainer.constraint_dataset
    assert len(trainer.train_dataset) + len(held) == len(digits["train"])

    # the dense reference of the dual step is the dense model's, on the held-out rows (a naive loop)
    observed, predicted = [], []
    observe, predict = GroupConstrainedProblem.observe, HeldOutRows.predict

    def recording_observe(problem, *rows):
        observed.append([r.clone() for r in rows])
        return observe(problem, *rows)

    def recording_predict(rows, model, draw, process=0):
        out = predict(rows, model, draw, process)
        predicted.append((draw, [r.clone() for r in out]))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(GroupConstrainedProblem, "observe", recording_observe)
    mp.setattr(HeldOutRows, "predict", recording_predict)
    try:
        trainer.train()
    finally:
        mp.undo()
    dense.eval()
    names = trainer.group_index.names[: trainer.group_index.num_groups]
    with torch.no_grad():
        logits = torch.cat([dense(pixel_values=r["pixel_values"][None]).logits for r in held.with_format("torch")])
    labels = torch.tensor(held.with_format(None)["label"])
    groups = torch.tensor(held.with_format(None)[GROUP_ID_COLUMN])
    expected = DenseReference.from_predictions(logits, labels, groups, names)
    assert trainer.constraint_reference.group_counts == expected.group_counts
    assert trainer.constraint_reference.group_accuracy == pytest.approx(expected.group_accuracy)
    assert trainer.problem.estimate_reference["group_accuracy"].tolist() == pytest.approx(expected.group_accuracy)
    # ψ̂_g by hand: held-out dense accuracies and shares against the buffers' accuracies, over full buffers
    problem = trainer.problem
    full = problem.observed.tolist()
    shares = [c / sum(expected.group_counts) for c in expected.group_counts]
    sparse = problem.group_estimate.tolist()
    w = sum(s for s, f in zip(shares, full) if f)
    dense_all = sum(s * a for s, a, f in zip(shares, expected.group_accuracy, full) if f) / w
    sparse_all = sum(s * a for s, a, f in zip(shares, sparse, full) if f) / w
    by_hand = [
        (a - b) - (dense_all - sparse_all) if f else 0.0 for a, b, f in zip(expected.group_accuracy, sparse, full)
    ]
    assert any(full)
    assert problem.estimated_gaps().tolist() == pytest.approx(by_hand, abs=1e-6)

    # every estimate the dual step saw came from a held-out draw: one per micro-batch, numbered by step
    assert [d for d, _ in predicted] == list(range(config.max_steps))
    assert len(observed) == len(predicted)
    for rows, (_, out) in zip(observed, predicted):
        assert all(torch.equal(a, b) for a, b in zip(rows, out))

    # a draw is the model's eval-mode prediction of those rows (naive loop, final model)
    model = trainer.model
    model.train()
    ids, correct, _ = trainer._held_out.predict(model, 3)
    assert model.training  # restored after the eval-mode prediction
    model.eval()
    with torch.no_grad():
        for k, i in enumerate(trainer._held_out.rows(3).tolist()):
            row = held.with_format("torch")[i]
            out = model(pixel_values=row["pixel_values"][None].to(model.device)).logits[0]
            assert bool(out.argmax() == row["label"]) == bool(correct[k])
            assert int(row[GROUP_ID_COLUMN]) == int(ids[k])
    assert trainer.problem.dual_steps > 0

    report = trainer.group_report()
    assert report["constraint_split"] == 0.25
    assert report["splits"]["constraint"]["n"] == len(held)
    assert report["splits"]["train"]["n"] == len(trainer.train_dataset)
    assert "held out" in report["split_rows"]["constraint"]
    trainer.save_model(str(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Per-group results: constraint" in card and "held out from the primal step" in card


def test_held_out_duals_are_ignored_by_nft_which_trains_on_every_row(tiny_model, digits, make_config):
    with pytest.warns(UserWarning, match="constraint_split=0.2 is ignored with mitigation='none'"):
        trainer = CEAGTrainer(
            tiny_model, make_config(mitigation="none", constraint_split=0.2), train_dataset=digits["train"]
        )
    assert trainer.constraint_dataset is None and len(trainer.train_dataset) == len(digits["train"])
    with pytest.raises(ValueError, match=r"constraint_split=1.0 is outside \[0, 1\)"):
        make_config(constraint_split=1.0)


def test_held_out_duals_resume_exactly(tmp_path, tiny_model, digits, make_config):
    """The held-out draws are numbered by optimizer step and micro-batch, and the held-out reference is saved
    with the constrained state: a resumed run ends exactly where an uninterrupted one does (on the CPU)."""
    dense = copy.deepcopy(tiny_model)
    common = {
        "mitigation": "ceag", "constraint_split": 0.25, "dual_lr": 0.5, "tolerance": 0.0, "max_steps": 10,
        "pruning_end_epoch": 0.1, "gradient_accumulation_steps": 2, "use_cpu": True,
    }  # fmt: skip
    folder = str(tmp_path / "resumable")
    straight, _ = straight_and_stopped(dense, make_config, digits["train"], folder, stop=6, save_steps=6, **common)
    resumed = CEAGTrainer(
        copy.deepcopy(dense), make_config(output_dir=folder, **common), train_dataset=digits["train"]
    )
    resumed.train(resume_from_checkpoint=True)
    assert straight.problem.multipliers_tensor().abs().sum() > 0
    assert torch.equal(straight.problem.multipliers_tensor(), resumed.problem.multipliers_tensor())
    assert torch.equal(straight.problem.buffer.values, resumed.problem.buffer.values)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.constraint_reference.group_accuracy == straight.constraint_reference.group_accuracy

    no_split = {**common, "constraint_split": 0.0}
    refused = CEAGTrainer(
        copy.deepcopy(dense), make_config(output_dir=folder, **no_split), train_dataset=digits["train"]
    )
    with pytest.raises(
        ValueError, match="Checkpoint was written with held-out duals; this run has constraint_split=0"
    ):
        refused.train(resume_from_checkpoint=True)


def test_held_out_duals_on_two_processes_hold_identical_state(tmp_path):
    """Each process draws its own share of held-out rows; the trainer gathers them, so both ranks take the same
    dual steps: identical multipliers, buffers and weights (CPU processes, gloo)."""
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "CEAG_TEST_CONSTRAINT_SPLIT": "0.25"}  # fmt: skip
    worker = str(root / "tests" / "distributed_worker.py")
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path), "16", "1", "ceag"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world_size=2" in result.stdout
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for key in ("multiplier", "buffer", "weights"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert rank0["multiplier"].abs().sum() > 0 and int(rank0["held_out_rows"]) > 0
