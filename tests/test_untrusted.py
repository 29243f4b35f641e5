"""Untrusted inputs: adapter checkpoints (JSON fields, weights, digests, Stiefel factors), the
benchmark's tensor cache, and the torch floor that keeps ``weights_only`` loading safe."""
import configparser
import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import Toy, randomize

from stiefel_opt.adapters import (
    AdapterConfig,
    AdapterState,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapters,
)
from stiefel_opt.adapters.io import CONFIG_NAME, WEIGHTS_NAME, save_adapters

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def fail(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def saved(tmp_path, method="polar", **kw):
    model = inject_adapters(Toy(), AdapterConfig(method, r=2, target_modules=["q_proj", "v_proj"], **kw))
    for layer in adapter_layers(model).values():
        randomize(layer)
    save_adapters(model, tmp_path)
    return model


def edit_config(tmp_path, fn):
    path = tmp_path / CONFIG_NAME
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def rewrite_weights(tmp_path, fn):
    """Change the weights file and re-sign it (the JSON's digest follows): a crafted checkpoint."""
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    digest = hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    edit_config(tmp_path, lambda m: m.update(weights_sha256=digest))


def assert_untouched(model, before):
    assert not adapter_layers(model) and AdapterState.of(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def fresh_model():
    model = Toy()
    return model, copy.deepcopy(model.state_dict())


# --- item 10: the JSON is validated before the model is touched -------------------------------
def test_targets_string_is_never_run_as_a_regex(tmp_path):
    class Deep(torch.nn.Module):  # a module name of 28 characters
        def __init__(self):
            super().__init__()
            self.aaaaaaaaaaaaaaaaaaaaaaaaaaaa = Toy()

    saved(tmp_path)
    edit_config(tmp_path, lambda m: m.update(targets="(.|.)*Z"))
    model = Deep()
    with time_limit(3), pytest.raises(ValueError, match=rf"{CONFIG_NAME}.*targets must be a list of module names"):
        load_adapters(model, tmp_path)
    assert not adapter_layers(model)


def test_no_regex_from_the_checkpoint_is_compiled(tmp_path, monkeypatch):
    saved(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(target_modules="(.|.)*Z", exclude_modules="(a|a)*b"))
    compiled = []
    real = re.compile
    monkeypatch.setattr(re, "compile", lambda p, *a, **k: compiled.append(p) or real(p, *a, **k))
    monkeypatch.setattr(re, "fullmatch", lambda p, s, *a, **k: compiled.append(p) or real(p).fullmatch(s))
    load_adapters(Toy(), tmp_path)  # the saved module names, not the saved patterns, say what to wrap
    assert "(.|.)*Z" not in compiled and "(a|a)*b" not in compiled


def test_rank_is_checked_against_the_weights_before_allocating(tmp_path, monkeypatch):
    saved(tmp_path, method="lora")
    edit_config(tmp_path, lambda m: m["config"].update(r=10**6))  # LoRA has no rank limit of its own
    allocated = []
    for name in ("empty", "zeros"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *s, _real=real, **k: allocated.append(
            (s, str(k.get("device")))) or _real(*s, **k))
    model, before = fresh_model()
    with pytest.raises(ValueError, match=r"shape mismatch.*lora_A model \(1000000, 8\) vs checkpoint \(2, 8\)"):
        load_adapters(model, tmp_path)
    assert not [s for s, device in allocated if device != "meta" and 10**6 in s]
    assert_untouched(model, before)


def test_rank_inconsistent_with_the_weights_file_names_the_tensor(tmp_path):
    saved(tmp_path, method="lora")
    edit_config(tmp_path, lambda m: m["config"].update(r=3))
    model, before = fresh_model()
    with pytest.raises(ValueError, match=r"shape mismatch.*lora_A model \(3, 8\) vs checkpoint \(2, 8\)"):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)


def test_modules_to_save_cannot_name_the_root_module(tmp_path):
    saved(tmp_path, modules_to_save=["head"])
    edit_config(tmp_path, lambda m: m["config"].update(modules_to_save=[""]))
    victim, before = fresh_model()
    with pytest.raises(ValueError, match=r"modules_to_save.*empty"):
        load_adapters(victim, tmp_path)
    assert_untouched(victim, before)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "8", True])
def test_lora_alpha_must_be_a_finite_number(tmp_path, alpha):
    saved(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(lora_alpha=alpha))
    model, before = fresh_model()
    with pytest.raises((ValueError, TypeError), match=rf"{CONFIG_NAME}.*lora_alpha"):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)


def test_targets_must_agree_with_the_weights_file(tmp_path):
    saved(tmp_path)
    edit_config(tmp_path, lambda m: m.update(targets=["layers.0.q_proj"]))
    model, before = fresh_model()
    with pytest.raises(ValueError, match=r"does not fit.*unexpected 9.*layers\.0\.v_proj"):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)
    edit_config(tmp_path, lambda m: m.update(targets=["layers.0.q_proj", "layers.0.q_proj"]))
    with pytest.raises(ValueError, match="twice"):
        load_adapters(model, tmp_path)
    edit_config(tmp_path, lambda m: m.update(targets=["layers.0.nowhere"]))
    with pytest.raises(ValueError, match=r"layers\.0\.nowhere.*not a module"):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)


@pytest.mark.parametrize("content", ["[1, 2]", "not json", '{"format": 2}', '"x"'])
def test_malformed_config_names_the_file(tmp_path, content):
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(content)
    model, before = fresh_model()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_NAME))):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)


def test_unknown_top_level_keys_are_refused(tmp_path):
    saved(tmp_path)
    edit_config(tmp_path, lambda m: m.update(extra=1))
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        load_adapters(Toy(), tmp_path)


# --- item 11: digest and Stiefel factors ---------------------------------------------------------
def test_weights_from_another_save_are_refused(tmp_path):
    """Killed between the two files of a save over an older checkpoint: new weights, old JSON."""
    saved(tmp_path / "a", method="lora", lora_alpha=40)
    saved(tmp_path / "b", method="lora", lora_alpha=2)
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    model, before = fresh_model()
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*digest"):
        load_adapters(model, tmp_path / "a")
    assert_untouched(model, before)


def test_a_flipped_bit_in_the_weights_is_caught(tmp_path):
    saved(tmp_path)
    raw = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="digest"):
        load_adapters(Toy(), tmp_path)


@pytest.mark.parametrize("bad", ["scaled", "nan"])
def test_non_orthonormal_stiefel_factor_is_refused(tmp_path, bad):
    saved(tmp_path)
    key = "layers.1.v_proj.X"

    def corrupt(t):
        t[key] = t[key] * 30.0 if bad == "scaled" else t[key].clone().fill_(float("nan"))

    rewrite_weights(tmp_path, corrupt)
    model, before = fresh_model()
    what = "not orthonormal" if bad == "scaled" else "non-finite"
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*{re.escape(key)}.*{what}"):
        load_adapters(model, tmp_path)
    assert_untouched(model, before)


def test_stiefel_check_also_guards_a_model_with_adapters(tmp_path):
    saved(tmp_path, method="stella")
    rewrite_weights(tmp_path, lambda t: t.update({"layers.0.q_proj.U": 2 * t["layers.0.q_proj.U"]}))
    model = inject_adapters(Toy(), AdapterConfig("stella", r=2, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match="layers.0.q_proj.U.*not orthonormal"):
        load_adapters(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())


def test_landing_checkpoint_slightly_off_the_manifold_still_loads(tmp_path):
    """A landing optimizer leaves X near, not on, the manifold; its checkpoint must load."""
    model = inject_adapters(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        model.layers[0].q_proj.X.mul_(1.01)  # ‖XᵀX − I‖_F ≈ 0.028
    save_adapters(model, tmp_path)
    fresh = load_adapters(Toy(), tmp_path)
    assert torch.equal(fresh.layers[0].q_proj.X, model.layers[0].q_proj.X)


# --- item 12: the benchmark's cache and the torch floor ------------------------------------------
def test_finetune_cache_is_loaded_weights_only(tmp_path, monkeypatch):
    from benchmarks import finetune

    calls = []

    def fake_load(path, *args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(finetune.torch, "load", fake_load)
    monkeypatch.setattr(finetune.Path, "is_file", lambda self: True)
    with pytest.raises(RuntimeError, match="stop"):
        finetune.load_cached(None, None, 2, 4, 4, tmp_path)
    assert calls == [{"weights_only": True}]


# Private torch APIs the package calls, each with a check of the signature it needs.
_adam, _sgd, _optimizer = (importlib.import_module(f"torch.optim.{m}") for m in ("adam", "sgd", "optimizer"))
PRIVATE_APIS = {
    "torch.optim.adam.adam(..., decoupled_weight_decay=)": lambda: "decoupled_weight_decay" in
    inspect.signature(_adam.adam).parameters,
    "torch.optim.sgd.sgd(..., fused=, grad_scale=, found_inf=)": lambda: {"fused", "grad_scale", "found_inf"}
    <= set(inspect.signature(_sgd.sgd).parameters),
    "torch.optim.Adam._init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)":
    lambda: len(inspect.signature(torch.optim.Adam._init_group).parameters) == 8,
    "torch.optim.SGD._init_group(self, group, params, grads, momentum_buffer_list)":
    lambda: len(inspect.signature(torch.optim.SGD._init_group).parameters) == 5,
    "torch.optim.Optimizer._accelerator_graph_capture_health_check": lambda: callable(
        getattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", None)),
    "torch.optim.optimizer._get_scalar_dtype": lambda: callable(_optimizer._get_scalar_dtype),
    "torch.optim.optimizer._use_grad_for_differentiable": lambda: callable(_optimizer._use_grad_for_differentiable),
}
# The newest of them: Adam's functional form takes decoupled_weight_decay from torch 2.7 (the
# AdamW-into-Adam refactor, pytorch/pytorch#118857, merged after the 2.6 branch cut).
NEWEST_API_SINCE = (2, 7)


def torch_floor() -> tuple[int, int]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    (torch_req,) = [r for r in reqs if re.match(r"torch\b", r)]
    m = re.fullmatch(r"torch\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?", torch_req)
    assert m, f"setup.cfg: torch requirement {torch_req!r} has no '>=X.Y' floor"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("api", sorted(PRIVATE_APIS))
def test_installed_torch_has_the_private_apis_used(api):
    assert PRIVATE_APIS[api](), f"torch {torch.__version__} lacks {api}"


def test_torch_floor_covers_the_newest_private_api():
    floor = torch_floor()
    assert floor >= NEWEST_API_SINCE, f"setup.cfg allows torch {floor}; adam(decoupled_weight_decay=) needs 2.7"
    assert floor >= (2, 6), "torch.load defaults to weights_only=True only from torch 2.6"
