"""Train a few constrained steps and dump this rank's state; launched by tests/test_scale_out.py.

    python tests/distributed_worker.py OUT BATCH GRAD_ACCUM MITIGATION [PRECISION]
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT BATCH 1 ceag

`CEAG_TEST_CONSTRAINT_SPLIT` (default 0) sets `constraint_split` (held-out duals).

A tiny ViT (LayerNorm, no BatchNorm) keeps the forward pass independent of how a batch is split, so runs
that split the same samples differently can be compared.
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, ViTConfig, set_seed

from hf_ceag import CEAGConfig, CEAGTrainer, load_digits_dataset

STEPS = 12


def tiny_vit():
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )  # fmt: skip
    return AutoModelForImageClassification.from_config(config)


def main(out, batch, grad_accum, mitigation, precision="fp32", use_cpu=False):
    set_seed(0)
    model = tiny_vit()
    data = load_digits_dataset(image_size=16, rare_groups=(3, 8))
    config = CEAGConfig(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        per_device_eval_batch_size=128,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        mitigation=mitigation,
        dual_lr=0.5,
        tolerance=0.0,
        buffer_size=4,
        target_sparsity=0.5,
        allow_weak_dense_model=True,
        pruning_end_epoch=0.1,
        pruning_frequency=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=precision == "bf16",
        use_cpu=use_cpu or not torch.cuda.is_available(),
        constraint_split=float(os.environ.get("CEAG_TEST_CONSTRAINT_SPLIT", "0")),
        seed=0,
    )
    trainer = CEAGTrainer(model, config, train_dataset=data["train"])
    trainer.train()
    buffer = trainer.problem.buffer  # NFT: none
    state = {
        "multiplier": trainer.problem.multiplier.weight.detach().flatten(),
        "buffer": buffer.values if buffer is not None else torch.zeros(0),
        "weights": torch.cat([p.detach().flatten().float() for p in model.parameters()]),
        "reference_accuracy": torch.tensor(trainer.dense_reference.group_accuracy),
        "held_out_rows": torch.tensor(len(trainer.constraint_dataset) if trainer.constraint_dataset else 0),
    }
    rank = trainer.args.process_index
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    if rank == 0:
        print(f"world_size={trainer.args.world_size}")
    if torch.distributed.is_initialized():  # exiting with it open can abort a process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:])
