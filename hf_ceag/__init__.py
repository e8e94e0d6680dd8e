"""hf-ceag: prune image classifiers without letting any group pay more than its share of the accuracy lost.

CEAG ("Balancing Act: Constraining Disparate Impact in Sparse Models", ICLR 2024) as a `transformers.Trainer`.
"""

from pathlib import Path

from .audit.report import format_report, save_report, split_report
from .callbacks import NonFiniteGuard
from .ceag_config import CEAGConfig
from .ceag_trainer import CEAGTrainer
from .constraints.gaps import excess_gaps
from .constraints.problems import EqualizedLossProblem, ExcessAccuracyGapProblem
from .constraints.reference import DenseReference
from .constraints.replay_buffer import ReplayBuffer
from .data.face_datasets import load_cifar100, load_fairface, load_utkface
from .data.groups import GROUP_ID_COLUMN, GroupIndex
from .data.images import image_processor, load_digits_dataset, load_image_dataset, load_streamed_image_dataset
from .data.styled_digits import load_styled_digits_dataset
from .models.cifar_resnet import register_timm_models
from .models.classifiers import build_classifier, from_timm, load_classifier
from .pruning.magnitude import MagnitudePruner, prunable_parameters
from .pruning.schedule import CubicSchedule

__version__ = "0.1.0"

EXCESS_ACCURACY_GAP_METRIC = str(Path(__file__).parent / "audit" / "metrics" / "excess_accuracy_gap")
"""Path of the shipped `evaluate` metric: `evaluate.load(hf_ceag.EXCESS_ACCURACY_GAP_METRIC)` works offline."""

__all__ = [
    "EXCESS_ACCURACY_GAP_METRIC",
    "GROUP_ID_COLUMN",
    "CEAGConfig",
    "CEAGTrainer",
    "CubicSchedule",
    "DenseReference",
    "EqualizedLossProblem",
    "ExcessAccuracyGapProblem",
    "GroupIndex",
    "MagnitudePruner",
    "NonFiniteGuard",
    "ReplayBuffer",
    "build_classifier",
    "excess_gaps",
    "format_report",
    "from_timm",
    "image_processor",
    "load_cifar100",
    "load_classifier",
    "load_digits_dataset",
    "load_fairface",
    "load_image_dataset",
    "load_streamed_image_dataset",
    "load_styled_digits_dataset",
    "load_utkface",
    "prunable_parameters",
    "register_timm_models",
    "save_report",
    "split_report",
]
