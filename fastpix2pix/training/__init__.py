"""Training pix2pix: the official iteration, the trainer around it, the fast path and data parallelism.

    from fastpix2pix.training import TrainOptions, train

    trainer = train(TrainOptions(dataroot="datasets/facades", name="facades", direction="BtoA"))

:func:`train` is what ``fastpix2pix train`` runs: the fast trainer where ``--fast_path`` chooses it (one
CUDA process by default), else the plain one; both write the same checkpoints.
"""

from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import FastPathConfig, FastStep
from fastpix2pix.training.fast_trainer import FastTrainer, run_training, use_fast_path
from fastpix2pix.training.step import LOSS_NAMES, NonFiniteLossError, Objective, train_step
from fastpix2pix.training.trainer import Trainer

train = run_training

__all__ = [
    "LOSS_NAMES",
    "FastPathConfig",
    "FastStep",
    "FastTrainer",
    "NonFiniteLossError",
    "Objective",
    "TrainOptions",
    "Trainer",
    "train",
    "train_step",
    "use_fast_path",
]
