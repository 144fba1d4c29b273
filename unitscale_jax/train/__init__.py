"""The training pipeline: ``unitscale-jax train`` / ``python -m unitscale_jax.train``.

Python API (what the experiment scripts call in-process)::

    from unitscale_jax import train
    cfg = train.get_preset("tiny").replace(model={"parametrization": "sp"},
                                           optimizer={"lr": 2**-8},
                                           training={"steps": 100, "run_dir": "runs/x"})
    summary = train.run(cfg)            # dict: losses, tokens/s, paths, history
    trainer = train.Trainer(cfg)        # the same, in pieces: build_state, step, evaluate, save
    model = train.build_model(cfg, vocab_size=260)
    from unitscale_jax.train.flags import parse_finetune_args
    ft = train.FineTuner(parse_finetune_args(["--data", "../shared/data/sst2"]))
    summary = ft.run()                  # fine-tuning (unitscale_jax.train.finetune)
    tx, schedule = train.build_optimizer(train.resolve(cfg), unitscale_jax.nn.param_info(model))
"""

from unitscale_jax.train.build import (
    build_model,
    build_optimizer,
    build_schedule,
    transformer_config,
)
from unitscale_jax.train.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TrainingConfig,
    default_lr,
    resolve,
    validate,
)
from unitscale_jax.train.errors import Diverged, Interrupted, TrainingStopped, UsageError
from unitscale_jax.train.finetune import FineTuner
from unitscale_jax.train.loop import format_summary, run
from unitscale_jax.train.metrics import loss_curve, read_metrics
from unitscale_jax.train.precision import PRECISIONS, precision_setup
from unitscale_jax.train.presets import PRESETS, get_preset
from unitscale_jax.train.sample import fill_mask, generate_seq2seq, generate_text, load_run, sample
from unitscale_jax.train.tasks import TASKS, Task, get_task
from unitscale_jax.train.trainer import Trainer

__all__ = [
    "TASKS", "Task", "Trainer", "get_task", "build_model", "build_optimizer", "build_schedule",
    "transformer_config",
    "Config", "DataConfig", "ModelConfig", "OptimizerConfig", "TrainingConfig", "default_lr",
    "resolve", "validate", "TrainingStopped", "Diverged", "Interrupted", "UsageError",
    "format_summary", "run",
    "loss_curve", "read_metrics", "PRESETS", "get_preset", "PRECISIONS", "precision_setup",
    "fill_mask", "generate_seq2seq", "generate_text", "load_run", "sample", "FineTuner",
]
