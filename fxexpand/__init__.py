"""fxexpand: expansion-then-contraction training of compact networks as torch.fx graph rewrites.

Entry points: :func:`trace`, :func:`compile`, :func:`contract`, :func:`verify`, :func:`export_onnx`,
:func:`benchmark_onnx`, :func:`save` / :func:`load`; Network Expansion with :class:`GrowthPlan` and
:class:`EMA`; NetAug with :class:`WidthSampler`, :func:`set_width` and :func:`netaug_loss`. The engine is :mod:`fxexpand.core`, the rewrites live in :mod:`fxexpand.passes`, and
:mod:`fxexpand.pipelines` composes them; the applications are the packages :mod:`fxexpand.training`,
:mod:`fxexpand.exits`, :mod:`fxexpand.deploy` and :mod:`fxexpand.demo` (docs/architecture.md).
"""

import importlib

from . import _deprecated, deploy, exits, passes, pipelines, recipes, training
from .api import ContractReport, compile, contract, set_train_mode, train_forms
from .core import (
    ContractionError,
    DecayActivation,
    EquivalenceError,
    ExpandedRegion,
    ExportError,
    FxExpandError,
    InputError,
    LoadError,
    Note,
    Pass,
    PassError,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
    ShapePropagationError,
    TraceError,
    VerifyReport,
    build_pass,
    get_pass,
    register_pass,
    registered_passes,
    trace,
    verify,
)
from .deploy import (
    LatencyStats,
    benchmark_onnx,
    compare_onnx,
    count_flops,
    count_parameters,
    expansion_report,
    export_onnx,
    report_table,
)
from .io import build_model, load, register_factory, save
from .training import (
    EMA,
    GrowthPlan,
    LinearDecay,
    Stage,
    WidthSampler,
    find_chains,
    get_decay,
    linearize,
    netaug_loss,
    rebuild_optimizer,
    set_decay,
    set_width,
    sort_channels,
    use_width,
    width_record,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fxexpand.train``, ``fxexpand.schedule``, ... (the old flat modules) still resolve, with a
    DeprecationWarning, after a plain ``import fxexpand`` (``fxexpand._deprecated``)."""
    if f"{__name__}.{name}" in _deprecated.MOVED or name == "exit_policy":
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "passes", "pipelines", "recipes", "exits", "training", "deploy", "GrowthPlan", "Stage", "EMA", "find_chains", "rebuild_optimizer",
    "WidthSampler", "set_width", "use_width", "netaug_loss", "sort_channels", "width_record", "expansion_report", "report_table", "LinearDecay", "set_decay", "get_decay", "linearize",
    "trace", "compile", "contract", "set_train_mode", "train_forms", "verify", "export_onnx", "benchmark_onnx", "compare_onnx",
    "save", "load", "build_model", "register_factory", "count_flops", "count_parameters",
    "Pass", "PassResult", "PassManager", "Note", "register_pass", "registered_passes", "get_pass", "build_pass",
    "ContractReport", "VerifyReport", "LatencyStats", "DecayActivation", "ExpandedRegion",
    "FxExpandError", "TraceError", "PassError", "PreconditionError", "PostconditionError",
    "EquivalenceError", "ContractionError", "ExportError", "LoadError", "InputError", "ShapePropagationError",
]
