"""Every row's prediction, in order, on every process: the dense reference before training, reports after it."""

from __future__ import annotations

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
    process, with `trainer`'s model in eval mode (its training flag is restored).

    Its own loop rather than `Trainer.predict`: predicting before `train()` marks the model as prepared in
    evaluation mode, and accelerate then never wraps it in DDP for training."""
    model = trainer.model
    was_training = model.training
    model.eval()
    logits, labels = [], []
    progress = not trainer.args.disable_tqdm and trainer.is_local_process_zero()
    not_inputs = (*LABEL_COLUMNS, GROUP_ID_COLUMN, *trainer.args.group_columns)
    for batch in tqdm(every_row_dataloader(trainer, dataset), desc=prefix, disable=not progress, leave=False):
        batch = trainer._prepare_inputs(batch)
        target = next(batch[k] for k in LABEL_COLUMNS if k in batch)
        with trainer.accelerator.autocast():
            outputs = model(**{k: v for k, v in batch.items() if k not in not_inputs})
        batch_logits = classifier_logits(outputs, model).float()
        batch_logits, target = trainer.accelerator.gather_for_metrics((batch_logits, target))
        logits.append(batch_logits.cpu())
        labels.append(target.cpu())
    model.train(was_training)
    groups = torch.tensor(dataset.with_format(None)[GROUP_ID_COLUMN], dtype=torch.long)
    return torch.cat(logits), torch.cat(labels).long(), groups


def every_row_dataloader(trainer, dataset: datasets.Dataset):
    """`trainer`'s eval dataloader for `dataset`, keeping the last partial batch even with `dataloader_drop_last`
    (meant for training; the Trainer's eval loader drops it too): references, reports and audits need every row."""
    args = trainer.args
    drop_last, args.dataloader_drop_last = args.dataloader_drop_last, False
    try:
        return trainer.get_eval_dataloader(dataset)
    finally:
        args.dataloader_drop_last = drop_last
