"""Part 6 of BENCHMARKS.md (`--streaming_section`): the peak resident memory of CEAG training on a generated
stream (`datasets.IterableDataset`) against the same generator's rows held in memory as a map-style dataset.

Every row is made from its index alone: a digit of scikit-learn's set upsampled to the image size, with pixel noise
drawn per block of `BLOCK` rows from a generator seeded by the block's number, and one row in ten contrast-inverted
(the `inverted` group). A stream of any length therefore needs nothing on disk and, while it is read, nothing in
memory beyond one block. Each run is a fresh process of the benchmark script (`--streaming_child`), measured like
part 4 (`memory.rss_mib`), with its peak set back once its data are built: the peak is the training's and the
report's, not that of building a map-style table.
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
import time
from collections.abc import Iterator

import datasets
import numpy as np
from transformers import set_seed

from hf_ceag import CEAGConfig, CEAGTrainer, build_classifier
from hf_ceag.benchmarks.document import marked_block, merge_marked_block
from hf_ceag.benchmarks.memory import measure_in_child, reset_peak_rss, rss_mib
from hf_ceag.data.images import DIGITS_MEAN, DIGITS_STD, digits_pixel_values
from hf_ceag.data.styled_digits import STYLES

START, END = (
    "<!-- streaming-section: written by --streaming_section -->",
    "<!-- /streaming-section -->",
)
BLOCK = 1024  # rows drawn at once, from one generator seeded by (seed, block number)
INVERTED_FRACTION, NOISE_STD = 0.1, 0.05
TRAIN_SEED, EVAL_SEED = 0, 1  # the eval rows are another draw, not the first training rows again
BATCH, EVAL_BATCH, TARGET_SPARSITY = 64, 256, 0.9


def generated_features(image_size: int) -> datasets.Features:
    """The generated rows' columns: `pixel_values` `[1, size, size]`, `label` (the digit), `group` (plain or
    inverted), both ClassLabels, so that a stream declares its groups."""
    return datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(1, image_size, image_size), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "group": datasets.ClassLabel(names=list(STYLES)),
        }
    )


def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits_pixel_values(digits.images, image_size) * DIGITS_STD + DIGITS_MEAN  # back to [0, 1]
    return pixels.numpy(), digits.target.astype(np.int64)


def generated_block(block: int, digits: tuple[np.ndarray, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Rows `block · BLOCK` to `(block + 1) · BLOCK − 1` as columns, from `digits` (`_digits`: images in [0, 1]
    and their labels) and a generator seeded by (`seed`, `block`): a random digit, inverted with probability
    `INVERTED_FRACTION`, plus Gaussian noise, normalised like the digits."""
    images, labels = digits
    rng = np.random.default_rng([seed, block])
    source = rng.integers(0, len(labels), BLOCK)
    inverted = rng.random(BLOCK) < INVERTED_FRACTION
    pixels = np.where(inverted[:, None, None, None], 1.0 - images[source], images[source])
    pixels = pixels + rng.normal(0.0, NOISE_STD, pixels.shape)
    return {
        "pixel_values": ((pixels - DIGITS_MEAN) / DIGITS_STD).astype(np.float32),
        "label": labels[source],
        "group": inverted.astype(np.int64),
    }


def generated_rows(rows: int, image_size: int, seed: int) -> Iterator[dict]:
    """The first `rows` generated rows, one at a time, each block drawn as it is reached."""
    digits = _digits(image_size)
    for block in range(-(-rows // BLOCK)):
        columns = generated_block(block, digits, seed)
        for i in range(min(BLOCK, rows - block * BLOCK)):
            yield {name: values[i] for name, values in columns.items()}


def generated_stream(rows: int, image_size: int, seed: int = TRAIN_SEED) -> datasets.IterableDataset:
    """`rows` generated rows as a stream: made as they are read, never written to disk (torch format)."""
    kwargs = {"rows": rows, "image_size": image_size, "seed": seed}
    stream = datasets.IterableDataset.from_generator(
        generated_rows, features=generated_features(image_size), gen_kwargs=kwargs
    )
    return stream.with_format("torch")


def generated_dataset(rows: int, image_size: int, seed: int = TRAIN_SEED) -> datasets.Dataset:
    """The same rows as `generated_stream`, held in memory: an in-memory Arrow table (no cache file), built one
    block at a time (torch format)."""
    digits, features = _digits(image_size), generated_features(image_size)
    blocks = []
    for block in range(-(-rows // BLOCK)):
        columns = generated_block(block, digits, seed)
        kept = min(BLOCK, rows - block * BLOCK)
        blocks.append(datasets.Dataset.from_dict({k: v[:kept] for k, v in columns.items()}, features=features))
    return datasets.concatenate_datasets(blocks).with_format("torch")


def streaming_config(output_dir: str, steps: int) -> CEAGConfig:
    """The run of each measurement: CEAG at `TARGET_SPARSITY`, reached at half of `steps`, batch `BATCH`; the
    dense model is untrained (this measures memory, not accuracy), hence `allow_weak_dense_model`."""
    return CEAGConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=EVAL_BATCH,
        target_sparsity=TARGET_SPARSITY,
        pruning_end_step=steps // 2,
        allow_weak_dense_model=True,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def streaming_child(kind: str, rows: int, eval_rows: int, steps: int, image_size: int, output_dir: str) -> None:
    """One measured run in this process, `kind` "stream" or "map" over `rows` training rows (and `eval_rows` of
    evaluation, of the same kind): build the data, set the peak back, build the model and `CEAGTrainer`, train
    and `group_report()`. Its last line gives the figures as `key=value` pairs."""
    if kind not in ("stream", "map"):
        raise ValueError(f"--streaming_child kind {kind!r} must be 'stream' or 'map'.")
    build = generated_stream if kind == "stream" else generated_dataset
    train, evaluation = build(rows, image_size, TRAIN_SEED), build(eval_rows, image_size, EVAL_SEED)
    set_seed(0)
    model = build_classifier("test_resnet", num_labels=10, channels=1, image_size=image_size)
    gc.collect()
    reset = reset_peak_rss()
    before, _ = rss_mib()
    start = time.perf_counter()
    config = streaming_config(output_dir, steps)
    trainer = CEAGTrainer(model, config, train_dataset=train, eval_dataset={"test": evaluation})
    trainer.train()
    trainer.group_report()
    seconds = time.perf_counter() - start
    seen = sum(trainer.dense_reference.group_counts)
    print(
        f"rss_before_mib={before:.1f} peak_rss_mib={rss_mib()[1]:.1f} seconds={seconds:.1f} rows={rows} "
        f"rows_seen={seen} peak_reset={int(reset)}"
    )


def streaming_runs(script: str, settings, work: str) -> list[dict]:
    """Each measurement in a fresh process of the benchmark `script` (`--streaming_child`): a stream of each of
    `settings.streaming_rows` rows, then a map-style dataset of each of `settings.streaming_map_rows`."""
    runs = [("stream", rows) for rows in settings.streaming_rows]
    runs += [("map", rows) for rows in settings.streaming_map_rows]
    measured = []
    for kind, rows in runs:
        command = [
            sys.executable, script, "--streaming_child", f"{kind}:{rows}",
            "--streaming_eval_rows", str(settings.streaming_eval_rows),
            "--streaming_steps", str(settings.streaming_steps), "--image_size", str(settings.image_size),
            "--work_dir", os.path.join(work, f"{kind}-{rows}"),
        ]  # fmt: skip
        measured.append({"kind": kind, **measure_in_child(command, f"{kind} of {rows} rows")})
    return measured


def growth_per_row(runs: list[dict]) -> float | None:
    """Bytes of peak − before per training row, between the runs (of one kind) with the fewest and the most rows;
    None with fewer than two row counts."""
    low, high = min(runs, key=lambda m: m["rows"]), max(runs, key=lambda m: m["rows"])
    if low["rows"] == high["rows"]:
        return None
    grown = (high["peak_rss_mib"] - high["rss_before_mib"]) - (low["peak_rss_mib"] - low["rss_before_mib"])
    return grown * 2**20 / (high["rows"] - low["rows"])


def streaming_reading(measured: list[dict]) -> str:
    """The largest stream's peak against each map-style run's, and how peak − before grows per row of each kind."""
    streams = [m for m in measured if m["kind"] == "stream"]
    stream = max(streams, key=lambda m: m["rows"])
    parts = [f"stream of {stream['rows']:,.0f} rows: peak {stream['peak_rss_mib']:.0f} MiB"]
    maps = [m for m in measured if m["kind"] == "map"]
    for m in maps:
        ratio = stream["peak_rss_mib"] / m["peak_rss_mib"]
        parts.append(f"map-style {m['rows']:,.0f}: {m['peak_rss_mib']:.0f} MiB (stream / map-style {ratio:.2f})")
    for label, runs in (("stream", streams), ("map-style", maps)):
        per_row = growth_per_row(runs) if runs else None
        if per_row is not None:
            parts.append(f"peak − before grows by {per_row:.0f} bytes per training row ({label})")
    return "; ".join(parts) + "."


def streaming_section(settings, argv: list[str], measured: list[dict], seconds: float, head: str, when: str,
                      machine: str) -> str:  # fmt: skip
    """Part 6's markdown, between its markers: command, what was run, the table and the reading."""
    table = [
        (
            "| data | rows | before the trainer (MiB) | peak (MiB) | peak − before (MiB) | rows read by the dense "
            "pass | wall time (s) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in measured:
        label = "stream (`IterableDataset`)" if m["kind"] == "stream" else "map-style (`Dataset`, in memory)"
        table.append(
            f"| {label} | {m['rows']:,.0f} | {m['rss_before_mib']:.1f} | {m['peak_rss_mib']:.1f} "
            f"| {m['peak_rss_mib'] - m['rss_before_mib']:.1f} | {m['rows_seen']:,.0f} | {m['seconds']:.0f} |"
        )
    reset = all(m["peak_reset"] for m in measured)
    peak = (
        "the peak (VmHWM) is set back once the data are built (`/proc/self/clear_refs`), so it is that of "
        "training and the report"
        if reset
        else "the peak (VmHWM) includes building the data (this kernel cannot set it back)"
    )
    size = f"{settings.image_size}×{settings.image_size}"
    return "\n\n".join(
        [
            START,
            "## 6. Streamed data: peak memory",
            (
                f"- Command: `{shlex.join(['python', 'scripts/benchmark.py', *argv])}`\n- Date: {when}; commit "
                f"{head}\n- Machine: {machine}\n- Run time: {seconds / 60:.1f} min"
            ),
            (
                f"CEAG pruning an untrained `test_resnet` (1 channel, {size}) to {TARGET_SPARSITY:.0%} sparsity, "
                f"reached at step {settings.streaming_steps // 2} of {settings.streaming_steps}, batch {BATCH}, "
                f"evaluation on {settings.streaming_eval_rows:,} more rows of the same kind, then "
                "`group_report()`. The rows are generated from their index (`hf_ceag.benchmarks.streaming_memory`"
                ": a scikit-learn digit, upsampled, with noise; one in ten inverted): the stream makes them as "
                "they are read and writes nothing to disk; the map-style runs hold the same rows in an in-memory "
                "Arrow table. The dense pass and the report each read the whole training set. Each run is a "
                "fresh process; resident memory from `/proc/self/status` (VmRSS before the trainer is built, "
                f"once the libraries, the model and, map-style, the data are loaded); {peak}. What grows with the rows "
                "on a stream: the dense pass and the report each keep every row's logits (4 bytes per class), "
                "label, group id and input check until the pass ends, then one correctness flag per row."
            ),
            "\n".join(table),
            f"Reading: {streaming_reading(measured)}",
            END,
        ]
    )


def streaming_block(text: str) -> str:
    """The part-6 block already in a BENCHMARKS.md text (kept when the rest of the file is rewritten)."""
    return marked_block(text, START, END)


def merge_streaming_section(path: str, section: str) -> None:
    """Put part 6 into BENCHMARKS.md at `path`, replacing its block if there is one, else before the device
    sections (or at the end)."""
    merge_marked_block(path, section, START, END)
