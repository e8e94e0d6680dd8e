"""The README cannot drift: its commands are the ones CI and the tests run, and its Python example runs.

The commands and snippets of docs/ and CHANGELOG.md, and the README's shape and links: test_docs.py."""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_quickstart_commands_are_the_ones_ci_and_tests_run():
    bash = [block.strip() for block in code_blocks("bash")]
    run_default, run_tests = bash[0], bash[1]
    assert run_default.endswith("python scripts/run_ceag.py")  # exercised by test_end_to_end.py
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci.splitlines()


def test_cli_example_flags_exist():
    from transformers import HfArgumentParser

    from hf_ceag import CEAGConfig
    from scripts.run_ceag import RECIPE_DEFAULTS, ScriptArguments  # noqa: F401

    parser = HfArgumentParser((ScriptArguments, CEAGConfig))
    example = code_blocks("bash")[2].replace("\\\n", " ").split()
    args = example[example.index("scripts/run_ceag.py") + 1 :]
    script, config = parser.parse_args_into_dataclasses(args=args)
    assert script.dataset_name == "imagefolder" and config.group_columns == ["tone"]


def test_python_example_runs_and_its_folder_is_pipeline_ready(tmp_path, check_pipeline):
    """The README's Python example, shortened: it prints a per-group table, and `pipeline` on the folder it saves
    gives the model's own predictions on real digit images (it used to keep timm's default preprocessing and
    call every image the same class)."""
    code = code_blocks("python")[0]
    assert "Trainer(model=model, args=dense" in code  # the example prunes a trained model, not a random one
    assert "processing_class" not in code  # the digits loader's preprocessing is known: nothing to pass
    code = code.replace("copies=2", "copies=1").replace("num_train_epochs=15", "num_train_epochs=3")
    code = code.replace("num_train_epochs=12", "max_steps=6").replace(
        "pruning_end_epoch=3", "pruning_end_epoch=0.1"
    )
    printed = []
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"print": printed.append})  # noqa: S102 (the README's own snippets)
    finally:
        os.chdir(cwd)
    table = printed[-1]
    assert "[train]" in table and "[test]" in table and re.search(r"^  inverted +\d+ ", table, flags=re.MULTILINE)
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from hf_ceag.data.images import digits_pixel_values

    digits = load_digits().images[:60]
    images = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L") for image in digits]
    check_pipeline(tmp_path / "out" / "sparse", images, digits_pixel_values(digits, 16), atol=0.02)

    # a grey image through the saved processor, as the card's "How to load" says (convert it to RGB first): the
    # trained model's own prediction; without the conversion the processor used to raise a shape error
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = tmp_path / "out" / "sparse"
    card = (folder / "README.md").read_text()
    assert '.convert("RGB")' in card
    images[0].save(tmp_path / "digit.png")
    processor = AutoImageProcessor.from_pretrained(str(folder))
    inputs = processor(Image.open(tmp_path / "digit.png").convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        logits = AutoModelForImageClassification.from_pretrained(str(folder)).eval()(**inputs).logits
    from hf_ceag import load_classifier

    with torch.no_grad():  # the model as trained (1 channel) on the float digit: the same output, up to 8-bit
        own = load_classifier(str(folder)).eval()(pixel_values=digits_pixel_values(digits[:1], 16)).logits
    torch.testing.assert_close(logits.softmax(-1), own.softmax(-1), rtol=0, atol=0.02)


def test_audit_command_parses():
    import audit
    from transformers import HfArgumentParser

    from scripts.run_ceag import DataArguments

    line = next(b for b in code_blocks("bash") if "scripts/audit.py" in b).split()
    parsed, data = HfArgumentParser((audit.AuditArguments, DataArguments)).parse_args_into_dataclasses(
        args=line[line.index("scripts/audit.py") + 1 :]
    )
    assert parsed.sparse_model.endswith("ceag") and data.dataset_name is None  # run by test_end_to_end.py


def test_reproduce_lines_are_among_the_parsed_recipe_commands():
    recipes = (ROOT / "configs" / "README.md").read_text()
    block = next(b for b in code_blocks("bash") if "configs/" in b)
    for line in block.strip().splitlines():
        assert line in recipes  # tests/test_recipes.py parses every command of configs/README.md


def test_help_lists_every_config_field_and_method(capsys):
    """`--help` (how users find flags) lists the project's own flags; `--help_all` every flag the script takes,
    TrainingArguments' included. Both must print (a bare % once crashed it)."""
    import dataclasses

    import pytest

    from hf_ceag import CEAGConfig
    from hf_ceag.ceag_config import MITIGATIONS
    from scripts import run_ceag
    from scripts.run_ceag import ScriptArguments

    texts = {}
    for flag in ("--help", "--help_all"):
        with pytest.raises(SystemExit) as exit:
            run_ceag.main([flag])
        assert exit.value.code in (0, None)
        texts[flag] = capsys.readouterr().out
    every = [f.name for dtype in (ScriptArguments, CEAGConfig) for f in dataclasses.fields(dtype) if f.init]
    own = [f.name for f in dataclasses.fields(ScriptArguments)]
    own += [f.name for f in dataclasses.fields(CEAGConfig) if f.name in CEAGConfig.__annotations__]
    assert len(every) > 100 and len(own) > 30
    for text, names in ((texts["--help_all"], every), (texts["--help"], own)):
        missing = [name for name in names if f"--{name}" not in text]
        assert not missing, missing
        for method in MITIGATIONS:
            assert method in text
    assert len(texts["--help"].splitlines()) * 3 < len(texts["--help_all"].splitlines())


def test_results_table_is_the_benchmarks_part_0_summary():
    """The README's results are written by scripts/benchmark.py: the same table as BENCHMARKS.md's part 0."""
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    start = "<!-- default-results: generated by scripts/benchmark.py, do not edit -->"
    block = README[README.index(start) : README.index("<!-- /default-results -->")]
    table = [line for line in block.splitlines() if line.startswith("|")]
    assert len(table) >= 3  # header, rule, one line per thread count
    part0 = benchmarks[benchmarks.index("## 0. ") : benchmarks.index("## 1. ")]
    assert "\n".join(table) in part0
    assert re.search(r"at commit [0-9a-f]{7}", block)
