"""Prune the same rows twice, from a map-style dataset read in order and from its stream; dump each run's state.

    python tests/streaming_worker.py OUT
    torchrun --standalone --nproc_per_node 2 tests/streaming_worker.py OUT

Launched by tests/test_streaming.py. Each rank writes `OUT/{map,stream}-rank{R}.safetensors` (multipliers, weights,
buffers, the dense reference) and `OUT/{map,stream}-rank{R}.json` (the report without its timings, the evaluation
logs, the sparsity). The training rows (256) fill whole global batches (32: 16 per process on two), so that a
stream dispatched by accelerate and the map-style sampler deal each process the same rows; the eval rows (100)
do not fill their batches, which exercises the last partial one.
"""

import json
import os
import sys

import torch
from distributed_worker import tiny_vit
from safetensors.torch import save_file
from transformers import set_seed

from hf_ceag import CEAGConfig, CEAGTrainer, load_digits_dataset

STEPS, TRAIN_ROWS, EVAL_ROWS, GLOBAL_BATCH = 20, 256, 100, 32


def dense_model(train) -> torch.nn.Module:
    """A tiny ViT trained for 12 epochs (AdamW) by a plain loop on the CPU (the same weights on every process), so that the
    audit compares predictions that are not all one class."""
    set_seed(0)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = train[:]
    pixels, labels = rows["pixel_values"], rows["label"]
    for _ in range(12):
        for start in range(0, len(labels), GLOBAL_BATCH):
            rows = slice(start, start + GLOBAL_BATCH)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels[rows]).logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def run(out: str, streamed: bool, use_cpu: bool) -> CEAGTrainer:
    data = load_digits_dataset(image_size=16, rare_groups=(3, 8))
    train, test = data["train"].select(range(TRAIN_ROWS)), data["test"].select(range(EVAL_ROWS))
    model = dense_model(train)
    set_seed(0)
    if streamed:
        train, test = train.to_iterable_dataset(), test.to_iterable_dataset()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = CEAGConfig(
        output_dir=os.path.join(out, "stream" if streamed else "map"),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=64,
        train_sampling_strategy="sequential",
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        dual_lr=0.5,
        tolerance=0.0,
        buffer_size=4,
        target_sparsity=0.5,
        pruning_end_step=6,
        pruning_frequency=2,
        eval_strategy="steps",
        eval_steps=10,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        seed=0,
    )
    trainer = CEAGTrainer(model, config, train_dataset=train, eval_dataset={"test": test})
    trainer.train()
    trainer.group_report()
    return trainer


def dump(trainer: CEAGTrainer, path: str) -> None:
    state = {
        "multipliers": trainer.problem.multipliers_tensor(),
        "buffer": trainer.problem.buffer.values,
        "weights": torch.cat([p.detach().flatten().float() for p in trainer.model.parameters()]),
        "reference_accuracy": torch.tensor(trainer.dense_reference.group_accuracy),
    }
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, f"{path}.safetensors")
    report = {k: v for k, v in trainer.report.items() if "seconds" not in k}
    evaluations = [
        {k: v for k, v in log.items() if "runtime" not in k and "per_second" not in k and k != "epoch"}
        for log in trainer.state.log_history
        if "eval_test_loss" in log
    ]  # the epoch differs: a stream's is counted in passes over it
    figures = {"report": report, "evaluations": evaluations, "sparsity": trainer.pruner.sparsity()}
    figures["train_counts"] = trainer.group_index.train_counts
    with open(f"{path}.json", "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)


def main(out: str, use_cpu: bool = True) -> None:
    for streamed in (False, True):
        trainer = run(out, streamed, use_cpu)
        dump(trainer, os.path.join(out, f"{'stream' if streamed else 'map'}-rank{trainer.args.process_index}"))
    if torch.distributed.is_initialized():  # exiting with it open can abort a process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
