"""Part 5 of the benchmark (held-out duals and nuPI) from hand-made report rows: variants, table, goals, and the
block it keeps in BENCHMARKS.md."""

from types import SimpleNamespace

import pytest

from hf_ceag.benchmarks.document import DEVICE_START
from hf_ceag.benchmarks.generalisation import (
    END,
    START,
    generalisation_goals,
    generalisation_section,
    generalisation_table,
    merge_section,
    variants,
)

SETTINGS = SimpleNamespace(
    constraint_splits=[0.1, 0.2], stability_dual_lrs=[0.01, 0.1, 1.0], default_seeds=[0, 1], default_flags=[]
)
RECIPE = SimpleNamespace(defaults={"dual_lr": 0.0175})


def row(seed, variant, label, train, test, accuracy, lam, eps=0.01):
    return {
        "seed": seed, "variant": variant, "label": label, "tolerance": eps, "train_max": train, "test_max": test,
        "test_over": 0.5, "test_accuracy": accuracy, "max_multiplier": lam, "seconds": 60.0,
    }  # fmt: skip


def rows():
    made = []
    for seed in (0, 1):
        made += [
            row(seed, "nft", "NFT", 0.04, 0.05, 0.95, 0.0),
            row(seed, "ceag", "CEAG", 0.005, 0.020 + 0.002 * seed, 0.945, 0.5),
            row(seed, "held-out-0.1", "held 10%", 0.008, 0.012, 0.944, 0.6),  # 43 % lower, within a point
            row(seed, "held-out-0.2", "held 20%", 0.009, 0.019, 0.930, 0.7),  # 10 % lower, 1.5 points worse
            row(seed, "nupi-0.01", "nuPI 0.01", 0.006, 0.02, 0.944, 0.4),
            row(seed, "nupi-0.1", "nuPI 0.1", 0.007, 0.02, 0.944, 0.5),
            row(seed, "nupi-1", "nuPI 1", 0.012 if seed else 0.004, 0.02, 0.944, 2.0),
            row(seed, "sgd-0.01", "SGD 0.01", 0.011, 0.02, 0.944, 0.3),
            row(seed, "sgd-0.1", "SGD 0.1", 0.004, 0.02, 0.944, 3.0),
            row(seed, "sgd-1", "SGD 1", 0.002, 0.03, 0.9, 20.0),
        ]
    return made


def test_variants_are_the_issues_grid():
    names = [v.name for v in variants(SETTINGS, RECIPE)]
    assert names == ["nft", "ceag", "held-out-0.1", "held-out-0.2", "nupi-0.01", "nupi-0.1", "nupi-1",
                     "sgd-0.01", "sgd-0.1", "sgd-1"]  # fmt: skip
    held = variants(SETTINGS, RECIPE)[2]
    assert held.flags == ("--constraint_split", "0.1") and held.method == "ceag"
    assert variants(SETTINGS, RECIPE)[6].flags == ("--dual_optimizer", "nupi", "--dual_lr", "1")
    # the recipe's own dual lr is the CEAG row, not run twice
    same = SimpleNamespace(**{**vars(SETTINGS), "stability_dual_lrs": [0.0175, 1.0]})
    assert [v.name for v in variants(same, RECIPE)][-1:] == ["sgd-1"]


def test_table_means_feasibility_and_goals_by_hand():
    table = generalisation_table(rows()).splitlines()
    ceag = next(line for line in table if line.startswith("| CEAG |"))
    assert (
        ceag == "| CEAG | 2 | +0.005 ± 0.000 | +0.021 ± 0.001 | 0.50 ± 0.00 | 0.945 ± 0.000 | 0.50 ± 0.00 | 2/2 |"
    )
    assert next(line for line in table if line.startswith("| nuPI 1 |")).endswith("| 1/2 |")
    goals = generalisation_goals(rows(), SETTINGS)
    held10 = next(g for g in goals if g.startswith("- held 10%"))
    assert "+0.0120 against CEAG's +0.0210 (+43% lower" in held10 and held10.endswith("**met**.")
    assert next(g for g in goals if g.startswith("- held 20%")).endswith("**not met**.")  # accuracy
    nupi = next(g for g in goals if g.startswith("- nuPI duals"))
    assert (
        "1: final max λ 2.00, train-feasible 1/2" in nupi
        and "spread of final max λ (max − min of the means) 1.60" in nupi
    )
    assert nupi.endswith("Goal (nuPI feasible on train at every dual lr): **not met**.")
    sgd = next(g for g in goals if g.startswith("- SGD duals"))
    assert "spread of final max λ (max − min of the means) 19.70" in sgd


def test_section_is_one_block_merged_before_the_device_sections(tmp_path):
    text = generalisation_section(SETTINGS, ["--generalisation_section"], rows(), 600, "abc1234", "today", "cpu")
    assert text.startswith(START) and text.endswith(END)
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\npart 4\n\n{DEVICE_START}\n\ngpu\n\n<!-- /device-sections -->\n")
    merge_section(str(path), text)
    first = path.read_text()
    assert first.index(START) < first.index(DEVICE_START) and first.count(START) == 1
    merge_section(str(path), text.replace("abc1234", "def5678"))  # replaced, not added
    second = path.read_text()
    assert second.count(START) == 1 and "def5678" in second and "abc1234" not in second
    with pytest.raises(StopIteration):
        next(line for line in second.splitlines() if line.startswith("| CEAG | 3 |"))
