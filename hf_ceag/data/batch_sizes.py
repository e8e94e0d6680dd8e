"""The sizes of the training batches a run will get, known before training: a batch of one row breaks BatchNorm.

In training mode a BatchNorm layer normalises each channel over the batch; with one row (and a 1×1 feature map)
torch refuses ("Expected more than 1 value per channel when training"), and even where it does not, one row's
statistics are no batch statistics. A training set whose size leaves a last batch of one row used to fail at
the end of the first epoch, after the dense pass and an epoch of training: `check_batch_norm_batches` refuses it
when the trainer is built.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def smallest_train_batch(
    num_rows: int,
    batch_size: int,
    num_processes: int = 1,
    drop_last: bool = False,
    even_batches: bool = True,
    split_batches: bool = False,
) -> int:
    """The fewest rows one process gets in a training batch of an epoch of `num_rows` rows drawn in batches of
    `batch_size` (the Trainer's `train_batch_size`), as accelerate's `BatchSamplerShard` deals them out.

    One process: the last batch holds `num_rows % batch_size` rows (none dropped). Several: each process takes
    whole batches in turn, and with `even_batches` (accelerate's default) the last one is completed with rows
    from the start of the epoch; with `split_batches` every batch is cut into one slice per process."""
    rest = 0 if drop_last else num_rows % batch_size
    if num_processes == 1:
        return rest or batch_size
    if split_batches:
        piece = batch_size // num_processes
        return (rest - 1) % piece + 1 if rest and not even_batches else piece
    return rest if rest and not even_batches else batch_size


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of the model's BatchNorm layers (any `_BatchNorm`: torch's, `SyncBatchNorm`, timm's `BatchNormAct2d`)."""
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


def _reaches_last_batch(args, num_rows: int) -> bool:
    # Whether training runs to the last batch of its first epoch (a short max_steps may end before it).
    batches = math.ceil(num_rows / args.train_batch_size)
    if args.world_size > 1 and not args.accelerator_config.split_batches:
        batches = math.ceil(batches / args.world_size)
    updates_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    return total >= updates_per_epoch


def check_batch_norm_batches(model: nn.Module, num_rows: int | None, args) -> None:
    """Refuse (`ValueError`, saying what to change) a run whose training batches would hold a single row on
    some process while the model has BatchNorm layers: `args` is the run's `TrainingArguments`; `num_rows` None (a
    stream's rows, not yet counted) checks nothing."""
    layers = batch_norm_layers(model)
    if not layers or not num_rows:
        return
    config = args.accelerator_config
    size, processes = args.train_batch_size, args.world_size
    smallest = smallest_train_batch(
        num_rows, size, processes, args.dataloader_drop_last, config.even_batches, config.split_batches
    )
    if smallest != 1:
        return
    where = f"BatchNorm layers ({layers[0]}{' and more' if len(layers) > 1 else ''})"
    if size // (processes if config.split_batches else 1) == 1:
        raise ValueError(
            f"per_device_train_batch_size={args.per_device_train_batch_size}: every training batch holds one row "
            f"per process, and the model's {where} cannot train on one row. Raise per_device_train_batch_size "
            "to 2 or more."
        )
    if not _reaches_last_batch(args, num_rows):
        return
    per_device, devices = args.per_device_train_batch_size, max(1, size // args.per_device_train_batch_size)
    others = [
        b for b in (per_device - 1, per_device + 1, per_device + 2) if b > 1 and num_rows % (b * devices) != 1
    ]
    over = f" over {processes} processes" if processes > 1 else ""
    raise ValueError(
        f"The training set's {num_rows} rows leave a last batch of 1 row with per_device_train_batch_size="
        f"{per_device}{over}, and the model's {where} cannot train on one row (torch: "
        "'Expected more than 1 value per channel when training', at the end of the first epoch). Set "
        "dataloader_drop_last=True, or use another per_device_train_batch_size "
        f"(e.g. {' or '.join(map(str, others[:2]))})."
    )
