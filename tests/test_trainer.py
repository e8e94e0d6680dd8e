import json
import os
import subprocess
import sys
from typing import ClassVar

import datasets
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

from hf_ceag import CEAGTrainer, DenseReference, load_classifier
from hf_ceag.constraints.reference import REFERENCE_FILE
from hf_ceag.models.rgb_input import grayscale_stem


def dense_statistics_by_hand(model, dataset):
    """Independent per-group accuracy of the dense model: a plain loop in eval mode."""
    model.eval()
    hits, counts = [0] * 10, [0] * 10
    with torch.no_grad():
        for row in dataset:
            logits = model(pixel_values=row["pixel_values"][None]).logits
            g = int(row["group"])
            hits[g] += int(logits.argmax() == row["label"])
            counts[g] += 1
    return [h / c for h, c in zip(hits, counts)], counts


def test_trains_prunes_logs_and_saves_reference(tiny_model, digits, make_config):
    expected_acc, expected_counts = dense_statistics_by_hand(tiny_model, digits["train"])
    config = make_config(remove_unused_columns=True, mitigation="ceag", dual_lr=0.5)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], eval_dataset={"test": digits["test"]})
    trainer.train()

    reference = DenseReference.load(os.path.join(config.output_dir, REFERENCE_FILE))
    assert reference.group_counts == expected_counts
    assert reference.group_accuracy == pytest.approx(expected_acc)

    # exact sparsity in pruned layers, first conv and classifier dense
    for name, p in trainer.pruner.parameters.items():
        assert int((p == 0).sum()) == round(0.8 * p.numel()), name
    assert "timm_model.conv1.0.weight" not in trainer.pruner.parameters
    assert (tiny_model.timm_model.conv1[0].weight != 0).all() and (tiny_model.timm_model.fc.weight != 0).all()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("max_excess_gap_estimate", "multiplier_mean", "multiplier_max", "sparsity", "full_buffers"):
        assert key in logs[-1], key
    assert logs[-1]["sparsity"] == pytest.approx(0.8, abs=1e-6)
    assert logs[-1]["full_buffers"] == 10
    assert trainer.problem.multipliers_tensor().min() >= 0

    report = trainer.group_report()
    assert set(report["splits"]) == {"train", "test"}
    # one dual step per optimizer step once pruning has ended (every buffer is full by then)
    assert report["dual_steps"] == config.max_steps - trainer.schedule.end > 0
    assert list(report["multipliers"].values()) == trainer.problem.multipliers_tensor().tolist()
    train = report["splits"]["train"]
    assert [g["n"] for g in train["groups"]] == expected_counts
    assert [g["accuracy_dense"] for g in train["groups"]] == pytest.approx(expected_acc)


def test_saved_sparse_model_loads_without_hf_ceag(tmp_path, tiny_model, digits, make_config):
    config = make_config(mitigation="none")
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    trainer.train()
    # NFT: no dual step, so no replay buffers to fill (config.buffer_size > 0 is for the constrained methods)
    assert trainer.dual_optimizer is None and trainer.problem.buffer is None and config.buffer_size > 0
    folder = tmp_path / "sparse"
    trainer.save_model(str(folder))
    assert (folder / "model.safetensors").exists()
    x = digits["test"][:8]["pixel_values"]
    tiny_model.cpu().eval()  # compared on the CPU, where the reloaded model is
    with torch.no_grad():
        expected = tiny_model(pixel_values=x).logits
    torch.save({"x": x, "logits": expected}, tmp_path / "expected.pt")
    # saved to take RGB images: its first layer holds the trained 1-channel weights three times, scaled
    stem = grayscale_stem(tiny_model) + ".weight"
    zeros = {n: int((p == 0).sum()) * (3 if n == stem else 1) for n, p in tiny_model.named_parameters()}
    (tmp_path / "zeros.json").write_text(json.dumps(zeros))
    code = f"""
import json, sys
sys.modules["hf_ceag"] = None  # any import of hf_ceag would fail
sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
import torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, use_safetensors=True).eval()
data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
with torch.no_grad():
    logits = model(pixel_values=data["x"].expand(-1, 3, -1, -1)).logits  # grey images as RGB
torch.testing.assert_close(logits, data["logits"])
zeros = {{n: int((p == 0).sum()) for n, p in model.named_parameters()}}
assert zeros == json.load(open({str(tmp_path / "zeros.json")!r})), "zero pattern differs"
print("OK", sum(zeros.values()))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK") and int(result.stdout.split()[1]) > 0


def test_bad_input_is_refused_before_training(tiny_model, digits, make_config):
    train = digits["train"]
    with pytest.raises(ValueError, match=r"'grup' is not in the train dataset. Available columns: .*'group'"):
        CEAGTrainer(tiny_model, make_config(group_columns=["grup"]), train_dataset=train)
    relabelled = train.with_format(None).cast_column("label", datasets.Value("int64"))
    bad_labels = relabelled.map(lambda row: {"label": row["label"] + 5})
    with pytest.raises(ValueError, match=r"label\(s\) \[10, 11, 12, 13, 14\] outside the model's classes 0..9"):
        CEAGTrainer(tiny_model, make_config(), train_dataset=bad_labels)
    with pytest.raises(ValueError, match="no prunable layers"):
        CEAGTrainer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 10)), make_config(), train_dataset=train)
    trainer = CEAGTrainer(tiny_model, make_config(pruning_end_epoch=50.0), train_dataset=train)
    with pytest.raises(ValueError, match="pruning_end_epoch=50 .* is after the end of training"):
        trainer.train()
    assert not os.path.exists(os.path.join(trainer.args.output_dir, REFERENCE_FILE))


def test_dataloader_drop_last_still_scores_every_row(tiny_model, digits, make_config):
    """`dataloader_drop_last` drops partial training batches only: the dense reference, the report and the
    evaluation count every row (the Trainer's eval loader would drop the last partial batch too)."""
    train, test = digits["train"], digits["test"]
    assert len(train) % 32 and len(test) % 256  # both splits end in a partial batch
    config = make_config(
        max_steps=4, pruning_end_epoch=0.0, mitigate_during_pruning=True, dataloader_drop_last=True
    )
    trainer = CEAGTrainer(tiny_model, config, train_dataset=train, eval_dataset=test)
    trainer.train()
    assert trainer.dense_correct["train"].numel() == len(train)
    assert trainer.dense_correct["eval"].numel() == len(test)
    assert sum(trainer.dense_reference.group_counts) == len(train)


def test_small_groups_warn_with_their_names(tiny_model, digits, make_config):
    with pytest.warns(
        UserWarning, match=r"\['3 \(n=27\)', '8 \(n=26\)'\] have fewer training samples than buffer_size=40"
    ):
        CEAGTrainer(tiny_model, make_config(buffer_size=40), train_dataset=digits["train"])


@pytest.mark.parametrize(("buffer_size", "method"), [(0, "el"), (4, "el+rb")])
def test_equalized_loss_baselines_train_and_move_their_multipliers(
    tiny_model, digits, make_config, buffer_size, method
):
    config = make_config(mitigation="equalized_loss", buffer_size=buffer_size, dual_lr=0.1, max_steps=8)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    trainer.train()
    multipliers = trainer.problem.multipliers_tensor()
    assert multipliers.abs().sum() > 0  # EL multipliers are signed (equality constraints)
    assert "max_loss_gap_estimate" in [k for entry in trainer.state.log_history for k in entry]
    assert trainer.group_report()["method"] == method


def tiny_transformers_model(kind):
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

    if kind == "vit":
        config = ViTConfig(
            image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=10,
        )  # fmt: skip
    else:
        config = ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_channels=1,
            layer_type="basic",
            num_labels=10,
        )
    return AutoModelForImageClassification.from_config(config)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_transformers_image_classifiers_prune_and_reload(tmp_path, digits, make_config, kind):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = tiny_transformers_model(kind)
    trainer = CEAGTrainer(model, make_config(max_steps=6, pruning_end_epoch=0.02), train_dataset=digits["train"])
    trainer.train()
    names = list(trainer.pruner.parameters)
    assert names and all("classifier" not in n for n in names)
    assert trainer.pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    trainer.save_model(str(tmp_path / kind))
    # saved to take RGB (grey images: the same logits); hf-ceag loads back the 1-channel model, bit for bit
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / kind), use_safetensors=True)
    trained = load_classifier(str(tmp_path / kind))
    x = digits["test"][:4]["pixel_values"]
    with torch.no_grad():
        expected = model.cpu().eval()(pixel_values=x).logits
        torch.testing.assert_close(reloaded.eval()(pixel_values=x.expand(-1, 3, -1, -1)).logits, expected)
        assert torch.equal(trained.eval()(pixel_values=x).logits, expected)


def test_a_given_dense_reference_is_used_and_checked(tiny_model, digits, make_config):
    reference = DenseReference([str(d) for d in range(10)], [1] * 10, [0.5] * 10, [1.0] * 10)
    trainer = CEAGTrainer(
        tiny_model,
        make_config(max_steps=3, pruning_end_epoch=0.05),
        train_dataset=digits["train"],
        dense_reference=reference,
    )
    trainer.train()
    assert trainer.dense_reference is reference and trainer.problem.dense_loss.item() == pytest.approx(1.0)
    assert trainer.group_report()["splits"]["train"]["n"] == len(digits["train"])
    with pytest.raises(ValueError, match="dense_reference: its groups"):
        CEAGTrainer(
            tiny_model,
            make_config(),
            train_dataset=digits["train"],
            dense_reference=DenseReference(["a"], [1], [1.0], [0.1]),
        )


def test_from_timm_wraps_a_bare_timm_model_with_the_same_outputs():
    import timm

    from hf_ceag import from_timm

    bare = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    wrapped = from_timm(bare, "test_resnet", in_chans=1).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=x).logits, bare(x))
    assert wrapped.config.num_labels == 10


@pytest.mark.parametrize("accumulation", [1, 2])
def test_pruned_weights_have_no_gradient_when_the_trainer_clips(tiny_model, digits, make_config, accumulation):
    """At clipping time (after every micro-batch's backward, before optimizer.step) no pruned weight has a
    gradient, and the clipped / logged norm is that of the kept weights — computed here independently."""
    config = make_config(
        mitigation="ceag", max_grad_norm=1.0, logging_steps=1, gradient_accumulation_steps=accumulation,
        pruning_end_epoch=0.05, max_steps=6,
    )  # fmt: skip
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    seen = []
    clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        pruned_nonzero = sum(
            int((p.grad[~trainer.pruner.masks[name]] != 0).sum())
            for name, p in trainer.pruner.parameters.items()
            if p.grad is not None
        )
        kept_norm = torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).norm().item()
        seen.append((trainer.pruner.sparsity(), pruned_nonzero, kept_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = recording_clip
    trainer.train()
    pruned_steps = [s for s in seen if s[0] > 0.5]
    assert len(pruned_steps) >= 3
    assert all(nonzero == 0 for _, nonzero, _ in seen)
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert logged == pytest.approx([norm for _, _, norm in seen], rel=1e-4)


class NoHostReads(TorchFunctionMode):
    """Raises on the torch calls that read a tensor's value back to the host (`item`, `tolist`, `bool`, `int`,
    `float`, `nonzero`), on boolean-mask indexing (a data-dependent shape) and on `t[i] = <Python number>`
    (a host-to-device copy): on a GPU each is a sync (`tests/test_cuda.py` checks the real thing there)."""

    READS: ClassVar = {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
        torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    }  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not self.reads_a_nupi_gain(args):
            raise AssertionError(f"{func.__name__} read a tensor back to the host inside a training step")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            keys = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                raise AssertionError("boolean-mask indexing (a data-dependent shape) inside a training step")
            if func is torch.Tensor.__setitem__ and isinstance(args[2], (bool, int, float)):
                raise AssertionError("a Python number written into a tensor (a host-to-device copy on a GPU)")
        return func(*args, **(kwargs or {}))

    @staticmethod
    def reads_a_nupi_gain(args) -> bool:
        # Cooper's nuPI step branches on its gains (`if Ki.ne(0).any():`): host tensors on every device (the
        # test checks they stay on the CPU), so no sync on a GPU; `tests/test_cuda.py` checks the real thing.
        caller = sys._getframe(2)
        host_scalar = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" and args[0].dim() == 0
        return host_scalar and caller.f_code.co_filename.endswith(
            os.path.join("cooper", "optim", "torch_optimizers", "nupi_optimizer.py")
        )


class NoHostReadsDuringSteps(TrainerCallback):
    """A CPU stand-in for CUDA's sync debug mode: `NoHostReads` from `on_step_begin` to `on_step_end` of every
    step after the first log (forward, loss, dual step, backward, clipping, optimizer step and mask hooks)."""

    def __init__(self):
        self.mode, self.checked = None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= args.logging_steps:
            self.checked += 1
            self.mode = NoHostReads()
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


@pytest.mark.parametrize("mitigation", ["ceag", "none", "equalized_loss", "ceag+nupi"])
def test_training_steps_read_nothing_back_from_the_device(tiny_model, digits, make_config, mitigation):
    """What `tests/test_cuda.py` checks with `torch.cuda.set_sync_debug_mode("error")`, checked on any machine
    at the Python level: the constrained step, the dual step, the masks and the metrics stay on the device."""
    watcher = NoHostReadsDuringSteps()
    mitigation, _, dual = mitigation.partition("+")
    nupi = {"dual_optimizer": "nupi", "nupi_kp": 2.0} if dual else {}
    config = make_config(
        mitigation=mitigation, max_steps=10, logging_steps=3, pruning_end_epoch=0.0, dual_lr=0.5, tolerance=0.0,
        **nupi,
    )  # fmt: skip
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"], callbacks=[watcher])
    try:
        trainer.train()
    finally:
        watcher.restore()
    assert watcher.checked == 10 - 3
    if mitigation != "none":
        assert trainer.problem.dual_steps > 0 and trainer.problem.multipliers_tensor().abs().sum() > 0
    if dual:
        (group,) = trainer.dual_optimizer.param_groups
        assert group["Kp"].device.type == group["Ki"].device.type == "cpu"
