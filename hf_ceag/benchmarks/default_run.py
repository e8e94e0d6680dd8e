"""Part 0 of BENCHMARKS.md: the default run as a user runs it (`python scripts/run_ceag.py --seed S` in a fresh
process per thread count and seed), the default's three claims per run, and their tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from hf_ceag.benchmarks.formatting import cell
from hf_ceag.benchmarks.recipe import Recipe


def default_runs(recipe: Recipe, settings, extra: list[str], work: str, cwd: str) -> list[dict]:
    """`python scripts/run_ceag.py --seed S` (the README's first command: dense training, NFT and CEAG) in a
    fresh process per (threads, seed), run in `cwd` with OMP_NUM_THREADS set; as many at once as the cores
    allow. One row per run: its wall time, and NFT's and CEAG's train and test figures from report.json."""
    jobs = [(threads, seed) for threads in settings.default_threads for seed in settings.default_seeds]
    script = recipe.script
    rows, running = [], []
    cores = os.cpu_count() or 1
    os.makedirs(work, exist_ok=True)
    for threads, seed in jobs:
        while running and (sum(t for t, *_ in running) + threads > cores or running[0][0] != threads):
            rows.append(_finish_default_run(*running.pop(0)))
        out = os.path.join(work, f"default-threads{threads}-seed{seed}")
        command = [sys.executable, script, "--seed", str(seed), "--output_dir", out, "--disable_tqdm", "true"]
        command += [*settings.default_flags, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        # closed by _finish_default_run once the process ends: several run at once
        log = open(os.path.join(work, f"default-threads{threads}-seed{seed}.log"), "w")  # noqa: SIM115
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        running.append((threads, seed, out, process, log, time.perf_counter()))
    rows += [_finish_default_run(*job) for job in running]
    return sorted(rows, key=lambda r: (r["threads"], r["seed"]))


def _finish_default_run(threads, seed, out, process, log, start) -> dict:
    code = process.wait()
    log.close()
    if code != 0:
        raise RuntimeError(f"python scripts/run_ceag.py --seed {seed} (threads {threads}) failed; see {log.name}.")
    row = {"threads": threads, "seed": seed, "seconds": time.perf_counter() - start}
    for method in ("nft", "ceag"):
        with open(os.path.join(out, method, "report.json")) as f:
            report = json.load(f)
        train, test = report["splits"]["train"], report["splits"]["test"]
        row[method] = {
            "train_max": train["max_excess_gap"],
            "test_max": test["max_excess_gap"],
            "test_accuracy": test["accuracy_sparse"],
            "min_train_n": min(g["n"] for g in train["groups"]),
        }
        row["tolerance"] = report["tolerance"]
    return row


def default_claims(row: dict) -> dict[str, bool]:
    """The default's three claims for one run: NFT's train max ψ_g > 2ε, CEAG's ≤ ε, and CEAG's test accuracy
    within one point of NFT's."""
    eps = row["tolerance"]
    return {
        "nft_over_2eps": row["nft"]["train_max"] > 2 * eps,
        "ceag_within_eps": row["ceag"]["train_max"] <= eps,
        "accuracy_within_1pt": row["ceag"]["test_accuracy"] >= row["nft"]["test_accuracy"] - 0.01,
    }


def default_summary_table(rows: list[dict]) -> str:
    """Per thread count: how many seeds meet each claim, and the figures as mean ± std over seeds."""
    lines = [
        (
            "| threads | seeds | NFT train max ψ_g | CEAG train max ψ_g | NFT test max ψ_g | CEAG test max ψ_g "
            "| NFT test accuracy | CEAG test accuracy | NFT > 2ε | CEAG ≤ ε | CEAG accuracy ≥ NFT − 0.01 "
            "| all three |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads in dict.fromkeys(r["threads"] for r in rows):
        group = [r for r in rows if r["threads"] == threads]
        claims = [default_claims(r) for r in group]
        counts = [
            sum(c[key] for c in claims) for key in ("nft_over_2eps", "ceag_within_eps", "accuracy_within_1pt")
        ]
        cells = [
            cell([r[m][key] for r in group], 3, signed=key != "test_accuracy")
            for key in ("train_max", "test_max", "test_accuracy")
            for m in ("nft", "ceag")
        ]
        counts.append(sum(all(c.values()) for c in claims))
        lines.append(
            f"| {threads} | {len(group)} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{n}/{len(group)}" for n in counts)
            + " |"
        )
    return "\n".join(lines)


def default_run_table(rows: list[dict]) -> str:
    """One line per run."""
    lines = [
        (
            "| threads | seed | NFT train max ψ_g | CEAG train max ψ_g | NFT test max ψ_g | CEAG test max ψ_g "
            "| NFT test accuracy | CEAG test accuracy | wall time (s) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r['nft']['train_max']:+.4f}", f"{r['ceag']['train_max']:+.4f}",
            f"{r['nft']['test_max']:+.4f}", f"{r['ceag']['test_max']:+.4f}",
            f"{r['nft']['test_accuracy']:.4f}", f"{r['ceag']['test_accuracy']:.4f}", f"{r['seconds']:.0f}",
        ]  # fmt: skip
        lines.append(f"| {r['threads']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_section(settings, rows: list[dict]) -> str:
    """Part 0's markdown: the command, ε and the smallest group, the summary per thread count, one line per run."""
    flags = " ".join(settings.default_flags)
    command = f"python scripts/run_ceag.py --seed S --output_dir DIR{' ' + flags if flags else ''}"
    eps = rows[0]["tolerance"]
    smallest = min(r["ceag"]["min_train_n"] for r in rows)
    return "\n\n".join(
        [
            "## 0. The default run, as a user runs it",
            (
                f"`{command}` — the README's first command (dense training, NFT, CEAG), one fresh process per "
                f"run with `OMP_NUM_THREADS` set, seeds {', '.join(map(str, settings.default_seeds))} (the seed "
                f"also sets the data). ε = {eps:g}; the smallest training group has {smallest} rows (one image = "
                f"{1 / smallest:.4f} of its accuracy). The default's claims: NFT's train max ψ_g > 2ε, CEAG's "
                "≤ ε, and CEAG's test accuracy within one point of NFT's."
            ),
            default_summary_table(rows),
            default_run_table(rows),
        ]
    )
