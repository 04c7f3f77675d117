"""The demos and what they run on: ``fxexpand demo`` (:mod:`~fxexpand.demo.compare`, the paired
comparison of the methods; its names are importable from ``fxexpand.demo`` itself),
``fxexpand demo --exits`` (:mod:`~fxexpand.demo.early_exits`), the offline datasets
(:mod:`~fxexpand.demo.data`), the reference models (:mod:`~fxexpand.demo.models`) and what the
demos share (:mod:`~fxexpand.demo.common`)."""

from . import common, compare, data, early_exits, models
from .compare import (
    DEFAULT_METHODS,
    FULL_METHODS,
    FULL_SEEDS,
    LR_GRID,
    METHODS,
    TUNE_SEEDS,
    TUNED_LR,
    DemoConfig,
    DemoReport,
    DigitsNet,
    full_config,
    load_digits,
    markdown_table,
    paired_difference,
    plot,
    reading,
    results_table,
    run_demo,
    train_run,
    write_outputs,
)

__all__ = ["common", "compare", "data", "early_exits", "models",
           "DigitsNet", "load_digits", "run_demo", "DemoConfig", "DemoReport", "METHODS", "DEFAULT_METHODS",
           "FULL_METHODS", "FULL_SEEDS", "full_config", "LR_GRID", "TUNED_LR", "TUNE_SEEDS", "results_table",
           "write_outputs", "paired_difference", "reading", "plot", "train_run", "markdown_table"]
