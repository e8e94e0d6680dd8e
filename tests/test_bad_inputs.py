"""Mistakes a new user makes, each refused early with an error that names the problem and the fix — or, where
the mistake used to pass silently, handled as the user meant. Add a row for every new mistake found."""

import os

import pytest
import torch

run_ceag = pytest.importorskip("scripts.run_ceag")

FAST = ["--digits_variant", "imbalanced", "--dense_epochs", "1", "--allow_weak_dense_model", "true", "--num_train_epochs", "2", "--pruning_end_epoch", "1",
        "--disable_tqdm", "true"]  # fmt: skip

# (flags of scripts/run_ceag.py, words the error must contain); each fails before any data is loaded or model
# trained, so nothing is written
CLI_MISTAKES = [
    (["--resume_from_checkpoint", "does/not/exist"], ["--resume_from_checkpoint", "does not resume"]),
    (["--mitigation", "ceag", "--methods", "none"], ["--mitigation ceag", "--methods none", "disagree"]),
    (
        ["--methods", "ceag", "--pruning_end_epoch", "2"],
        ["mitigation='ceag'", "pruning_end_epoch=2", "never be on"],
    ),
    (["--mitigation", "ceag", "--pruning_end_epoch", "3"], ["pruning_end_epoch=3", "never be on"]),
    (["--methods", "bogus"], ["--methods", "bogus", "choose from"]),
    (["--target_sparsity", "1.5"], ["target_sparsity=1.5", "0.9 for 90 %"]),
    (["--tolerance", "-0.1"], ["tolerance=-0.1", "fraction >= 0"]),
    (["--group_columns", "grup"], ["'grup' is not in the train dataset", "'group'"]),
    (["--validation_split", "1"], ["--validation_split 1", "e.g. 0.2"]),
    (  # choosing the checkpoint on the test split would make its figures optimistic
        ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "true"],
        [
            "--metric_for_best_model loss",
            "--validation_split 0",
            "never on the test split",
            "--validation_split 0.2",
        ],
    ),
    (
        [
            "--eval_strategy",
            "epoch",
            "--save_strategy",
            "epoch",
            "--load_best_model_at_end",
            "true",
            "--validation_split",
            "0.2",
            "--metric_for_best_model",
            "test_max_excess_gap",
        ],
        ["--metric_for_best_model test_max_excess_gap", "validation_max_excess_gap"],
    ),
]


@pytest.mark.parametrize(("flags", "words"), CLI_MISTAKES, ids=[" ".join(f) for f, _ in CLI_MISTAKES])
def test_cli_mistakes_fail_early_with_a_clear_error(tmp_path, flags, words):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        run_ceag.main(["--output_dir", str(out), *FAST, *flags])
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert not out.exists()  # refused before anything was written


def test_mitigation_alone_is_honoured_as_the_method(tmp_path):
    from transformers import HfArgumentParser

    from hf_ceag import CEAGConfig

    parser = HfArgumentParser((run_ceag.ScriptArguments, CEAGConfig))
    parser.set_defaults(**run_ceag.RECIPE_DEFAULTS)
    argv = ["--output_dir", str(tmp_path), "--mitigation", "equalized_loss"]
    script, config = parser.parse_args_into_dataclasses(args=argv)
    assert script.methods == ["none", "ceag"]  # the default, which used to run instead
    assert run_ceag.resolve_methods(script, config, run_ceag._given(argv)) == ["equalized_loss"]


def test_several_processes_keep_the_recipes_global_batch(monkeypatch, tmp_path):
    from hf_ceag import CEAGConfig

    config = CEAGConfig(output_dir=str(tmp_path), per_device_train_batch_size=64, report_to="none")
    monkeypatch.setattr(CEAGConfig, "world_size", property(lambda self: 2))
    assert run_ceag._keep_global_batch(config, set()).per_device_train_batch_size == 32
    given = {"per_device_train_batch_size"}  # a batch the user chose is theirs
    assert run_ceag._keep_global_batch(config, given).per_device_train_batch_size == 64
    monkeypatch.setattr(CEAGConfig, "world_size", property(lambda self: 3))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        run_ceag._keep_global_batch(config, set())


def test_trainer_refuses_a_run_without_a_constrained_phase(tiny_model, digits, make_config):
    from hf_ceag import CEAGTrainer

    steps_per_epoch = -(-len(digits["train"]) // 32)
    config = make_config(mitigation="ceag", pruning_end_epoch=12 / steps_per_epoch)  # ends at step 12 of 12
    with pytest.raises(ValueError, match="would never be on"):
        CEAGTrainer(tiny_model, config, train_dataset=digits["train"]).train()


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tiny_model, digits, make_config):
    from hf_ceag import CEAGTrainer

    config = make_config(mitigation="ceag", logging_steps=2)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    steps = []
    tiny_model.register_forward_hook(lambda module, args, output: _poison(output, steps, module.training))
    with pytest.raises(FloatingPointError, match="non-finite .*ce_loss=nan"):
        trainer.train()
    assert not os.path.exists(os.path.join(config.output_dir, "model.safetensors"))


def _poison(output, steps, training):
    # From the fifth training forward pass on, the logits are NaN (as an overflowing half-precision run would
    # give); the dense pass before training is left alone (it refuses non-finite logits itself).
    steps.extend([1] if training else [])
    if training and len(steps) > 4 and getattr(output, "logits", None) is not None:
        output.logits = output.logits * torch.tensor(float("nan"))
    return output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the defaults set on a machine without a GPU")
def test_on_a_cpu_machine_the_script_sets_what_bf16_and_the_dataloader_need(tmp_path):
    from transformers import HfArgumentParser

    from hf_ceag import CEAGConfig

    parser = HfArgumentParser((run_ceag.ScriptArguments, CEAGConfig))
    parser.set_defaults(**run_ceag.RECIPE_DEFAULTS)
    run_ceag._set_machine_defaults(parser)
    _, config = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--bf16", "true"])
    assert config.use_cpu and not config.dataloader_pin_memory  # parsing no longer fails on use_cpu


def test_the_python_api_pins_memory_only_for_an_accelerator(tiny_model, digits, make_config):
    import warnings

    from hf_ceag import CEAGTrainer
    from hf_ceag.ceag_config import has_accelerator

    assert make_config().dataloader_pin_memory == has_accelerator()
    assert not make_config(use_cpu=True).dataloader_pin_memory
    assert not make_config(dataloader_pin_memory=False).dataloader_pin_memory  # the user's choice stays
    config = make_config(max_steps=2, pruning_end_epoch=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = CEAGTrainer(
            tiny_model, config, train_dataset=digits["train"], eval_dataset={"test": digits["test"]}
        )
        trainer.train()
        trainer.group_report()
    # torch warned once per dataloader on a CPU machine (the dense pass, training, each evaluation)
    assert not [w for w in caught if "pin_memory" in str(w.message)] or has_accelerator()


def test_batches_are_copied_without_blocking_where_memory_is_pinned_unless_the_user_says_otherwise(
    make_config, monkeypatch
):
    import hf_ceag.ceag_config

    monkeypatch.setattr(hf_ceag.ceag_config, "has_accelerator", lambda: True)  # as on a GPU machine
    assert make_config().accelerator_config.non_blocking
    config = make_config(accelerator_config={"even_batches": False})
    assert config.accelerator_config.non_blocking and not config.accelerator_config.even_batches
    assert not make_config(accelerator_config={"non_blocking": False}).accelerator_config.non_blocking
    assert not make_config(accelerator_config='{"non_blocking": false}').accelerator_config.non_blocking
    assert make_config(accelerator_config='{"even_batches": false}').accelerator_config.non_blocking
    assert not make_config(dataloader_pin_memory=False).accelerator_config.non_blocking  # nothing pinned
    assert not make_config(use_cpu=True).accelerator_config.non_blocking
    monkeypatch.setattr(hf_ceag.ceag_config, "has_accelerator", lambda: False)
    assert not make_config().accelerator_config.non_blocking  # TrainingArguments' default without one


def test_build_classifier_sizes_a_timm_vit_to_the_images():
    """`image_size` used to be ignored for timm models: a ViT built for 32-px images failed its first forward."""
    from hf_ceag import build_classifier

    vit = build_classifier("vit_tiny_patch16_224", num_labels=3, channels=1, image_size=32)
    assert vit(pixel_values=torch.randn(2, 1, 32, 32)).logits.shape == (2, 3)
    resnet = build_classifier("test_resnet", num_labels=3, channels=1, image_size=32)  # takes any size
    assert resnet(pixel_values=torch.randn(2, 1, 32, 32)).logits.shape == (2, 3)


def test_nan_group_values_are_refused_naming_the_column():
    import datasets

    from hf_ceag import GroupIndex

    data = datasets.Dataset.from_dict({"label": [0, 1, 0], "age": [1.0, float("nan"), 2.0]})
    with pytest.raises(ValueError, match="'age' of the train dataset has 1 null or NaN value"):
        GroupIndex.from_dataset(data, ["age"])


def test_a_string_group_column_is_split_stratified(tmp_path):
    """Without a test split, the split is stratified by the first group column, strings included (it used to
    be random, and a rare group could miss the test split: `test +nan`)."""
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_user_data import make_images

    from hf_ceag import load_image_dataset

    rows = make_images(tmp_path / "images", n=48)
    for i, row in enumerate(rows):
        row["tone"] = "rare" if i % 6 == 0 else "common"  # 8 of 48
    with open(tmp_path / "images" / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "tone", "label_name"])
        writer.writeheader()
        writer.writerows(rows)
    data = load_image_dataset(
        "imagefolder", ["tone"], label_column="label_name", data_dir=str(tmp_path / "images"), image_size=8,
        test_size=0.25,
    )  # fmt: skip
    tones = data["test"].with_format(None)["tone"]
    assert tones.count("rare") == 2  # a quarter of 8, and the column keeps its strings


# (a change to the train dataset given to CEAGTrainer, words the error must contain); each is refused when the
# trainer is built or at the first batch of its first pass, before any training step
def _float_labels(data):
    return data.cast_column("label", __import__("datasets").Value("float32"))


def _string_labels(data):
    import datasets

    names = data.with_format(None)["label"]
    return data.remove_columns("label").add_column(
        "label", [f"digit {n}" for n in names], feature=datasets.Value("string")
    )


TRAINER_DATA_MISTAKES = [
    (_float_labels, ["label column 'label' holds float32 values", "class_encode_column", "Value('int64')"]),
    (_string_labels, ["label column 'label' holds string values", "'digit ", "class_encode_column('label')"]),
]


@pytest.mark.parametrize(
    ("change", "words"), TRAINER_DATA_MISTAKES, ids=[c.__name__ for c, _ in TRAINER_DATA_MISTAKES]
)
def test_trainer_data_mistakes_fail_early_with_a_clear_error(tiny_model, digits, make_config, change, words):
    from hf_ceag import CEAGTrainer

    with pytest.raises(ValueError) as error:
        CEAGTrainer(tiny_model, make_config(), train_dataset=change(digits["train"])).train()
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_a_model_without_logits_is_refused_naming_its_class(digits, make_config):
    """A base model (no classification head) used to fail at `outputs["logits"]` with a bare KeyError."""
    from transformers import ResNetConfig, ResNetModel

    from hf_ceag import CEAGTrainer

    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    trainer = CEAGTrainer(ResNetModel(config), make_config(), train_dataset=digits["train"])
    with pytest.raises(ValueError, match="ResNetModel returns .*no `logits`.*ResNetForImageClassification"):
        trainer.train()
    assert trainer.state.global_step == 0


def _image_folder(root, corrupt=False):
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_user_data import make_images

    rows = make_images(root, n=24)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "tone", "label_name"])
        writer.writeheader()
        writer.writerows(rows)
    if corrupt:
        (root / rows[5]["file_name"]).write_bytes(b"not a png")  # a download cut short, a mislabelled file
    return root


# (a whole command line of scripts/run_ceag.py or scripts/audit.py, built in tmp_path; words the error must
# contain); each fails before any training, and writes nothing
def _fairface_without_its_data(tmp_path):
    from pathlib import Path

    return "run_ceag", [str(Path(__file__).resolve().parents[1] / "configs" / "fairface_race.yaml")]


def _corrupt_image_in_an_imagefolder(tmp_path):
    folder = _image_folder(tmp_path / "images", corrupt=True)
    flags = ["--dataset_name", "imagefolder", "--data_dir", str(folder), "--group_columns", "tone"]
    return "run_ceag", [*flags, "--label_column", "label_name", "--image_size", "8"]


def _audit_with_a_missing_dense_model(tmp_path):
    return "audit", ["--dense_model", "outputs/nowhere/dense", "--sparse_model", str(tmp_path)]


def _audit_with_a_missing_hub_like_dense_model(tmp_path):
    return "audit", ["--dense_model", "nowhere/dense", "--sparse_model", str(tmp_path)]


COMMAND_MISTAKES = [
    (_fairface_without_its_data, ["--data_dir data/fairface: folder not found", "fairface_label_train.csv",
                                  "configs/README.md", "leave data_dir out"]),
    (_corrupt_image_in_an_imagefolder, ["1 image(s) of the train split cannot be read", "owl/5.png",
                                        "UnidentifiedImageError", "Replace or delete"]),
    (_audit_with_a_missing_dense_model, ["--dense_model outputs/nowhere/dense: folder not found",
                                         "save_pretrained folder"]),
    (_audit_with_a_missing_hub_like_dense_model, ["--dense_model nowhere/dense: folder not found",
                                                  "not reachable offline"]),
]  # fmt: skip


@pytest.mark.parametrize(("make", "words"), COMMAND_MISTAKES, ids=[m.__name__[1:] for m, _ in COMMAND_MISTAKES])
def test_command_mistakes_fail_early_with_a_clear_error(tmp_path, monkeypatch, make, words):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import audit

    monkeypatch.chdir(tmp_path)  # relative paths of a config file resolve here, where there is no data
    script, argv = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        if script == "run_ceag":
            config_file = argv[:1] if argv[0].endswith(".yaml") else []  # a config file comes first
            run_ceag.main([*config_file, "--output_dir", str(out), *argv[len(config_file) :]])
        else:
            audit.main([*argv, "--output_dir", str(out), "--digits_variant", "balanced"])
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert not out.exists()


def _output_dir_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "results.txt").write_text("a file, not a folder")
    return tmp_path / "results.txt" / "run", "NotADirectoryError"


def _read_only_output_dir(tmp_path, monkeypatch):
    # a read-only folder or disk, as the OS refuses it to any user but root (tests may run as root, for whom
    # permission bits refuse nothing): creating a file in it fails
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    return folder, "PermissionError"


UNWRITABLE = [_output_dir_under_a_file, _read_only_output_dir]


@pytest.mark.parametrize("make", UNWRITABLE, ids=[m.__name__[1:] for m in UNWRITABLE])
def test_an_output_dir_that_cannot_be_written_is_refused_at_construction(
    tmp_path, monkeypatch, tiny_model, digits, make_config, make
):
    """It used to be found when the run first saved: after the dense pass, or at the first checkpoint."""
    from hf_ceag import CEAGTrainer

    output_dir, reason = make(tmp_path, monkeypatch)
    with pytest.raises(ValueError) as error:
        CEAGTrainer(tiny_model, make_config(output_dir=str(output_dir)), train_dataset=digits["train"])
    for words in (f"output_dir={str(output_dir)!r} cannot be written", reason, "folder you can write to"):
        assert words in str(error.value), (words, str(error.value))


def test_a_run_that_prunes_nothing_says_so(tiny_model, digits, make_config):
    import warnings

    from hf_ceag import CEAGTrainer

    with pytest.warns(UserWarning, match="target_sparsity=0: nothing is pruned.*fine-tunes the dense model"):
        CEAGTrainer(tiny_model, make_config(target_sparsity=0.0), train_dataset=digits["train"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="target_sparsity")
        CEAGTrainer(tiny_model, make_config(), train_dataset=digits["train"])  # the default prunes: no warning


# ---- nothing broken is trained on in silence, or saved ----


def _non_finite_files(folder):
    # every model.safetensors under `folder` that holds a NaN or an infinity
    from safetensors.torch import load_file

    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f == "model.safetensors"]
    broken = [f for f in files if not all(torch.isfinite(t).all() for t in load_file(f).values())]
    return files, broken


def _nan_image_in_training(trainer, step):
    # One NaN image in the batch of optimizer step `step` only (1-based), reaching the model in training mode:
    # an augmentation or a row the dense pass never saw.
    def hook(module, args, kwargs):
        if module.training and trainer.state.global_step + 1 == step:
            kwargs["pixel_values"] = kwargs["pixel_values"].clone()
            kwargs["pixel_values"][0] = float("nan")
        return args, kwargs

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)


CHECKPOINTS_EVERY_4 = {"logging_steps": 500, "save_strategy": "steps", "save_steps": 4}  # default logging


@pytest.mark.parametrize(
    ("overrides", "nan_step", "first_bad"),
    [({}, 6, "step 6"), ({"learning_rate": 1e6, "max_grad_norm": 0.0}, None, "step ")],
    ids=["one_nan_training_image", "diverging_learning_rate"],
)
def test_a_model_that_went_non_finite_is_never_saved(
    tiny_model, digits, make_config, overrides, nan_step, first_bad
):
    """Without a log before the end, a NaN image or a diverging learning rate used to run to the end: NaN
    checkpoints, a NaN final folder and a card. Every step is now watched and every save refused."""
    from hf_ceag import CEAGTrainer

    config = make_config(mitigation="ceag", **CHECKPOINTS_EVERY_4, **overrides)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    if nan_step:
        _nan_image_in_training(trainer, nan_step)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    for words in ("non-finite training loss from " + first_bad, "was not saved", "learning_rate", "NaN",
                  "max_grad_norm > 0", "fp32"):  # fmt: skip
        assert words in message, (words, message)
    with pytest.raises(FloatingPointError, match="Saving the model to"):
        trainer.save_model()
    files, broken = _non_finite_files(config.output_dir)
    assert not broken, broken
    if nan_step:
        assert [os.path.basename(os.path.dirname(f)) for f in files] == ["checkpoint-4"]  # before the NaN
    assert not os.path.exists(os.path.join(config.output_dir, "README.md"))


def test_the_watch_is_read_only_at_logs_saves_and_the_end(tiny_model, digits, make_config, monkeypatch):
    """The per-step check stays on the device: a step records a non-finite loss without reading anything back
    (on CUDA, tests/test_cuda.py runs the steps under `set_sync_debug_mode("error")`); the record is read at
    each log (steps 4, 8, 12 and the end of training) and each save (steps 6 and 12), nowhere else."""
    from hf_ceag import CEAGTrainer
    from hf_ceag.callbacks import NonFiniteWatch, floating_state

    reads, observed = [], []
    read, observe = NonFiniteWatch.read, NonFiniteWatch.observe

    def counting_read(watch, *args, **kwargs):
        reads.append(trainer.state.global_step)
        return read(watch, *args, **kwargs)

    def observe_without_reading(watch, loss, step):
        observed.append(step)
        with monkeypatch.context() as m:  # no value of a tensor may reach Python during a step
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a step read a tensor"))
            observe(watch, loss, step)

    monkeypatch.setattr(NonFiniteWatch, "read", counting_read)
    monkeypatch.setattr(NonFiniteWatch, "observe", observe_without_reading)
    config = make_config(mitigation="ceag", save_strategy="steps", save_steps=6)
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    trainer.train()
    assert observed == list(range(1, 13))
    assert reads == [4, 6, 8, 12, 12, 12], reads
    assert trainer.non_finite.read(floating_state(trainer.model)) == (None, [])  # a finite run


def _non_finite_pixels(data, values):
    # a copy of `data` with pixel (0, 0, 0) of row r set to values[r]
    import datasets

    columns = data.with_format("numpy")[:]
    columns["pixel_values"] = columns["pixel_values"].copy()
    for row, value in values.items():
        columns["pixel_values"][row, 0, 0, 0] = value
    return datasets.Dataset.from_dict(columns, features=data.features).with_format("torch")


NON_FINITE_DATA = [
    ({"train": {40: float("nan"), 5: float("nan"), 7: float("inf")}},
     ["train split has NaN or infinite pixel_values in 3 row(s): rows [5, 7, 40]", "dataset.filter"]),
    ({"test": {3: float("-inf")}}, ["test split has NaN or infinite pixel_values in 1 row(s): rows [3]"]),
]  # fmt: skip


@pytest.mark.parametrize(("values", "words"), NON_FINITE_DATA, ids=["nan_train_rows", "infinite_eval_row"])
def test_non_finite_input_rows_are_refused_before_training(tiny_model, digits, make_config, values, words):
    """NaN or infinite pixels used to pass the dense pass unnoticed; training then went NaN and the stop
    blamed the learning rate. The dense pass now names the split and the rows."""
    from hf_ceag import CEAGTrainer

    train, test = (_non_finite_pixels(digits[s], values.get(s, {})) for s in ("train", "test"))
    config = make_config(mitigation="ceag")
    trainer = CEAGTrainer(tiny_model, config, train_dataset=train, eval_dataset={"test": test})
    with pytest.raises(ValueError) as error:
        trainer.train()
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert trainer.state.global_step == 0
    assert not os.path.exists(os.path.join(config.output_dir, "dense_reference.json"))  # no reference either


def test_a_last_batch_of_one_row_with_batch_norm_is_refused_when_the_trainer_is_built(
    tiny_model, digits, make_config
):
    """33 rows in batches of 32 leave a batch of one row, on which BatchNorm cannot train: the run used to fail
    with torch's "Expected more than 1 value per channel" at the end of the first epoch, after the dense pass."""
    from hf_ceag import CEAGTrainer

    train = digits["train"].select(range(33))
    config = make_config(max_steps=-1, num_train_epochs=1, mitigation="none")
    with pytest.raises(ValueError) as error:
        CEAGTrainer(tiny_model, config, train_dataset=train).train()
    for word in ("33 rows leave a last batch of 1 row", "per_device_train_batch_size=32", "BatchNorm",
                 "dataloader_drop_last=True", "another per_device_train_batch_size (e.g. 31 or 33)"):  # fmt: skip
        assert word in str(error.value), (word, str(error.value))
    assert not os.path.exists(os.path.join(config.output_dir, "dense_reference.json"))  # before the dense pass
    nft = {"mitigation": "none"}
    CEAGTrainer(tiny_model, make_config(max_steps=-1, num_train_epochs=1, dataloader_drop_last=True, **nft),
                train_dataset=train)  # fmt: skip
    CEAGTrainer(tiny_model, make_config(max_steps=1, **nft), train_dataset=train)  # ends before the last batch
    with pytest.raises(ValueError, match="per_device_train_batch_size=1: every training batch holds one row"):
        CEAGTrainer(tiny_model, make_config(per_device_train_batch_size=1, **nft), train_dataset=train)


def test_an_already_sparse_parent_is_named_in_a_warning_the_report_and_the_card(tiny_model, digits, make_config):
    """A 90 %-sparse model passed as the dense parent used to be accepted without a word, and its card said
    "pruned from a dense model"."""
    import json

    from hf_ceag import CEAGTrainer
    from hf_ceag.pruning.magnitude import MagnitudePruner, prunable_parameters

    parameters = prunable_parameters(tiny_model, True)
    MagnitudePruner(parameters, "layerwise", gradient_hooks=False).prune_to(0.9)
    config = make_config(mitigation="none")
    trainer = CEAGTrainer(tiny_model, config, train_dataset=digits["train"])
    with pytest.warns(UserWarning, match=r"already 90\.0 % sparse .*not a dense model"):
        trainer.train()
    trainer.save_model()
    with open(os.path.join(config.output_dir, "report.json")) as f:
        assert json.load(f)["dense_parent_sparsity"] == pytest.approx(0.9, abs=1e-3)
    with open(os.path.join(config.output_dir, "README.md")) as f:
        card = f.read()
    assert "pruned from a model that was already 90.0 % sparse" in card and "a dense model" not in card
