"""fxexpand: expansion-then-contraction training of compact networks as torch.fx graph rewrites.

Entry points: :func:`trace`, :func:`compile`, :func:`contract`, :func:`verify`, :func:`export_onnx`,
:func:`benchmark_onnx`, :func:`save` / :func:`load`; Network Expansion with :class:`GrowthPlan` and
:class:`EMA`; NetAug with :class:`WidthSampler`, :func:`set_width` and :func:`netaug_loss`. The engine is :mod:`fxexpand.core`, the rewrites live in :mod:`fxexpand.passes`, and
:mod:`fxexpand.pipelines` composes them (docs/architecture.md).
"""

from . import exits, passes, pipelines, recipes
from .api import ContractReport, compile, contract, set_train_mode, train_forms
from .bench import LatencyStats, benchmark_onnx, compare_onnx
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
    TraceError,
    VerifyReport,
    build_pass,
    get_pass,
    register_pass,
    registered_passes,
    trace,
    verify,
)
from .cost import count_flops, count_parameters
from .ema import EMA
from .export import export_onnx
from .growth import GrowthPlan, Stage, find_chains, rebuild_optimizer
from .io import build_model, load, register_factory, save
from .netaug import WidthSampler, netaug_loss, set_width, sort_channels, use_width, width_record
from .report import expansion_report, report_table
from .schedule import LinearDecay, get_decay, linearize, set_decay

__version__ = "0.1.0"

__all__ = [
    "passes", "pipelines", "recipes", "exits", "GrowthPlan", "Stage", "EMA", "find_chains", "rebuild_optimizer",
    "WidthSampler", "set_width", "use_width", "netaug_loss", "sort_channels", "width_record", "expansion_report", "report_table", "LinearDecay", "set_decay", "get_decay", "linearize",
    "trace", "compile", "contract", "set_train_mode", "train_forms", "verify", "export_onnx", "benchmark_onnx", "compare_onnx",
    "save", "load", "build_model", "register_factory", "count_flops", "count_parameters",
    "Pass", "PassResult", "PassManager", "Note", "register_pass", "registered_passes", "get_pass", "build_pass",
    "ContractReport", "VerifyReport", "LatencyStats", "DecayActivation", "ExpandedRegion",
    "FxExpandError", "TraceError", "PassError", "PreconditionError", "PostconditionError",
    "EquivalenceError", "ContractionError", "ExportError", "LoadError", "InputError",
]
