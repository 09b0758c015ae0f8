"""The cost gate: does one fused GEMM beat the separate ones, for this
group's shapes on this device?

A GEMM of `rows` x `K` by `K` x `N` is modelled as

    t(rows, K, N) = max(2·rows·K·N / flops, bytes / bandwidth) + overhead
    bytes = itemsize · (rows·K + K·N + rows·N)         (x, w and y, once each)

and a group of widths N1..Nk as

    predicted speedup = (t(rows, K, N1) + ... + t(rows, K, Nk)) / t(rows, K, N1 + ... + Nk)

Fusing saves the k - 1 extra reads of x and k - 1 kernel overheads (launch
tail, the wave that does not fill the chip); it never saves FLOPs. So the
prediction is high where the GEMMs are small or memory-bound (decode, narrow
projections, U-Net attention at K = 320) and falls to 1.0 where they are
large and compute-bound (a 2048-token prefill at K = 4096).

The device's numbers are fitted to measurements, not taken from a datasheet:
`benchmarks/gate_calibrate.py` timed fused and separate bf16 GEMMs for 108
(rows, K, widths) points on an H200 (torch 2.11), and the fit
(docs/results/h200_gate_calibration.json; docs/design.md, "The cost gate")
predicts the measured single-GEMM times within 12% (RMS of the log error).
A group is fused when the prediction reaches `FuseConfig.min_speedup` (1.05,
chosen: docs/design.md says why). The CPU numbers are chosen, not measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import fx

from .legality import Reason, check_rows, static_rows
from .forms import Linear, value_of

if TYPE_CHECKING:
    from .config import FuseConfig

__all__ = ["Device", "GateDecision", "DEVICES", "check", "decisions", "gemm_us", "predicted_speedup"]

log = logging.getLogger(__name__)

_META_KEY = "fxfuse_gate"  # gm.meta: the gate's decisions, collected by `decisions`


@dataclass(frozen=True)
class Device:
    """The ceilings a GEMM is modelled against."""

    tflops_16bit: float  # bf16 / fp16 GEMM rate reached, TFLOP/s
    tflops_32bit: float
    bandwidth_gbps: float  # device memory, GB/s (bytes read + written)
    overhead_us: float  # per GEMM: launch tail and the last, partial wave


DEVICES = {
    # Fitted to an H200 (docs/results/h200_gate_calibration.json): 650 TFLOP/s
    # (the 8192^3 GEMM alone reached 786), 3900 GB/s (a 1 GiB copy: 4208),
    # 3.4 us per GEMM. fp32: the datasheet's 67 TFLOP/s, not measured.
    "cuda": Device(tflops_16bit=650.0, tflops_32bit=60.0, bandwidth_gbps=3900.0, overhead_us=3.4),
    # Chosen, not measured: a few cores of a server CPU.
    "cpu": Device(tflops_16bit=0.2, tflops_32bit=0.2, bandwidth_gbps=20.0, overhead_us=5.0),
}


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one set of siblings, with its numbers."""

    input: str  # the shared input node
    members: tuple[str, ...]
    rows: Optional[int]  # None: symbolic
    k: int
    widths: tuple[int, ...]
    dtype: str
    device: str
    predicted: Optional[float]  # separate time / fused time; None where not predicted
    fused: bool  # False: left alone by the gate or by max_rows
    why: str  # "predicted 1.65x", "predicted 1.02x < 1.05", "rows 4096 > max_rows 512", ...
    graph: int = 0  # index of the compiled graph (backend reports)

    def __str__(self) -> str:
        rows = "symbolic" if self.rows is None else str(self.rows)
        return (f"rows {rows}, K {self.k}, widths {'+'.join(map(str, self.widths))}, {self.dtype}: "
                f"{self.why}: {'fused' if self.fused else 'left alone'}")


def gemm_us(dev: Device, rows: int, k: int, n: int, itemsize: int, w_itemsize: int, sixteen_bit: bool) -> float:
    """Modelled time of one (rows x k) @ (k x n) GEMM, in microseconds."""
    flops = 2.0 * rows * k * n
    rate = (dev.tflops_16bit if sixteen_bit else dev.tflops_32bit) * 1e6  # flop per us
    moved = itemsize * (rows * k + rows * n) + w_itemsize * k * n
    return max(flops / rate, moved / (dev.bandwidth_gbps * 1e3)) + dev.overhead_us


def predicted_speedup(dev: Device, rows: int, k: int, widths: list[int], dtype: torch.dtype,
                      w_dtype: Optional[torch.dtype] = None, fused_widths: Optional[list[int]] = None) -> float:
    """The separate GEMMs' modelled time over the fused GEMM's. `fused_widths`:
    what the fused GEMM computes, where exact repeats are computed once."""
    w_dtype = w_dtype or dtype
    args = (dtype.itemsize, w_dtype.itemsize, dtype.itemsize <= 2)
    separate = sum(gemm_us(dev, rows, k, n, *args) for n in widths)
    return separate / gemm_us(dev, rows, k, sum(fused_widths or widths), *args)


def check(gm: fx.GraphModule, sibs: list[Linear], config: "FuseConfig") -> Optional[Reason]:
    """May the group `sibs` (one input, members that passed every legality
    check and can share one GEMM) be fused, by `max_rows` and by the
    predicted speedup? Records the decision with its numbers for the report
    (see `decisions`) and logs it at DEBUG. Runs per group, after legality:
    a member that could not join must not sink (or carry) its siblings."""
    x = sibs[0].input
    v = value_of(gm, x)
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return check_rows(gm, x, config.max_rows)  # nothing to predict from
    # Legality has run: every weight is 2-D and static, of one dtype and K.
    weights = [value_of(gm, lin.weight) for lin in sibs]
    w0 = weights[0]
    widths = [int(w.shape[0]) for w in weights]  # type: ignore[union-attr]
    # Exact repeats (same weight and bias) are computed once when fused.
    unique = list({(lin.weight, lin.bias): n for lin, n in zip(sibs, widths)}.values())
    rows, k = static_rows(v), int(w0.shape[1])  # type: ignore[union-attr]
    dtype = sibs[0].cast or w0.dtype
    dev = DEVICES.get(w0.device.type)
    predicted = None
    reason = check_rows(gm, x, config.max_rows)
    if reason is not None:
        why = f"rows {rows} > max_rows {config.max_rows}"
    elif rows is None:
        why = "rows symbolic, not predicted"
    elif config.min_speedup is None:
        why = "gate off (min_speedup=None)"
    elif dev is None:
        why = f"no cost model for {w0.device.type}"
    else:
        predicted = predicted_speedup(dev, rows, k, widths, dtype, w0.dtype, fused_widths=unique)
        if predicted < config.min_speedup:
            reason = Reason.PREDICTED_GAIN_TOO_SMALL
            why = f"predicted {predicted:.2f}x < {config.min_speedup:g}"
        else:
            why = f"predicted {predicted:.2f}x"
    decision = GateDecision(x.name, tuple(lin.name for lin in sibs), rows, k, tuple(unique),
                            str(dtype).replace("torch.", ""), w0.device.type, predicted, reason is None, why)
    gm.meta.setdefault(_META_KEY, {})[(x.name, sibs[0].node.name)] = decision
    log.debug("fxfuse: gate for input %s (%s): %s", x.name, ", ".join(decision.members), decision)
    return reason


def decisions(gm: fx.GraphModule) -> list[GateDecision]:
    """The gate's decisions for `gm`'s last plan, in graph order; forgets them."""
    return list(gm.meta.pop(_META_KEY, {}).values())
