"""The cost gate (cost.py): both sides of its threshold, the graph unchanged
where it says no, its decisions in the report and the log, and the fitted
device model against the GPU measurements it was fitted to."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import FuseConfig, Reason
from fxfuse.cost import DEVICES, gemm_us, predicted_speedup

from conftest import capture_with_inputs, fuse_and_compare
from test_no_fuse import Pair, assert_left_alone

CALIBRATION = Path(__file__).resolve().parents[1] / "docs" / "results" / "h200_gate_calibration.json"


def pair_graph(rows: int, k: int = 64, n: int = 64):
    torch.manual_seed(0)
    model = Pair(nn.Linear(k, n), nn.Linear(k, n))
    return capture_with_inputs(model, torch.randn(1, rows, k))


@pytest.mark.parametrize("side", ["below", "at"])
def test_gate_threshold_both_sides(side):
    # 10 rows, K 4, widths 3 + 3, fp32 on the CPU model: the prediction is
    # what the gate compares; the threshold is set just above it, then at it.
    gm, inputs = capture_with_inputs(Pair(nn.Linear(4, 3), nn.Linear(4, 3)), torch.randn(2, 5, 4))
    p = predicted_speedup(DEVICES["cpu"], 10, 4, [3, 3], torch.float32)
    if side == "below":
        report = assert_left_alone(gm, Reason.PREDICTED_GAIN_TOO_SMALL, 2,
                                   config=FuseConfig(min_speedup=p * 1.0001), inputs=inputs)
        (d,) = report.gate
        assert not d.fused and d.rows == 10 and d.k == 4 and d.widths == (3, 3)
        assert math.isclose(d.predicted, p)
    else:
        report = fuse_and_compare(gm, inputs, FuseConfig(min_speedup=p))
        assert report.removed == 1 and report.gate[0].fused


def test_no_fuse_predicted_gain_too_small_by_default():
    # 4096 rows x K 64 x 64 + 64 (fp32, CPU model): compute-bound, the fused
    # GEMM saves one overhead of 5 us out of about 2 x 340: predicted ~1.01x.
    gm, inputs = pair_graph(4096)
    report = assert_left_alone(gm, Reason.PREDICTED_GAIN_TOO_SMALL, 2, inputs=inputs)
    (d,) = report.gate
    assert d.rows == 4096 and d.predicted < 1.05 and "left alone" in str(d)
    assert "predicted_gain_below_min_speedup" in str(report) and "< 1.05" in str(report)


def test_fuse_small_rows_by_default():
    gm, inputs = pair_graph(8)  # overhead-bound: predicted near 2x
    report = fuse_and_compare(gm, inputs)
    assert report.removed == 1
    (d,) = report.gate
    assert d.fused and d.predicted > 1.5
    assert "fused" in str(report).split("cost gate")[1]


def test_gate_off_fuses_large_rows():
    gm, inputs = pair_graph(4096)
    report = fuse_and_compare(gm, inputs, FuseConfig(min_speedup=None))
    assert report.removed == 1 and report.gate[0].predicted is None


def test_max_rows_overrides_the_gate():
    gm, inputs = pair_graph(8)  # the gate would fuse
    report = assert_left_alone(gm, Reason.TOO_MANY_ROWS, 2, config=FuseConfig(max_rows=4), inputs=inputs)
    assert "rows 8 > max_rows 4" in report.gate[0].why


def test_gate_passes_symbolic_rows():
    model = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    gm, inputs = capture_with_inputs(model, torch.randn(2, 5, 4), dynamic=True)
    report = fuse_and_compare(gm, inputs)
    assert report.removed == 1 and report.gate[0].rows is None


def test_gate_decision_logged_at_debug(caplog):
    gm, _ = pair_graph(4096)
    with caplog.at_level(logging.DEBUG, logger="fxfuse"):
        fxfuse.fuse_linears(gm)
    assert any("gate" in r.getMessage() and "rows 4096" in r.getMessage() for r in caplog.records)


def test_gate_left_alone_logged_at_info(caplog):
    # TORCH_LOGS=fxfuse (INFO) names what the gate left alone, with its numbers.
    torch.manual_seed(0)
    model = Pair(nn.Linear(64, 64), nn.Linear(64, 64))
    be = fxfuse.backend(inner="eager", min_speedup=100.0)  # no prediction reaches it
    x = torch.randn(8, 64)
    with caplog.at_level(logging.INFO, logger="fxfuse"), torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    assert be.report.removed == 0 and not be.report.gate[0].fused
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("cost gate left 1 of 1" in m and "rows 8" in m and "< 100" in m for m in lines), lines


def test_gate_decisions_survive_as_dict():
    gm, _ = pair_graph(8)
    report = fxfuse.fuse_linears(gm)
    again = fxfuse.FuseReport.from_dict(json.loads(json.dumps(report.as_dict())))
    assert again.gate == report.gate


def test_min_speedup_validated():
    for bad in (0, -1.0, "1.05", True):
        with pytest.raises(ValueError, match="min_speedup"):
            FuseConfig(min_speedup=bad)


def test_cuda_model_fits_h200_measurements():
    """The fitted model against every point it was fitted to (bf16, H200):
    no group the gate fuses measured slower than 0.99x, and the single-GEMM
    times are predicted within 15% (RMS of the log error)."""
    data = json.loads(CALIBRATION.read_text())
    dev, bf16 = DEVICES["cuda"], torch.bfloat16
    errors = []
    for p in data["points"]:
        rows, k, widths = p["rows"], p["k"], p["widths"]
        measured = p["separate_us"] / p["fused_us"]
        predicted = predicted_speedup(dev, rows, k, widths, bf16)
        if predicted >= FuseConfig().min_speedup:
            assert measured >= 0.99, (p["case"], rows, predicted, measured)
        errors.append(math.log(gemm_us(dev, rows, k, sum(widths), 2, 2, True) / p["fused_us"]))
    assert math.sqrt(sum(e * e for e in errors) / len(errors)) < 0.15


def test_cuda_model_decisions_on_known_shapes():
    dev, bf16 = DEVICES["cuda"], torch.bfloat16
    llama_qkv = (4096, [4096] * 3)
    assert predicted_speedup(dev, 1, *llama_qkv, bf16) > 1.05  # decode
    assert predicted_speedup(dev, 64, *llama_qkv, bf16) > 1.05  # decode, batch 64
    assert predicted_speedup(dev, 2048, *llama_qkv, bf16) < 1.05  # prefill 2048
    assert predicted_speedup(dev, 8192, 320, [320] * 3, bf16) > 1.05  # SD 1.5 U-Net, 64x64, batch 2
