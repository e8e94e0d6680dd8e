"""Every row's prediction, in order, on every process: the dense reference before training, reports after it."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.encoding import LABEL_COLUMNS
from ..data.groups import GROUP_ID_COLUMN
from ..models.classifiers import classifier_logits


@torch.no_grad()
def predict_every_row(
    trainer, dataset: datasets.Dataset, prefix: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and group ids of every row of `dataset` (encoded by a `CEAGTrainer`), in order, on every
    process, with `trainer`'s model in eval mode (its training flag is restored). Refuses (`ValueError`, naming
    the split from `prefix`, e.g. "dense_train", and the rows) a split with NaN or infinite inputs or logits.

    Its own loop rather than `Trainer.predict`: predicting before `train()` marks the model as prepared in
    evaluation mode, and accelerate then never wraps it in DDP for training."""
    model = trainer.model
    was_training = model.training
    model.eval()
    logits, labels, non_finite, group_ids = [], [], [], []
    streamed = isinstance(dataset, datasets.IterableDataset)  # its group ids come with the rows, as they are read
    progress = not trainer.args.disable_tqdm and trainer.is_local_process_zero()
    not_inputs = (*LABEL_COLUMNS, GROUP_ID_COLUMN, *trainer.args.group_columns)
    for batch in tqdm(every_row_dataloader(trainer, dataset), desc=prefix, disable=not progress, leave=False):
        batch = trainer._prepare_inputs(batch)
        target = next(batch[k] for k in LABEL_COLUMNS if k in batch)
        inputs = {k: v for k, v in batch.items() if k not in not_inputs}
        with trainer.accelerator.autocast():
            outputs = model(**inputs)
        batch_logits = classifier_logits(outputs, model).float()
        gathered = (batch_logits, target, non_finite_rows(inputs, batch_logits))
        gathered += (batch[GROUP_ID_COLUMN],) if streamed else ()
        batch_logits, target, bad, *groups = trainer.accelerator.gather_for_metrics(gathered)
        logits.append(batch_logits.cpu())
        labels.append(target.cpu())
        non_finite.append(bad)
        group_ids.extend(g.cpu() for g in groups)
    model.train(was_training)
    split = prefix.partition("_")[2] or prefix  # "dense_train": the train split
    if not logits:
        raise ValueError(f"The {split} split gave no rows: pass a dataset (or stream) that holds some.")
    check_finite_rows(torch.cat(non_finite), split, getattr(model, "main_input_name", "pixel_values"))
    if streamed:
        groups = torch.cat(group_ids).long()
    else:
        groups = torch.tensor(dataset.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
    return torch.cat(logits), torch.cat(labels).long(), groups


INPUT_FLAG, LOGITS_FLAG = 1, 2  # the bits of `non_finite_rows`


def non_finite_rows(inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    """Per row of a batch, on its device: `INPUT_FLAG` if a floating-point model input (e.g. `pixel_values`)
    holds a NaN or an infinity, plus `LOGITS_FLAG` if its logits do; 0 for a finite row."""
    flags = (~torch.isfinite(logits).flatten(1).all(1)).long() * LOGITS_FLAG
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape[:1] == logits.shape[:1]:
            flags |= (~torch.isfinite(value).flatten(1).all(1)).long() * INPUT_FLAG
    return flags


def check_finite_rows(flags: torch.Tensor, split: str, input_name: str = "pixel_values", shown: int = 5) -> None:
    """Raise a `ValueError` naming the first rows of `split` with non-finite inputs or logits (`flags` from
    `non_finite_rows`, every row of the split in order; `input_name` the model's main input): one read. A
    non-finite input would make every training step on it NaN (and the stop would seem to blame the learning
    rate); non-finite logits on finite inputs mean a broken model."""
    flags = flags.cpu()  # the one read, at the end of the pass
    rows = torch.nonzero(flags).flatten().tolist()
    if not rows:
        return
    inputs = torch.nonzero(flags & INPUT_FLAG).flatten().tolist()
    if inputs:
        raise ValueError(
            f"The {split} split has NaN or infinite {input_name} in {len(inputs)} row(s): {_first(inputs, shown)}. "
            f"Clean or drop those rows before training, e.g. "
            f"dataset.filter(lambda row: np.isfinite(np.asarray(row['{input_name}'])).all())."
        )
    raise ValueError(
        f"The model gives NaN or infinite logits on {len(rows)} row(s) of the {split} split with finite inputs: "
        f"{_first(rows, shown)}. The model's weights are broken (NaN) or overflow in its precision: check the "
        "model you pass, or run it in fp32 (without fp16/bf16)."
    )


def _first(rows: list[int], shown: int) -> str:
    return f"rows {rows[:shown]}" + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


def every_row_dataloader(trainer, dataset: datasets.Dataset):
    """`trainer`'s eval dataloader for `dataset`, keeping the last partial batch even with `dataloader_drop_last`
    (meant for training; the Trainer's eval loader drops it too): references, reports and audits need every row."""
    args = trainer.args
    drop_last, args.dataloader_drop_last = args.dataloader_drop_last, False
    try:
        return trainer.get_eval_dataloader(dataset)
    finally:
        args.dataloader_drop_last = drop_last
