"""ONNX export that is checked, compared with torch and written atomically.

:func:`export_onnx` exports to a temporary file next to the destination, runs
:func:`onnx.checker.check_model`, runs the file in onnxruntime and compares its outputs with torch,
and only then renames it into place. On any failure the destination is left untouched.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..core import (
    CONV_TYPES,
    ExportError,
    InputError,
    flatten_outputs,
    get_attr,
    node_arg,
    set_module,
)

__all__ = ["export_onnx", "check_output_path"]

logger = logging.getLogger(__name__)


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any work) if ``path`` cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise ExportError(f"output path {p} is a directory; give a file name such as {p / 'model.onnx'}")
    if not parent.exists():
        raise ExportError(f"the directory {parent} does not exist; create it or choose another output path")
    if not parent.is_dir():
        raise ExportError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"the directory {parent} is not writable; choose another output path")
    try:  # os.access says yes to root everywhere, and knows nothing of /proc-like file systems: try it
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=str(parent))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot create files in the directory {parent} ({e.strerror or e}); "
                          "choose another output path") from e
    return p


def _same_pads(kernel, dilation) -> tuple[list[int], list[int]]:
    """(total padding per dim, F.pad list: last dim first, (left, right) each) of padding='same'."""
    totals = [int(d) * (int(k) - 1) for k, d in zip(kernel, dilation)]
    pads: list[int] = []
    for t in reversed(totals):
        pads += [t // 2, t - t // 2]
    return totals, pads


def explicit_same_padding(model: nn.Module) -> nn.Module:
    """Rewrite ``padding="same"`` convs of ``model`` (in place) to explicit zero padding.

    The ONNX exporter writes them as ``auto_pad=SAME_UPPER``, which onnxruntime refuses for dilated
    kernels ("Dilation not supported for AutoPadType::SAME_UPPER"). A symmetric padding becomes a
    number; an asymmetric one (even effective kernel) becomes a zero pad op before an unpadded conv.
    Covers conv modules and, in a GraphModule, ``F.conv1d/2d/3d`` calls.
    """

    for name, mod in list(model.named_modules()):
        if not name or type(mod) not in CONV_TYPES.values() or mod.padding != "same" or mod.padding_mode != "zeros":
            continue
        totals, pads = _same_pads(mod.kernel_size, mod.dilation)
        if all(t % 2 == 0 for t in totals):
            mod.padding = tuple(t // 2 for t in totals)
        else:
            mod.padding = (0,) * len(totals)
            pad = getattr(nn, f"ConstantPad{len(totals)}d")(tuple(pads), 0.0)
            set_module(model, name, nn.Sequential(pad, mod))
    if isinstance(model, fx.GraphModule):
        funcs = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
        changed = False
        for node in list(model.graph.nodes):
            if node.op != "call_function" or node.target not in funcs or node_arg(node, 4, "padding", 0) != "same":
                continue
            weight = node_arg(node, 1, "weight")
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            w = get_attr(model, weight.target)
            if not isinstance(w, torch.Tensor):
                continue
            nd = funcs[node.target]
            dil = node_arg(node, 5, "dilation", 1)
            dil = (dil,) * nd if isinstance(dil, int) else tuple(dil) * (nd if len(tuple(dil)) == 1 else 1)
            totals, pads = _same_pads(tuple(w.shape[2:]), dil)
            inp, bias = node_arg(node, 0, "input"), node_arg(node, 2, "bias")
            stride, groups = node_arg(node, 3, "stride", 1), node_arg(node, 6, "groups", 1)
            if all(t % 2 == 0 for t in totals):
                padding = tuple(t // 2 for t in totals)
            else:
                with model.graph.inserting_before(node):
                    inp = model.graph.call_function(F.pad, (inp, tuple(pads)))
                padding = (0,) * nd
            node.args, node.kwargs = (inp, weight, bias, stride, padding, dil, groups), {}
            changed = True
        if changed:
            model.recompile()
    return model


def _torch_export(model: nn.Module, inputs: tuple, path: str, opset: int | None, dynamo: bool) -> None:
    kwargs: dict[str, Any] = dict(input_names=[f"input_{i}" for i in range(len(inputs))])
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, inputs, path, dynamo=True, external_data=False, verbose=False, **kwargs)
        else:
            torch.onnx.export(model, inputs, path, dynamo=False, **kwargs)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamo: bool = False,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export ``model`` (in eval mode, on a copy) to ONNX at ``path``; returns the path.

    Args:
        example_inputs: tuple of tensors (shapes are fixed in the exported graph).
        opset: ONNX opset (exporter default when None).
        dynamo: use torch's ``torch.export``-based exporter instead of the TorchScript one
            (the TorchScript exporter is faster; it is tried first by default and the dynamo
            exporter is used if it fails).
        check: run onnx.checker and compare onnxruntime with torch (``rtol``/``atol`` relative to
            the output's largest magnitude).

    Raises:
        ExportError: unwritable path, export failure, checker failure or an output mismatch.
    """
    import onnx  # lazy, with onnxruntime: only export needs them (import time of `import fxexpand`)
    import onnxruntime as ort

    dest = check_output_path(path)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError("export_onnx needs example_inputs made of tensors")
    m = explicit_same_padding(copy.deepcopy(model).eval())
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp",
                                   dir=str(dest.parent if str(dest.parent) else "."))
    except OSError as e:
        raise ExportError(f"cannot create files next to {dest} ({e.strerror or e}); choose another output path") from e
    os.close(fd)
    try:
        try:
            _torch_export(m, inputs, tmp, opset, dynamo)
        except Exception as e:
            if dynamo:
                raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
            logger.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", e)
            try:
                _torch_export(m, inputs, tmp, opset, True)
            except Exception as e2:
                raise ExportError(f"torch.onnx.export failed: {type(e2).__name__}: {e2}") from e2
        if check:
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except Exception as e:
                raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
            try:
                sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
                feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
                got = sess.run(None, feeds)
            except Exception as e:
                raise ExportError(f"onnxruntime could not run the exported model: {e}") from e
            with torch.no_grad():
                want = [t for _, t in flatten_outputs(m(*inputs))]
            if len(got) != len(want):
                raise ExportError(f"onnxruntime returned {len(got)} outputs, torch {len(want)}")
            for i, (g, w) in enumerate(zip(got, want)):
                w = w.detach().cpu().numpy()
                if g.shape != w.shape:
                    raise ExportError(f"output {i}: onnxruntime shape {g.shape} vs torch {w.shape}")
                err = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) if w.size else 0.0
                scale = float(np.abs(w).max()) if w.size else 0.0
                if not np.isfinite(err) or err > atol + rtol * scale:
                    raise ExportError(
                        f"output {i}: onnxruntime differs from torch by {err:.3e} (scale {scale:.3e})"
                    )
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise ExportError(f"could not write {dest} ({e.strerror or e}); choose another output path") from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest
