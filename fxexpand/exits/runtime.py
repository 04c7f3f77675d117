"""BoostNet at deployment: one ONNX file per segment plus ``policy.json`` (:func:`export`), and
:class:`Runner`, which runs them in onnxruntime, computes ``F_n = t_n · F_{n-1} + f_n`` and stops at
the first exit whose max-softmax confidence reaches its threshold."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import ExportError, InputError, unwrap
from ..deploy.export import check_output_path, export_onnx
from .model import segments
from .policy import Policy

__all__ = ["export", "Runner"]


def export(model: nn.Module, example_inputs: Any, out_dir: str | os.PathLike, policy: Policy) -> Path:
    """Write ``segment_<n>.onnx`` (each checked against torch in onnxruntime by
    :func:`fxexpand.export_onnx`) and ``policy.json`` (the segments' input and output names, the
    thresholds and temperatures) into ``out_dir``; returns the directory."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new directory for the segments")
    check_output_path(out.parent / f".{out.name}.probe")
    segs = segments(model, example_inputs)
    if len(policy.thresholds) != len(segs):
        raise InputError(f"the policy has {len(policy.thresholds)} thresholds for {len(segs)} exits")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:  # everything is written to a temporary directory first: no partial result on failure
        manifest = []
        for k, s in enumerate(segs):
            path = export_onnx(_Named(s.module), s.example, tmp / f"segment_{k + 1}.onnx")
            manifest.append({"file": path.name, "inputs": s.inputs, "outputs": s.outputs, "logits": s.logits})
        inputs = [n.name for n in unwrap(model).graph.nodes if n.op == "placeholder"]  # as segments() reads them
        payload = {"format": "fxexpand-early-exit", "version": 1, "inputs": inputs, "segments": manifest,
                   "policy": policy.to_dict()}
        (tmp / "policy.json").write_text(json.dumps(payload, indent=2, allow_nan=False))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _Named(nn.Module):
    """Exports a segment with its outputs as a flat tuple."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        res = self.module(*args)
        return res if isinstance(res, tuple) else (res,)


class Runner:
    """Early-exit inference from :func:`export`'s directory in onnxruntime: runs segment after
    segment, computes ``F_n = t_n · F_{n-1} + f_n`` and returns ``(label, exit index)`` (1-based) at
    the first exit whose max-softmax confidence reaches its threshold."""

    def __init__(self, directory: str | os.PathLike, *, threads: int = 1):
        d = Path(directory)
        try:
            payload = json.loads((d / "policy.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{d} has no readable policy.json: {e}") from e
        if payload.get("format") != "fxexpand-early-exit":
            raise InputError(f"{d / 'policy.json'} is not an fxexpand early-exit manifest")
        self.policy = Policy.from_dict(payload["policy"])
        self.inputs = list(payload.get("inputs") or payload["segments"][0]["inputs"])
        import onnxruntime as ort  # lazy: only deployment needs it (import time of `import fxexpand`)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.segments = []
        for s in payload["segments"]:
            sess = ort.InferenceSession(str(d / s["file"]), opts, providers=["CPUExecutionProvider"])
            self.segments.append((sess, [i.name for i in sess.get_inputs()], s))

    def __call__(self, *inputs: Any) -> tuple[int, int]:
        """Label and 1-based exit index for one sample (batch of 1)."""
        values: dict[str, np.ndarray] = {}
        if len(inputs) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(inputs)}")
        for name, t in zip(self.inputs, inputs):  # the model's own argument order
            values[name] = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        boosted = None
        n_exits = len(self.segments)
        for k, (sess, onnx_inputs, spec) in enumerate(self.segments):
            feeds = {o: values[v] for o, v in zip(onnx_inputs, spec["inputs"])}
            res = sess.run(None, feeds)
            for name, r in zip(spec["outputs"], res):
                values[name] = r
            f = values[spec["logits"]].astype(np.float32)  # as torch computes F_n: float32
            if boosted is None or not self.policy.boost:
                boosted = f
            else:
                boosted = np.float32(self.policy.temperatures[k - 1]) * boosted + f
            z = boosted - boosted.max(axis=1, keepdims=True)
            conf = float((np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).max())
            if k == n_exits - 1 or conf >= self.policy.thresholds[k]:
                return int(boosted.argmax(axis=1)[0]), k + 1
        raise AssertionError("unreachable: the last exit always answers")
