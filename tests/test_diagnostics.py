"""stable_rank, feasibility, lowrank_norm, adapter_report and the monitor."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stiefel_opt import functional as F
from stiefel_opt.adapters import AdapterConfig, AdapterMonitor, adapter_layers, inject_adapters
from stiefel_opt.diagnostics import Report, adapter_report, feasibility, lowrank_norm, snapshot, stable_rank


@given(n=st.integers(4, 20), m=st.integers(4, 20), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_factored_stable_rank_and_norm_match_dense(n, m, r, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, m, generator=g, dtype=torch.float64)
    dense = b @ a
    s = torch.linalg.svdvals(dense)
    expected = float((s * s).sum() / s[0] ** 2)
    assert stable_rank(b, a) == pytest.approx(expected, rel=1e-4)
    assert stable_rank(dense) == pytest.approx(expected, rel=1e-4)
    assert 1.0 - 1e-6 <= stable_rank(b, a) <= r + 1e-6
    assert lowrank_norm(b, a) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-4)


def test_stable_rank_extremes():
    q = F.random_point(30, 5, dtype=torch.float64)
    assert stable_rank(q, q.T) == pytest.approx(5.0, rel=1e-5)  # equal singular values: sr = rank
    u = torch.randn(30, 1)
    assert stable_rank(u, torch.randn(1, 12)) == pytest.approx(1.0, rel=1e-5)
    assert stable_rank(torch.zeros(6, 3), torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError, match="do not chain"):
        stable_rank(torch.randn(6, 3), torch.randn(2, 4))


def test_feasibility_is_gram_gap():
    q = F.random_point(20, 4, dtype=torch.float64)
    assert feasibility(q) < 1e-12
    assert feasibility(q.T) < 1e-12  # wide: orthonormal rows
    assert feasibility(2 * q) == pytest.approx(3 * 2.0, rel=1e-9)  # ‖(4−1) I_4‖_F = 6


def _model(method):
    from test_adapters import Toy, randomize

    m = inject_adapters(Toy(), AdapterConfig(method, r=2, target_modules=["q_proj"]))
    for layer in adapter_layers(m).values():
        randomize(layer)
    return m


def test_adapter_report_rows_and_update_norm():
    m = _model("polar")
    before = snapshot(m)
    rows = adapter_report(m)
    assert isinstance(rows, Report) and [r["module"] for r in rows] == ["layers.0.q_proj", "layers.1.q_proj"]
    layer = adapter_layers(m)["layers.0.q_proj"]
    dense = layer.delta_weight().detach()
    assert rows[0]["delta_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-4)
    assert rows[0]["stable_rank"] == pytest.approx(stable_rank(dense), rel=1e-4)
    assert rows[0]["feasibility"] < 1e-5 and rows[0]["update_norm"] is None
    with torch.no_grad():
        layer.theta.add_(0.1)
        layer.X.mul_(1.01)
    rows = adapter_report(m, before)
    moved = layer.delta_weight().detach() - before["layers.0.q_proj"][0] @ before["layers.0.q_proj"][1]
    assert rows[0]["update_norm"] == pytest.approx(float(torch.linalg.matrix_norm(moved)), rel=1e-4)
    assert rows[1]["update_norm"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["feasibility"] == pytest.approx(feasibility(layer.X), rel=1e-6) and rows[0]["feasibility"] > 1e-2
    text = str(rows)
    assert text.splitlines()[0].split() == ["module", "method", "r", "finite", "delta_norm", "stable_rank",
                                            "feasibility", "update_norm"]
    assert len(text.splitlines()) == 3 and "layers.1.q_proj" in text


def test_monitor_reports_every_n_steps():
    m = _model("lora")
    seen = []
    mon = AdapterMonitor(m, every=2, log=lambda step, rep: seen.append(step))
    results = [mon.step() for _ in range(5)]
    assert [r is not None for r in results] == [False, True, False, True, False]
    assert seen == [2, 4] and [s for s, _ in mon.history] == [2, 4]
    assert set(mon.history[0][1].summary()) == {"stable_rank_mean", "feasibility_max", "update_norm_mean",
                                                "nonfinite_layers"}
    with pytest.raises(ValueError, match="every"):
        AdapterMonitor(m, every=0)


@pytest.mark.parametrize("method", ["lora", "polar", "symlora"])
def test_report_flags_a_nan_factor_instead_of_raising(method):
    m = _model(method)
    before = snapshot(m)
    layer = adapter_layers(m)["layers.1.q_proj"]
    with torch.no_grad():
        next(p for n, p in layer.named_parameters() if not n.startswith("base_layer.")).fill_(float("nan"))
    rows = adapter_report(m, before)
    good, bad = rows
    assert good["finite"] and not bad["finite"]
    assert all(math.isnan(bad[k]) for k in ("delta_norm", "stable_rank", "update_norm"))
    assert math.isfinite(good["stable_rank"]) and good["update_norm"] == pytest.approx(0.0, abs=1e-6)
    summary = rows.summary()
    assert summary["nonfinite_layers"] == 1 and math.isnan(summary["stable_rank_mean"])
    if method != "lora":
        assert math.isnan(bad["feasibility"]) and math.isnan(summary["feasibility_max"])
    assert "nan" in str(rows)


def test_monitor_keeps_running_through_a_nan_factor():
    m = _model("polar")
    mon = AdapterMonitor(m, every=1)
    with torch.no_grad():
        m.layers[0].q_proj.X.fill_(float("nan"))
    report = mon.step()
    assert report.summary()["nonfinite_layers"] == 1 and len(mon.history) == 1
