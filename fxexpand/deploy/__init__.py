"""Deployment: ONNX export (:mod:`~fxexpand.deploy.export`), onnxruntime latency
(:mod:`~fxexpand.deploy.bench`, with its child process ``_ort_child`` for ``threads > 1``), parameter
and FLOP counts (:mod:`~fxexpand.deploy.cost`) and the expansion report
(:mod:`~fxexpand.deploy.report`). The main names are also importable from :mod:`fxexpand`."""

from .bench import LatencyStats, benchmark_onnx, compare_onnx, make_session, random_feeds, time_session
from .cost import count_flops, count_parameters
from .export import check_output_path, export_onnx
from .report import expansion_report, report_table

__all__ = ["export_onnx", "check_output_path", "benchmark_onnx", "compare_onnx", "LatencyStats", "make_session",
           "random_feeds", "time_session", "count_parameters", "count_flops", "expansion_report", "report_table"]
