"""The parts of hf_ceag/benchmarks on their own, from hand-made results (no training): the flags and their
checks, the markdown of each part of BENCHMARKS.md, and the files the benchmark rewrites (README block, device
sections)."""

import pytest

from hf_ceag.benchmarks.default_run import default_claims, default_section
from hf_ceag.benchmarks.device import device_section, device_values
from hf_ceag.benchmarks.document import (
    DEVICE_END,
    DEVICE_START,
    README_END,
    README_START,
    device_block,
    headline,
    merge_device_section,
    readme_results,
    update_readme,
)
from hf_ceag.benchmarks.formatting import cell, percent
from hf_ceag.benchmarks.memory import memory_section
from hf_ceag.benchmarks.methods import method_reading, method_table
from hf_ceag.benchmarks.overhead import overhead_section
from hf_ceag.benchmarks.profiling import device_profile_markdown, profile_markdown
from hf_ceag.benchmarks.recipe import Recipe
from hf_ceag.benchmarks.scaling import fairgrape_markdown
from hf_ceag.benchmarks.settings import parse_settings
from hf_ceag.benchmarks.timing import StepTimer, paired_ratio
from scripts import run_ceag


@pytest.fixture(scope="module")
def recipe():
    return Recipe.from_module(run_ceag)


@pytest.fixture(scope="module")
def quick(recipe):
    settings, extra = parse_settings(["--quick", "--bf16", "true"], recipe)
    assert extra == ["--bf16", "true"]  # left for the recipe's parser
    return settings


def test_settings_take_the_recipe_and_quick_defaults_and_refuse_what_cannot_be_timed(recipe, quick):
    full, _ = parse_settings([], recipe)
    assert full.epochs == run_ceag.RECIPE_DEFAULTS["num_train_epochs"]
    assert full.dense_epochs == run_ceag.ScriptArguments.dense_epochs
    assert quick.epochs == 4 and quick.methods == ["nft", "ceag"] and quick.groups == [10, 10000]
    assert parse_settings(["--quick", "--repeats", "7"], recipe)[0].repeats == 7
    with pytest.raises(ValueError, match="--overhead_steps must exceed --warmup_steps=5"):
        parse_settings(["--quick", "--overhead_steps", "5"], recipe)
    with pytest.raises(ValueError, match=r"--sparsities \[1.0\]"):
        parse_settings(["--quick", "--sparsities", "1.0"], recipe)
    with pytest.raises(ValueError, match="--groups and --fairgrape_groups"):
        parse_settings(["--quick", "--fairgrape_groups", "0"], recipe)


def test_recipe_refuses_a_missing_script(recipe):
    with pytest.raises(ValueError, match="Recipe.script"):
        Recipe(recipe.defaults, recipe.arguments, len, len, len, script="/nonexistent/run_ceag.py")


def test_cells_give_mean_and_std_over_seeds():
    assert cell([0.5], 3) == "0.500"
    assert cell([0.01, 0.03], 3, signed=True) == "+0.020 ± 0.014"
    assert percent(0.975) == "97.5%" and percent(0.9) == "90%"


def _default_row(seed, nft_train, ceag_train, nft_acc, ceag_acc):
    def method(train_max, accuracy):
        return {"train_max": train_max, "test_max": train_max + 0.01, "test_accuracy": accuracy, "min_train_n": 20}

    return {
        "threads": 1,
        "seed": seed,
        "seconds": 42.0,
        "tolerance": 0.01,
        "nft": method(nft_train, nft_acc),
        "ceag": method(ceag_train, ceag_acc),
    }


def test_default_section_counts_each_claim_per_thread_count(quick):
    good = _default_row(0, nft_train=0.05, ceag_train=0.008, nft_acc=0.90, ceag_acc=0.895)
    costly = _default_row(1, nft_train=0.05, ceag_train=0.008, nft_acc=0.90, ceag_acc=0.85)
    assert all(default_claims(good).values())
    assert default_claims(costly) == {"nft_over_2eps": True, "ceag_within_eps": True, "accuracy_within_1pt": False}
    text = default_section(quick, [good, costly])
    assert text.startswith("## 0. The default run, as a user runs it")
    assert "--digits_variant imbalanced" in text and "ε = 0.01" in text and "has 20 rows" in text
    (summary,) = [line for line in text.splitlines() if line.startswith("| 1 | 2 |")]
    assert summary.endswith("| 2/2 | 2/2 | 1/2 | 1/2 |")
    assert "| +0.050 ± 0.000 |" in summary
    assert [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| 1 | ")][1:] == ["0", "1"]


def _method_run(method, seed, train_max, accuracy, sparsity=0.975):
    return {
        "variant": "styled",
        "seed": seed,
        "sparsity": sparsity,
        "method": method,
        "tolerance": 0.01,
        "test_accuracy": accuracy,
        "train_max": train_max,
        "test_max": train_max + 0.02,
        "train_spread": 0.04,
        "violated_fraction": 0.5,
        "seconds": 10.0 if method == "nft" else 12.0,
        "min_test_n": 50,
        "max_multiplier": 0.0,
        "dual_steps": 0,
    }


def test_method_table_and_reading_from_hand_made_runs():
    runs = [
        _method_run("nft", 0, 0.04, 0.90),
        _method_run("nft", 1, 0.06, 0.92),
        _method_run("ceag", 0, 0.005, 0.89),
        _method_run("ceag", 1, 0.02, 0.91),
    ]
    table = method_table(runs).splitlines()
    assert table[2] == (
        "| styled | 97.5% | NFT | 0.910 ± 0.014 | +0.050 ± 0.014 | +0.070 ± 0.014 | 0.040 ± 0.000 "
        "| 0.50 ± 0.00 | 0/2 | 0.00 ± 0.00 | 10.0 ± 0.0 |"
    )
    assert table[3].startswith("| styled | 97.5% | CEAG | 0.900 ± 0.014 |") and "| 1/2 |" in table[3]
    reading = method_reading(runs)
    assert reading[0] == "Train max ψ_g ≤ ε (ε = 0.01) held in NFT 0/2, CEAG 1/2 runs — most often for CEAG."
    assert "CEAG's mean train max ψ_g stayed above ε in: styled 97.5%." in reading
    assert "A CEAG run took 1.20× the wall time of an NFT run on average." in reading
    assert reading[-1].startswith("The smallest test group has 50 images")


def test_a_run_is_timed_by_its_median_step_and_a_ratio_by_the_median_of_paired_rounds():
    timer = StepTimer(warmup=2)
    # step ends; after the warm-up (from the end of step 2) the steps take 1, 1, 9 (a stall), 2 and 1 s
    timer.times = [0.0, 5.0, 6.0, 7.0, 16.0, 18.0, 19.0]
    assert timer.step_seconds() == [1.0, 1.0, 9.0, 2.0, 1.0]
    assert timer.seconds_per_step() == 1.0  # the mean (2.8) would carry the stall
    # round 2 ran slow for both configurations: its ratio is as the others', while the medians' ratio shifts
    ceag, nft = [1.10, 2.25, 1.04], [1.00, 2.00, 1.01]
    ratio, rounds = paired_ratio(ceag, nft)
    assert rounds == pytest.approx([1.10, 1.125, 1.04 / 1.01]) and ratio == pytest.approx(1.10)
    with pytest.raises(ValueError, match="paired_ratio: 2 and 3 rounds"):
        paired_ratio([1.0, 1.0], nft)


def _overhead(compiled=False):
    median = {"plain": 0.010, "nft": 0.0101, "ceag": 0.0110}
    if compiled:
        median |= {"plain+compile": 0.008, "ceag+compile": 0.0084}
    ratios = {
        "ceag_over_nft": median["ceag"] / median["nft"],
        "nft_over_plain": median["nft"] / median["plain"],
        "ceag_over_plain": median["ceag"] / median["plain"],
    }
    if compiled:
        ratios["compiled_ceag_over_plain"] = median["ceag+compile"] / median["plain+compile"]
    return {
        "times": {kind: [seconds] for kind, seconds in median.items()},
        "median": median,
        **ratios,
        "paired": {key: [ratio - 0.02, ratio, ratio + 0.03] for key, ratio in ratios.items()},
        "rows": 1132,
        "batch": 64,
        "buffer_size": 64,
        "sparsity": 0.9,
        "profiles": {"ceag_over_nft": "PROFILE TABLES"},
    }


def test_overhead_section_gives_each_ratio_its_verdict(quick):
    text = overhead_section(quick, _overhead())
    assert text.startswith("## 2. Overhead per step")
    assert "| `transformers.Trainer` (plain fine-tuning) | 10.0 | 100.0 | 10.0 |" in text
    assert "- CEAG / NFT step time: **1.089** (target ≤ 1.05: MISSED; per round 1.069–1.119)" in text
    assert "- NFT / plain step time: **1.010** (target ≤ 1.03: met; per round 0.990–1.040)" in text
    assert "### Profile: ceag_over_nft missed its target\n\nPROFILE TABLES" in text
    assert "torch_compile" not in text


def test_device_section_from_hand_made_measurements(quick):
    over = _overhead(compiled=True)
    fairgrape = {
        3: {
            "backward_passes": 6,
            "importance_seconds": 0.05,
            "selection_seconds": 0.02,
            "magnitude_seconds": 0.01,
            "reference_selection_seconds": 0.3,
        }
    }
    values = device_values(over)
    assert values["compiled_ceag_over_plain"] == pytest.approx(1.05)
    measured = {"over": over, "fairgrape": fairgrape, "dense_seconds": 3.0}
    argv = ["--device_section", "--quick"]
    text = device_section(quick, argv, measured, 8.0, "abc1234", "nft_over_plain=1.010")
    assert text.startswith("## Measured on ")
    assert "- Command: `python scripts/benchmark.py --device_section --quick`" in text and "commit abc1234" in text
    assert "(3 s); run time 8 s" in text and "NFT/plain ≤ 1.01, CEAG/plain ≤ 1.03" in text
    assert "- CEAG / plain step time: **1.100** (target ≤ 1.03: MISSED; per round 1.080–1.130)" in text
    assert "- compiled CEAG / compiled plain step time: **1.050**" in text
    assert "the untimed steps at the start of each run hold the compilation" in text
    assert "| 3 | 6 | 0.05 | 0.02 | 0.07 | 1.00 | 0.0100 |" in text
    assert "speed-up **15.0×** (target ≥ 10×: met)" in text
    assert text.endswith("\n\n```\nnft_over_plain=1.010\n```\n")


def test_fairgrape_markdown_gives_each_count_its_ratio_to_the_fewest(quick):
    costs = {
        g: {"backward_passes": g, "importance_seconds": s, "selection_seconds": s, "magnitude_seconds": 0.001}
        for g, s in ((10, 0.5), (100, 1.5))
    }
    rows = [line for line in fairgrape_markdown(quick, costs).splitlines() if line.startswith("| 1")]
    assert rows == [
        "| 10 | 10 | 0.50 | 0.50 | 1.00 | 1.00 | 0.0010 |",
        "| 100 | 100 | 1.50 | 1.50 | 3.00 | 3.00 | 0.0010 |",
    ]


def test_memory_section_and_headline():
    peaks = {
        "nft": {"rss_before_mib": 500.0, "peak_rss_mib": 800.0},
        "ceag": {"rss_before_mib": 500.0, "peak_rss_mib": 840.0},
    }
    text = memory_section(peaks)
    assert "| CEAG | 500.0 | 840.0 | 340.0 |" in text and "GPU peak" not in text
    assert "- CEAG / NFT peak RSS: **1.050**" in text
    gpu = {m: v | {"gpu_peak_mib": 12.0} for m, v in peaks.items()}
    assert "| NFT | 500.0 | 800.0 | 300.0 | 12.0 |" in memory_section(gpu)
    scaling = {"ratio": {10: 1.0, 10000: 1.07}, "smallest": 10}
    values = headline(_overhead(), scaling, peaks)
    assert list(values) == ["ceag_over_nft", "nft_over_plain", "groups_10000_over_10", "ceag_rss_over_nft"]
    assert values["groups_10000_over_10"] == 1.07 and values["ceag_rss_over_nft"] == pytest.approx(1.05)


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    row = _default_row(0, nft_train=0.05, ceag_train=0.008, nft_acc=0.90, ceag_acc=0.895)
    block = readme_results(["--quick"], [row], "abc1234")
    assert block.startswith(README_START) and block.endswith(README_END)
    assert "From `python scripts/benchmark.py --quick` at commit abc1234" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{README_START}\nold\n{README_END}\n\nAfter.\n")
    update_readme(str(readme), block)
    assert readme.read_text() == f"# Title\n\n{block}\n\nAfter.\n"
    readme.write_text("# No block\n")
    with pytest.raises(ValueError, match="no .* block to update"):
        update_readme(str(readme), block)


def test_merge_device_section_appends_once_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Headline\n\nx=1\n")
    merge_device_section(str(path), "## Measured on GPU A\n\n- a\n")
    once = path.read_text()
    assert (
        once
        == f"# Benchmarks\n\n## Headline\n\nx=1\n\n{DEVICE_START}\n\n## Measured on GPU A\n\n- a\n\n{DEVICE_END}\n"
    )
    merge_device_section(str(path), "## Measured on GPU A\n\n- a\n")
    assert path.read_text() == once
    merge_device_section(str(path), "## Measured on GPU B\n\n- b")
    text = path.read_text()
    assert text.count(DEVICE_START) == 1 and text.index("GPU A") < text.index("GPU B")
    assert (
        device_block(text)
        == f"{DEVICE_START}\n\n## Measured on GPU A\n\n- a\n\n## Measured on GPU B\n\n- b\n\n{DEVICE_END}"
    )
    assert device_block("# Benchmarks\n") == ""


def test_profile_markdown_counts_the_method_not_the_benchmarks_own_timer():
    def entry(path, function, cumulative):
        return (path, 1, function), (1, 1, cumulative / 2, cumulative, {})

    stats = dict(
        [
            entry("/x/hf_ceag/constraints/step.py", "loss", 0.02),
            entry("/x/hf_ceag/constraints/replay_buffer.py", "loss", 0.5),  # another file's `loss`: not counted
            entry("/x/cooper/cmp.py", "compute_dual_lagrangian", 0.01),
            entry("/x/hf_ceag/benchmarks/timing.py", "on_step_end", 0.05),
            entry("/x/transformers/trainer.py", "get_batch_samples", 0.04),
        ]
    )
    text = profile_markdown({"ceag": (stats, 10)}, {"ceag": "CEAG"}, "ceag")
    assert "| … of which constraints and estimates (`ConstrainedStep.loss`) | 2.00 |" in text
    assert "| data loading (`get_batch_samples`) | 4.00 |" in text
    ours = text.split("hf_ceag and cooper functions by cumulative time")[1]
    assert "step.py:1(loss)" in ours and "cmp.py:1(compute_dual_lagrangian)" in ours
    assert "on_step_end" not in ours


def test_every_part_of_a_step_the_profile_names_is_a_function_of_that_file():
    # the profile's parts are looked up by file and function name: a rename must not turn a part into 0.00
    import importlib
    import inspect

    from hf_ceag.benchmarks.profiling import STEP_PARTS

    files = {"transformers/trainer.py": "transformers.trainer", "accelerate/accelerator.py": "accelerate.accelerator",
             "accelerate/optimizer.py": "accelerate.optimizer", "hf_ceag/constraints/step.py": "hf_ceag.constraints.step",
             None: "hf_ceag.ceag_trainer"}  # fmt: skip
    for _, path, function in STEP_PARTS:
        module = importlib.import_module(files[path])
        functions = [f for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__
                     for name, f in vars(cls).items() if name == function]  # fmt: skip
        assert functions, (path, function)


def test_device_profile_markdown_sums_each_configuration_and_ranks_ops_by_their_difference():
    # (op -> (calls, µs) over all profiled steps), steps, wall seconds per step
    plain = ({"aten::convolution": (40, 4000.0), "aten::add_": (10, 100.0)}, 10, 0.0005)
    nft = ({"aten::convolution": (40, 4010.0), "aten::add_": (10, 100.0), "aten::_foreach_mul_": (20, 300.0)}, 10,
           0.00055)  # fmt: skip
    ceag = ({"aten::convolution": (40, 3990.0), "aten::add_": (10, 100.0), "aten::_foreach_mul_": (20, 300.0),
             "aten::index_add_": (30, 600.0)}, 10, 0.0006)  # fmt: skip
    labels = {"plain": "plain Trainer", "nft": "NFT", "ceag": "CEAG"}
    text = device_profile_markdown({"plain": plain, "nft": nft, "ceag": ceag}, labels, top=3)
    assert "| op | plain Trainer µs/step (calls) | NFT µs/step (calls) | CEAG µs/step (calls) |" in text
    assert "| **all ops** | 410 | 441 | 499 |" in text  # (4000 + 100) / 10, (4010 + 100 + 300) / 10, ...
    assert "| **wall clock** | 500 | 550 | 600 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [  # by the largest difference from the plain Trainer's, in any configuration
        "| `aten::index_add_` | 0.0 (0) | 0.0 (0) | 60.0 (3) |",
        "| `aten::_foreach_mul_` | 0.0 (0) | 30.0 (2) | 30.0 (2) |",
        "| `aten::convolution` | 400.0 (4) | 401.0 (4) | 399.0 (4) |",
    ]
    assert "the 3 ops whose time per step differs most from the plain Trainer's" in text
