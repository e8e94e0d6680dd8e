"""Paper recipes: the UTKFace / FairFace / CIFAR-100 loaders on look-alike data generated here, the CIFAR
ResNet-56, and every file in configs/ parsed and run for a few CPU steps with a scaled-down override."""

import contextlib
import csv
import dataclasses
import math
import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageClassification, HfArgumentParser

from hf_ceag import CEAGConfig, CEAGTrainer, build_classifier, load_classifier
from hf_ceag.data import face_datasets as fd
from hf_ceag.data.recipes import RECIPE_DATASETS, load_recipe_data

run_ceag = pytest.importorskip("scripts.run_ceag")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MAIN_CONFIGS = ["utkface_race", "utkface_race_gender", "fairface_race", "fairface_race_gender", "cifar100"]
UTK_RACES = ["White", "Black", "Asian", "Indian", "Others"]
FF_RACES = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
HUB_RACES = ["East Asian", "Indian", "Black", "White", "Middle Eastern", "Latino_Hispanic", "Southeast Asian"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # These tiny models spend their time in thread synchronisation, not arithmetic: with a second thread on a
    # busy 2-core machine the module ran ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_image(path, seed, size=12):
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def utkface_files(tmp_path_factory):
    """40 well-named images (4 per race × gender) and 5 bad files: 3 malformed names, 2 unreadable images."""
    root = tmp_path_factory.mktemp("UTKFace")
    good = []
    for i in range(40):
        race, gender = i % 5, (i // 5) % 2
        suffix = ".jpg.chip.jpg" if i % 3 else ".jpg"
        good.append(f"{20 + i}_{gender}_{race}_2017010{i:04d}{suffix}")
        save_image(root / good[-1], i)
    save_image(root / "61_1_20170109150557335.jpg.chip.jpg", 100)  # race missing, as in the real release
    save_image(root / "30_1_7_20170101000000.jpg", 101)  # race 7 does not exist
    (root / "notes.txt").write_text("not an image")
    (root / "30_1_2_20170102000000.jpg").write_bytes(b"not a jpeg")
    whole = (root / good[0]).read_bytes()
    (root / "31_0_1_20170103000000.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    return root, good


@pytest.fixture(scope="module")
def utkface_dir(utkface_files):
    return utkface_files[0]


def expected_utkface_groups(good_names):
    """(race, gender) counts parsed from the names the test wrote, independently of the loader."""
    return Counter((int(name.split("_")[2]), int(name.split("_")[1])) for name in good_names)


@pytest.fixture(scope="module")
def fairface_dir(tmp_path_factory):
    """FairFace-style folder: 28 train rows (2 per race × gender) + one whose image is missing, 14 val rows."""
    root = tmp_path_factory.mktemp("fairface")
    for split, per_cell in (("train", 2), ("val", 1)):
        (root / split).mkdir()
        rows, i = [], 0
        for race in FF_RACES:
            for gender in ("Male", "Female"):
                for _ in range(per_cell):
                    i += 1
                    save_image(root / split / f"{i}.jpg", 1000 * (split == "val") + i)
                    rows.append({"file": f"{split}/{i}.jpg", "age": "20-29", "gender": gender, "race": race})
        if split == "train":
            rows.append({"file": "train/missing.jpg", "age": "3-9", "gender": "Male", "race": "White"})
        with open(root / f"fairface_label_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "age", "gender", "race", "service_test"])
            writer.writeheader()
            writer.writerows({**row, "service_test": "True"} for row in rows)
    return root


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fake_hub(monkeypatch, calls):
    """Stand-ins for the Hub datasets with their real column names and ClassLabel orders."""

    def images(n):
        return [Image.fromarray(np.full((8, 8, 3), 10 * (i % 25), dtype=np.uint8)) for i in range(n)]

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if path == "HuggingFaceM4/FairFace":
            features = datasets.Features(
                {
                    "image": datasets.Image(),
                    "age": datasets.ClassLabel(names=["0-2", "3-9", "20-29"]),
                    "gender": datasets.ClassLabel(names=["Male", "Female"]),
                    "race": datasets.ClassLabel(names=HUB_RACES),
                    "service_test": datasets.Value("bool"),
                }
            )
            split = {"image": images(28), "age": [2] * 28, "gender": [i % 2 for i in range(28)]}
            split |= {"race": [i % 7 for i in range(28)], "service_test": [True] * 28}
            ds = datasets.Dataset.from_dict(split, features=features)
            return datasets.DatasetDict({"train": ds, "validation": ds})
        assert path == "uoft-cs/cifar100"
        features = datasets.Features(
            {
                "img": datasets.Image(),
                "fine_label": datasets.ClassLabel(names=[f"class_{i}" for i in range(100)]),
                "coarse_label": datasets.ClassLabel(names=[f"super_{i}" for i in range(20)]),
            }
        )
        split = {"img": images(200), "fine_label": [i % 100 for i in range(200)]}
        ds = datasets.Dataset.from_dict(split | {"coarse_label": [i % 20 for i in range(200)]}, features=features)
        return datasets.DatasetDict({"train": ds, "test": ds.select(range(100))})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


# ---- loaders ----


@pytest.mark.parametrize("group_by", ["race", "race_gender"])
def test_utkface_parses_groups_skips_and_counts_bad_files(utkface_files, group_by):
    utkface_dir, good_names = utkface_files
    with pytest.warns(UserWarning) as record:
        data = fd.load_utkface(str(utkface_dir), group_by=group_by, image_size=8, test_size=0.2, seed=3)
    messages = " ".join(str(w.message) for w in record)
    assert "Skipped 3 file(s)" in messages and "61_1_20170109150557335.jpg.chip.jpg" in messages
    assert "Skipped 2 file(s)" in messages and "not a readable image" in messages

    expected = expected_utkface_groups(good_names)
    assert sum(expected.values()) == 40
    assert (len(data["train"]), len(data["test"])) == (40 - math.ceil(0.2 * 40), math.ceil(0.2 * 40))
    columns = ["race"] if group_by == "race" else ["race", "gender"]
    assert data["train"].column_names == ["image", "label", *columns]
    found = Counter()
    for split in data.values():
        raw = split.with_format(None)
        assert raw["label"] == raw["race"]
        genders = raw["gender"] if group_by == "race_gender" else [None] * len(raw)
        found.update(zip(raw["race"], genders))
    if group_by == "race_gender":
        assert found == expected
        assert data["train"].features["gender"].names == ["Male", "Female"]
    else:
        assert found == Counter({(race, None): 8 for race in range(5)})
    assert data["train"].features["race"].names == UTK_RACES
    row = data["test"][0]
    assert tuple(row["pixel_values"].shape) == (3, 8, 8) and row["pixel_values"].dtype == torch.float32
    again = fd.load_utkface(str(utkface_dir), group_by=group_by, image_size=8, test_size=0.2, seed=3)
    assert again["test"].with_format(None)["image"] == data["test"].with_format(None)["image"]


def test_utkface_rejects_a_folder_without_valid_names(tmp_path):
    save_image(tmp_path / "face.jpg", 0)
    save_image(tmp_path / "25_1_20170104231305129.jpg", 1)
    with pytest.raises(ValueError, match=r"No UTKFace image in .*age_gender_race_datetime\.jpg.*2 malformed"):
        fd.load_utkface(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        fd.load_utkface(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="group_by='age'"):
        fd.load_utkface(str(tmp_path), group_by="age")


def test_fairface_from_csv_files(fairface_dir):
    with pytest.warns(UserWarning, match=r"Skipped 1 file\(s\).*missing.*train/missing.jpg"):
        data = fd.load_fairface(str(fairface_dir), group_by="race_gender", image_size=8)
    for split, csv_name in (("train", "fairface_label_train.csv"), ("test", "fairface_label_val.csv")):
        rows = [r for r in read_csv_rows(fairface_dir / csv_name) if "missing" not in r["file"]]
        raw = data[split].with_format(None)
        assert len(raw) == len(rows)
        assert raw["label"] == raw["race"] == [FF_RACES.index(r["race"]) for r in rows]
        assert raw["gender"] == [["Male", "Female"].index(r["gender"]) for r in rows]
    assert data["train"].features["race"].names == FF_RACES
    assert tuple(data["train"][0]["pixel_values"].shape) == (3, 8, 8)
    race_only = fd.load_fairface(str(fairface_dir), group_by="race", image_size=8)
    assert race_only["test"].column_names == ["image", "label", "race"]


def test_fairface_rejects_bad_rows_and_missing_csvs(tmp_path, fairface_dir):
    with pytest.raises(ValueError, match="has no fairface_label_train.csv"):
        fd.load_fairface(str(tmp_path))
    for name in ("fairface_label_train.csv", "fairface_label_val.csv"):
        text = (fairface_dir / name).read_text().replace("Southeast Asian", "Martian")
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"unknown race or gender.*Martian"):
        fd.load_fairface(str(tmp_path))


def test_hub_loaders_map_labels_by_name(monkeypatch):
    calls = []
    fake_hub(monkeypatch, calls)
    data = load_recipe_data("fairface", None, ["race", "gender"], image_size=8, test_size=0.2, seed=0)
    assert calls == [("HuggingFaceM4/FairFace", "0.25")]
    raw = data["train"].with_format(None)
    assert raw["label"] == raw["race"] == [FF_RACES.index(HUB_RACES[i % 7]) for i in range(28)]
    assert data["test"].column_names == ["image", "label", "race", "gender"]
    assert data["train"].features["race"].names == FF_RACES

    cifar = load_recipe_data("uoft-cs/cifar100", None, ["fine_label"], image_size=8, test_size=0.2, seed=0)
    raw = cifar["train"].with_format(None)
    assert raw["label"] == raw["fine_label"] == [i % 100 for i in range(200)]
    assert cifar["train"].features["label"].names[7] == "class_7"
    assert tuple(cifar["test"][0]["pixel_values"].shape) == (3, 8, 8)
    with pytest.raises(ValueError, match="use \\['fine_label'\\]"):
        load_recipe_data("uoft-cs/cifar100", None, ["coarse_label"], 8, 0.2, 0)


def test_load_recipe_data_routes_only_its_datasets(utkface_dir):
    assert load_recipe_data("imagefolder", "x", ["group"], 8, 0.2, 0) is None
    assert load_recipe_data(None, None, ["group"], 8, 0.2, 0) is None
    with pytest.raises(ValueError, match=r"group_columns=\['skin'\] is not a grouping of utkface"):
        load_recipe_data("utkface", str(utkface_dir), ["skin"], 8, 0.2, 0)
    with pytest.raises(ValueError, match="needs --data_dir"):
        load_recipe_data("utkface", None, ["race"], 8, 0.2, 0)


# ---- CIFAR ResNet-56 ----


def resnet56_parameter_count(num_classes):
    """1 + 2·27 convs (3×3, no bias), a BN after each, one linear layer; option-A shortcuts have no weights."""
    convs = 3 * 16 * 9
    bns = 16
    for in_ch, width in ((16, 16), (16, 32), (32, 64)):
        convs += in_ch * width * 9 + 17 * width * width * 9
        bns += 18 * width
    return convs + 2 * bns + 64 * num_classes + num_classes


def test_cifar_resnet56_depth_training_and_reload(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("cifar_resnet56", num_labels=10, channels=3, image_size=32)
    modules = list(model.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in modules) == 55
    assert sum(isinstance(m, torch.nn.Linear) for m in modules) == 1
    assert sum(p.numel() for p in model.parameters()) == resnet56_parameter_count(10) == 853018
    features = model.timm_model.forward_features(torch.zeros(1, 3, 32, 32))
    assert tuple(features.shape) == (1, 64, 8, 8)

    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    before = model.timm_model.stages[1][0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.timm_model.stages[1][0].conv1.weight)

    model.save_pretrained(tmp_path / "resnet56")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resnet56", use_safetensors=True)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, reloaded(pixel_values=x).logits)
    with pytest.raises(ValueError, match="no pretrained weights"):
        __import__("timm").create_model("cifar_resnet56", pretrained=True)


# ---- config files ----


def parse(path):
    from scripts.run_ceag import ScriptArguments

    return HfArgumentParser((ScriptArguments, CEAGConfig)).parse_yaml_file(str(path))


# Typed from the reference implementation's settings (the paper's code), not read from the files.
PAPER_COLUMNS = ("model", "image_size", "epochs", "batch", "lr", "optim_args", "sparsity", "tolerance", "dual_lr")
PAPER_ROWS = {
    "utkface": ("mobilenetv2_100", 200, 60, 128, 0.01, "momentum=0.9", 0.9, 0.01, 1e-4),
    "fairface": ("resnet34", 224, 47, 256, 1e-3, "momentum=0.95,nesterov=True", 0.99, 0.01, 1e-4),
    "cifar100": ("cifar_resnet56", 32, 50, 128, 0.01, "momentum=0.9", 0.925, 0.1, 1e-2),
}
PAPER = {name: dict(zip(PAPER_COLUMNS, row)) for name, row in PAPER_ROWS.items()}
GROUPS = {"race": ["race"], "race_gender": ["race", "gender"], "cifar100": ["fine_label"]}


def test_config_folder_holds_a_main_and_an_el_file_per_setting():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert names == sorted(MAIN_CONFIGS + [f"{n}_el" for n in MAIN_CONFIGS])


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_main_configs_hold_the_paper_settings(name):
    script, config = parse(CONFIG_DIR / f"{name}.yaml")
    paper = PAPER[name.split("_")[0]]
    assert script.dataset_name in RECIPE_DATASETS and script.model_name_or_path == paper["model"]
    assert script.image_size == paper["image_size"] and script.methods == ["none", "ceag", "equalized_loss"]
    assert config.group_columns == GROUPS[name.split("_", 1)[-1]]
    assert (config.num_train_epochs, config.per_device_train_batch_size) == (paper["epochs"], paper["batch"])
    assert (config.optim, config.learning_rate, config.optim_args) == ("sgd", paper["lr"], paper["optim_args"])
    assert (config.target_sparsity, config.tolerance, config.dual_lr) == (
        paper["sparsity"],
        paper["tolerance"],
        paper["dual_lr"],
    )
    assert (config.buffer_size, config.pruning_scope, config.pruning_start_epoch) == (40, "layerwise", 0.0)
    assert config.pruning_end_epoch == 15.0 and config.initial_sparsity == 0.0
    assert config.keep_first_last_dense and not config.mitigate_during_pruning
    assert not config.remove_unused_columns and config.output_dir == f"outputs/{name}"
    if name.startswith("utkface"):
        assert script.test_size == 0.2


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_el_config_differs_from_its_main_config_only_where_it_must(name):
    main = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    el = yaml.safe_load((CONFIG_DIR / f"{name}_el.yaml").read_text())
    changed = {k for k in main.keys() | el.keys() if main.get(k) != el.get(k)}
    assert changed == {"methods", "buffer_size", "output_dir", "model_name_or_path"}
    assert (el["methods"], el["buffer_size"]) == (["equalized_loss"], 0)
    assert el["model_name_or_path"] == f"{main['output_dir']}/dense" and el["output_dir"] != main["output_dir"]
    script, config = parse(CONFIG_DIR / f"{name}_el.yaml")
    assert script.methods == ["equalized_loss"] and config.buffer_size == 0


@pytest.mark.parametrize("dataset", ["utkface", "fairface"])
def test_intersectional_configs_change_only_the_groups(dataset):
    race = yaml.safe_load((CONFIG_DIR / f"{dataset}_race.yaml").read_text())
    both = yaml.safe_load((CONFIG_DIR / f"{dataset}_race_gender.yaml").read_text())
    assert {k for k in race if race[k] != both[k]} == {"group_columns", "output_dir"}


def recipe_data(name, utkface_dir, fairface_dir, monkeypatch, script, config):
    if name.startswith("cifar100"):
        fake_hub(monkeypatch, [])
        data_dir = None
    else:
        data_dir = str(utkface_dir if name.startswith("utkface") else fairface_dir)
    script = dataclasses.replace(script, image_size=8, data_dir=data_dir)
    with pytest.warns(UserWarning, match="Skipped") if data_dir else contextlib.nullcontext():
        data, channels = run_ceag.load_data(script, config)  # the CLI's own routing to the recipe loaders
    assert channels == 3
    return script, data


def scaled_down(config, out, train_rows):
    """Sizes only: 2 steps of 8 images, target sparsity after step 1 so step 2 is constrained, tiny buffers."""
    return dataclasses.replace(
        config,
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=128,
        pruning_end_epoch=1 / math.ceil(train_rows / 8),
        pruning_frequency=1,
        buffer_size=min(config.buffer_size, 2),
        dataloader_num_workers=0,
        logging_steps=1,
        disable_tqdm=True,
        allow_weak_dense_model=True,  # its dense model trained for 2 steps
    )


def prune(dense_dir, config, mitigation, data):
    model = load_classifier(dense_dir)
    args = dataclasses.replace(config, mitigation=mitigation)
    trainer = CEAGTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset={"test": data["test"]})
    trainer.train()
    return trainer, trainer.group_report()


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_each_recipe_trains_dense_and_prunes_a_few_steps(name, utkface_dir, fairface_dir, monkeypatch, tmp_path):
    """Every config file with its own loader, model, optimizer, schedule and constraint settings; sizes scaled
    down. The main file trains the dense model and prunes it with CEAG; its _el file prunes that model with EL."""
    script, config = parse(CONFIG_DIR / f"{name}.yaml")
    script, data = recipe_data(name, utkface_dir, fairface_dir, monkeypatch, script, config)
    config = scaled_down(config, tmp_path / name, len(data["train"]))
    dense_dir = run_ceag.dense_model(script, config, data, 3)
    assert Path(dense_dir, "model.safetensors").exists()
    trainer, report = prune(dense_dir, config, "ceag", data)

    assert trainer.model.config.architecture == PAPER[name.split("_")[0]]["model"]
    group = trainer.optimizer.param_groups[0]
    momentum = float(re.search(r"momentum=([\d.]+)", config.optim_args).group(1))
    assert group["momentum"] == momentum and group["nesterov"] == ("nesterov=True" in config.optim_args)
    for weight_name, weight in trainer.pruner.parameters.items():
        assert int((weight == 0).sum()) == round(config.target_sparsity * weight.numel()), weight_name
    assert trainer.problem is not None and trainer.constraints_active
    groups = {"utkface_race": 5, "utkface_race_gender": 10, "fairface_race": 7, "fairface_race_gender": 14}
    groups = groups.get(name, 100)
    assert len(report["splits"]["train"]["groups"]) == groups
    assert report["splits"]["train"]["n"] == len(data["train"]) and report["method"] == "ceag"

    el_script, el_config = parse(CONFIG_DIR / f"{name}_el.yaml")
    el_config = scaled_down(el_config, tmp_path / f"{name}_el", len(data["train"]))
    _, el_report = prune(dense_dir, el_config, el_script.methods[0], data)
    assert el_report["method"] == "el" and len(el_report["splits"]["train"]["groups"]) == groups


def test_recipe_file_with_overrides_runs_through_the_cli(utkface_dir, tmp_path):
    import json

    from hf_ceag.audit.report import finite_or_none
    from scripts import run_ceag

    out = tmp_path / "utk"
    reports = run_ceag.main(
        [
            str(CONFIG_DIR / "utkface_race_gender.yaml"), "--data_dir", str(utkface_dir), "--model_name_or_path", "test_resnet",
            "--image_size", "16", "--dense_epochs", "1", "--allow_weak_dense_model", "true", "--num_train_epochs", "2", "--pruning_end_epoch", "1",
            "--per_device_train_batch_size", "8", "--pruning_frequency", "1", "--buffer_size", "2",
            "--dataloader_num_workers", "0", "--methods", "ceag", "--output_dir", str(out), "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    saved = json.loads((out / "ceag" / "report.json").read_text())
    assert saved["splits"] == json.loads(json.dumps(finite_or_none(reports["ceag"]["splits"])))  # NaN: null
    names = {g["name"] for g in saved["splits"]["train"]["groups"]}
    assert len(names) == 10 and all(" & " in n for n in names)  # race × gender
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("bogus: 1\n")
        run_ceag.parse_arguments(
            run_ceag.HfArgumentParser((run_ceag.ScriptArguments, run_ceag.CEAGConfig)), [str(bad)]
        )


def test_configs_readme_commands_parse():
    import re
    import shlex

    from scripts import run_ceag

    text = (CONFIG_DIR / "README.md").read_text()
    lines = [
        line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL) for line in block.splitlines()
    ]
    commands = [shlex.split(line) for line in lines if "scripts/run_ceag.py" in line]
    assert len(commands) == 20
    for words in commands:
        args = words[words.index("scripts/run_ceag.py") + 1 :]
        parser = run_ceag.HfArgumentParser((run_ceag.ScriptArguments, run_ceag.CEAGConfig))
        parser.set_defaults(**run_ceag.RECIPE_DEFAULTS)
        script, config = run_ceag.parse_arguments(parser, [str(CONFIG_DIR.parent / args[0]), *args[1:]])
        assert config.output_dir.startswith("outputs/") and script.methods


def test_extra_timm_architectures_are_registered_explicitly_not_on_import():
    """No import-time side effect: importing hf_ceag (recipes and models included) leaves timm's registry alone;
    `register_timm_models()` adds `cifar_resnet56`, and a second call changes nothing (timm would warn)."""
    import subprocess
    import sys

    code = (
        "import warnings, timm, hf_ceag, hf_ceag.data.recipes, hf_ceag.models.cifar_resnet\n"
        "assert not timm.is_model('cifar_resnet56')\n"
        "warnings.simplefilter('error')\n"
        "hf_ceag.register_timm_models(); hf_ceag.register_timm_models()\n"
        "assert timm.is_model('cifar_resnet56')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
