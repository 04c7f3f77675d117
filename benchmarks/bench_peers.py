"""Contraction peers on their own ground (suite section ``peers``): RepVGG- and DBB-style blocks.

Each block is written as an ordinary training-time PyTorch module; the *reference* contraction is
derived here from the papers' formulas (RepVGG, Ding et al. 2021, Sec. 3.3; Diverse Branch Block,
Ding et al. 2021, transforms I-III and VI), independent of fxexpand:

* BN into the conv before it (transform I): with ``s = γ/√(σ²+ε)``,
  ``BN(W*x) = (s·W)*x + (β - μ·s)``.
* Parallel branches (transform II): kernels and biases add after the smaller kernels are
  zero-padded to the largest one, centred (a 1x1 becomes a k×k with only its centre tap).
* Identity branch through a BN (RepVGG): the identity is the k×k kernel with a 1 at the centre of
  channel c -> c, so ``BN(x)`` is that kernel times ``s`` plus the bias ``β - μ·s``.
* 1x1 -> BN -> k×k sequence (DBB transform III): after folding each BN,
  ``K[o,i] = Σ_m W2[o,m] · W1[m,i]`` (a k×k kernel) and ``b = Σ_{m,h,w} W2[o,m,h,w]·b1[m] + b2[o]``.
  DBB pads the intermediate with the value ``b1`` (the first BN's output for a zero input) so the
  formula is exact at the borders; a 1x1 conv with padding k//2 followed by the BN produces exactly
  that padding, so the blocks below put the padding on the 1x1 and none on the k×k.

The deployed block is one k×k conv with the block's stride and padding k//2, then the ReLU.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import log
from torch import nn

import fxexpand
from fxexpand.testing import randomize_bn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block: 3x3-BN + 1x1-BN (+ BN identity when shapes allow), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn3 = _bn(cout)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.bn1 = _bn(cout)
        self.bn_id = _bn(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return F.relu(y)


class DBBBlock(nn.Module):
    """Training-time Diverse Branch Block (k×k-BN, 1x1-BN, 1x1-BN-k×k-BN), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3, mid: int | None = None):
        super().__init__()
        mid = mid or cin
        self.stride, self.k = stride, k
        self.conv_k = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn_k = _bn(cout)
        self.conv_1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.bn_1 = _bn(cout)
        # padding on the 1x1, none on the k×k: the border of the intermediate is the BN's bias (DBB)
        self.seq_1 = nn.Conv2d(cin, mid, 1, 1, k // 2, bias=False)
        self.seq_bn1 = _bn(mid)
        self.seq_k = nn.Conv2d(mid, cout, k, stride, 0, bias=False)
        self.seq_bn2 = _bn(cout)

    def forward(self, x):
        a = self.bn_k(self.conv_k(x))
        b = self.bn_1(self.conv_1(x))
        c = self.seq_bn2(self.seq_k(self.seq_bn1(self.seq_1(x))))
        return F.relu(a + b + c)


def repvgg_net(width: int = 16) -> nn.Sequential:
    w = width
    cfg = [(3, w, 2), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2),
           (4 * w, 4 * w, 1), (4 * w, 4 * w, 1)]
    return nn.Sequential(*[RepVGGBlock(a, b, s) for a, b, s in cfg])


def dbb_net(width: int = 16) -> nn.Sequential:
    w = width
    cfg = [(3, w, 2, 3), (w, w, 1, 3), (w, 2 * w, 2, 3), (2 * w, 2 * w, 1, 5), (2 * w, 4 * w, 2, 3),
           (4 * w, 4 * w, 1, 3)]
    return nn.Sequential(*[DBBBlock(a, b, s, k) for a, b, s, k in cfg])


def _fold(w: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return w * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s


def _centre(w: torch.Tensor, k: int) -> torch.Tensor:
    p = (k - w.shape[-1]) // 2
    return F.pad(w, [p, p, p, p])


def reference_block(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(kernel, bias, stride, padding) of the deployed conv, from the papers' formulas."""
    with torch.no_grad():
        if isinstance(block, RepVGGBlock):
            k = 3
            w3, b3 = _fold(block.conv3.weight, block.bn3)
            w1, b1 = _fold(block.conv1.weight, block.bn1)
            w, b = w3 + _centre(w1, k), b3 + b1
            if block.bn_id is not None:
                c = w.shape[0]
                eye = torch.zeros_like(w)
                eye[torch.arange(c), torch.arange(c), k // 2, k // 2] = 1.0
                wi, bi = _fold(eye, block.bn_id)
                w, b = w + wi, b + bi
            return w, b, block.stride, k // 2
        if isinstance(block, DBBBlock):
            k = block.k
            wk, bk = _fold(block.conv_k.weight, block.bn_k)
            w1, b1 = _fold(block.conv_1.weight, block.bn_1)
            wa, ba = _fold(block.seq_1.weight, block.seq_bn1)       # [mid, cin, 1, 1]
            wb, bb = _fold(block.seq_k.weight, block.seq_bn2)       # [cout, mid, k, k]
            ws = torch.einsum("omhw,mi->oihw", wb, wa[:, :, 0, 0])  # K[o,i] = Σ_m W2[o,m] W1[m,i]
            bs = torch.einsum("omhw,m->o", wb, ba) + bb             # b = Σ W2·b1 + b2
            return wk + _centre(w1, k) + ws, bk + b1 + bs, block.stride, k // 2
    raise TypeError(type(block).__name__)


class DeployedNet(nn.Module):
    """The reference contraction of a stack of blocks: one conv + ReLU per block."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        convs = []
        for blk in net:
            w, b, s, p = reference_block(blk)
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], s, p, bias=True, dtype=w.dtype)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)

    def forward(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        return x


def compare(net: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Max abs / relative differences between the training-time net, the reference contraction and
    fxexpand's (target deploy), all in float64."""
    net64 = copy.deepcopy(net).double().eval()
    x64 = x.double()
    ref = DeployedNet(net64).eval()
    fx = fxexpand.contract(net64, (x64,), target="deploy", verify=False)
    with torch.no_grad():
        y, yr, yf = net64(x64), ref(x64), fx(x64)
    scale = float(y.abs().max())
    convs_left = sum(1 for m in fx.modules() if isinstance(m, nn.Conv2d))
    bn_left = sum(1 for m in fx.modules() if isinstance(m, nn.BatchNorm2d))
    return {"max_abs_ref_vs_model": float((yr - y).abs().max()), "max_abs_fx_vs_model": float((yf - y).abs().max()),
            "max_abs_fx_vs_ref": float((yf - yr).abs().max()), "output_scale": scale,
            "fx_convs": convs_left, "fx_batchnorms": bn_left, "ref_convs": len(ref.convs),
            "fx_kernel_equal_ref": _kernels_close(fx, ref)}


def _kernels_close(fx: nn.Module, ref: DeployedNet) -> bool:
    fc = [m for m in fx.modules() if isinstance(m, nn.Conv2d)]
    if len(fc) != len(ref.convs):
        return False
    return all(a.weight.shape == b.weight.shape and torch.allclose(a.weight, b.weight, rtol=1e-9, atol=1e-12)
               and torch.allclose(a.bias, b.bias, rtol=1e-9, atol=1e-12) for a, b in zip(fc, ref.convs))


CASES = {"repvgg": repvgg_net, "dbb": dbb_net}


def run(repeats: int, warmup: int, width: int = 16, side: int = 32, seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"width": width, "input": [1, 3, side, side], "repeats": repeats, "warmup": warmup,
                           "cases": {}}
    for name, build in CASES.items():
        torch.manual_seed(seed)
        net = randomize_bn(build(width), seed).eval()
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
        res: dict[str, Any] = {"blocks": len(net), "params": fxexpand.count_parameters(net)}
        res["float64"] = compare(net, x)
        # float32: the reference and fxexpand against the training-time net
        ref32 = DeployedNet(net).eval()
        fx32 = fxexpand.contract(net, (x,), target="deploy", verify=False)
        with torch.no_grad():
            y = net(x)
            res["float32"] = {"max_abs_ref_vs_model": float((ref32(x) - y).abs().max()),
                              "max_abs_fx_vs_model": float((fx32(x) - y).abs().max()),
                              "output_scale": float(y.abs().max())}
        # time to contract, the three alternately after warm-up
        fns = {"reference_formulas": lambda: DeployedNet(net),
               "fxexpand_deploy_noverify": lambda: fxexpand.contract(net, (x,), target="deploy", verify=False),
               "fxexpand_deploy_verify": lambda: fxexpand.contract(net, (x,), target="deploy", verify=True)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(warmup + repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[k].append(dt)
        res["contract_time_s"] = {k: {"median_s": float(np.median(v)), "p10_s": float(np.percentile(v, 10)),
                                      "p90_s": float(np.percentile(v, 90)), "n": len(v)} for k, v in times.items()}
        base = res["contract_time_s"]["reference_formulas"]["median_s"]
        res["time_ratio_to_reference"] = {k: v["median_s"] / base for k, v in res["contract_time_s"].items()}
        f64 = res["float64"]
        log(f"  peers {name}: fx vs reference (float64) max abs {f64['max_abs_fx_vs_ref']:.2e}, "
            f"fx vs model {f64['max_abs_fx_vs_model']:.2e} (scale {f64['output_scale']:.2f}); "
            f"{f64['fx_convs']} convs / {f64['fx_batchnorms']} BN left; time "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in res["contract_time_s"].items()))
        out["cases"][name] = res
    return out
