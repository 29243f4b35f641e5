"""Adapter state dict, save → load, mismatch errors, and exact export to a real PEFT LoRA load."""
import copy
import hashlib
import json
import os

import pytest
import torch
from test_adapters import Toy, randomize, tiny_bert, tiny_gpt2

from stiefel_opt.adapters import (
    METHODS,
    AdapterConfig,
    AdapterState,
    adapter_layers,
    adapter_state_dict,
    export_peft,
    inject_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from stiefel_opt.adapters.io import CONFIG_NAME, WEIGHTS_NAME

# PEFT 0.21 reads a transformers property that transformers 5.x deprecates (third-party warning).
PEFT_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def adapted(model, config):
    inject_adapters(model, config)
    for layer in adapter_layers(model).values():
        randomize(layer)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_into_fresh_model(method, tmp_path):
    model = Toy()
    fresh = copy.deepcopy(model)
    adapted(model, AdapterConfig(method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                 modules_to_save=["head"]))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_adapters(model, tmp_path)
    x = torch.randn(4, 8)
    assert not torch.allclose(fresh(x), model(x))
    load_adapters(fresh, tmp_path)
    assert sorted(adapter_layers(fresh)) == sorted(adapter_layers(model))
    assert torch.equal(fresh(x), model(x))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(fresh))


def test_adapter_state_dict_keys_are_model_names():
    model = adapted(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    keys = sorted(adapter_state_dict(model))
    assert keys == [f"layers.{i}.q_proj.{p}" for i in range(2) for p in ("X", "Y", "theta")]


def test_load_into_model_with_existing_adapters(tmp_path):
    cfg = AdapterConfig("stella", r=2, target_modules=["q_proj"])
    model = Toy()
    other = copy.deepcopy(model)
    adapted(model, cfg)
    save_adapters(model, tmp_path)
    inject_adapters(other, cfg)
    load_adapters(other, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(other(x), model(x))
    with pytest.raises(ValueError, match="r=4.*r=2"):
        load_adapters(inject_adapters(Toy(), AdapterConfig("stella", r=4, target_modules=["q_proj"])), tmp_path)


def test_mismatched_model_raises_and_loads_nothing(tmp_path):
    adapted_model = adapted(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj", "v_proj"]))
    save_adapters(adapted_model, tmp_path)
    fewer = inject_adapters(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in adapter_state_dict(fewer).items()}
    with pytest.raises(ValueError, match=r"does not fit.*unexpected 6.*v_proj"):
        load_adapters(fewer, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(fewer).items())

    class Wider(Toy):
        def __init__(self):
            super().__init__()
            for b in self.layers:
                b.q_proj = torch.nn.Linear(8, 12)
                b.v_proj = torch.nn.Linear(12, 8)

    wider = Wider()
    with pytest.raises(ValueError, match=r"shape mismatch.*q_proj\.X model \(12, 2\) vs checkpoint \(8, 2\)"):
        load_adapters(wider, tmp_path)
    assert not adapter_layers(wider) and AdapterState.of(wider) is None  # injection undone
    assert all(p.requires_grad for p in wider.parameters())
    assert type(wider.layers[0].q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="not found"):
        load_adapters(Toy(), tmp_path / "nowhere")
    garbage = b"not a safetensors file"  # with a matching digest: the file itself is unreadable
    (tmp_path / WEIGHTS_NAME).write_bytes(garbage)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = Toy()
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file"):
        load_adapters(fresh, tmp_path)
    assert not adapter_layers(fresh) and all(p.requires_grad for p in fresh.parameters())


def test_saving_a_merged_model_is_refused(tmp_path):
    model = merge_adapters(adapted(Toy(), AdapterConfig("lora", r=2, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="merged"):
        save_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(Toy(), tmp_path)


# --- exact export to PEFT ----------------------------------------------------------------------
def _targets(method, arch):
    if method == "symlora":  # square weights only
        return ["query", "value", "attention.output.dense"] if arch == "bert" else ["attn.c_proj"]
    return "all-linear"


@pytest.mark.filterwarnings(PEFT_WARNING)
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_export_loads_in_peft_with_identical_outputs(method, arch, tmp_path):
    from peft import PeftModel

    model = tiny_gpt2() if arch == "gpt2" else tiny_bert(num_labels=3)
    base = copy.deepcopy(model)
    saved = ["classifier"] if arch == "bert" else None
    adapted(model, AdapterConfig(method, r=2, lora_alpha=3, target_modules=_targets(method, arch),
                                 modules_to_save=saved))
    if saved:
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    export_peft(model, tmp_path, task_type="CAUSAL_LM" if arch == "gpt2" else "SEQ_CLS")

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["peft_type"] == "LORA"
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and cfg["use_dora"] is (method == "dora")
    assert cfg["target_modules"] == sorted(adapter_layers(model))

    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        reference = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
        theirs = peft_model(input_ids=ids).logits
    assert (ours - reference).abs().max() > 1e-3  # the adapters do change the function
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_dora_export_uses_peft_magnitude_key(tmp_path):
    from safetensors.torch import load_file

    model = adapted(Toy(), AdapterConfig("dora", r=2, target_modules=["q_proj"]))
    export_peft(model, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.layers.0.q_proj.lora_magnitude_vector" in keys
    assert "base_model.model.layers.0.q_proj.lora_A.weight" in keys
    assert len(keys) == 6


# --- atomic saves (issue 14) ---------------------------------------------------------------------
def test_save_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (ckpt / name).symlink_to(victim)
    model = adapted(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    save_adapters(model, ckpt)
    assert victim.read_text() == "keep me"
    assert not any((ckpt / n).is_symlink() for n in (WEIGHTS_NAME, CONFIG_NAME))
    assert torch.equal(load_adapters(Toy(), ckpt).layers[0].q_proj.X, model.layers[0].q_proj.X)
    export_peft(model, tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()
    (tmp_path / "peft" / "adapter_config.json").symlink_to(victim)
    export_peft(model, tmp_path / "peft")
    assert victim.read_text() == "keep me"


def test_interrupted_save_leaves_the_old_checkpoint_or_a_clear_error(tmp_path, monkeypatch):
    old = adapted(Toy(), AdapterConfig("lora", r=2, lora_alpha=40, target_modules=["q_proj"]))
    save_adapters(old, tmp_path)
    new = adapted(Toy(), AdapterConfig("lora", r=2, lora_alpha=2, target_modules=["q_proj"]))
    real_replace = os.replace

    def killed_after_weights(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(WEIGHTS_NAME):
            raise KeyboardInterrupt  # the process dies between the two renames

    monkeypatch.setattr(os, "replace", killed_after_weights)
    with pytest.raises(KeyboardInterrupt):
        save_adapters(new, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp left
    fresh = Toy()
    with pytest.raises(ValueError, match="digest"):  # new weights, old scaling: refused, not loaded
        load_adapters(fresh, tmp_path)
    assert not adapter_layers(fresh)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    base = Toy()
    model = adapted(copy.deepcopy(base), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    save_adapters(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_adapters(adapted(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"])), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    x = torch.randn(3, 8)
    assert torch.equal(load_adapters(base, tmp_path)(x), model(x))


@pytest.mark.parametrize("scale", [float("nan"), 2.0])
def test_a_stiefel_factor_far_off_the_manifold_is_not_saved(tmp_path, scale):
    model = adapted(Toy(), AdapterConfig("polar", r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        model.layers[1].q_proj.Y.mul_(scale)
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj\.Y .*not saved"):
        save_adapters(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_load_wraps_exactly_the_saved_modules_not_others_ending_in_their_names(tmp_path):
    """A saved target 'enc.proj' must not also wrap 'x.enc.proj' on load (names matched whole)."""
    from torch import nn

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Inner()
            self.x = nn.Module()
            self.x.enc = Inner()

    torch.manual_seed(0)
    model = Outer()
    fresh = copy.deepcopy(model)
    adapted(model, AdapterConfig("lora", r=2, lora_alpha=2, target_modules=["enc.proj"],
                                 exclude_modules=["x.enc.proj"]))
    assert sorted(adapter_layers(model)) == ["enc.proj"]
    save_adapters(model, tmp_path)
    load_adapters(fresh, tmp_path)
    assert sorted(adapter_layers(fresh)) == ["enc.proj"]


def test_a_non_finite_non_stiefel_tensor_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Toy()
    fresh = copy.deepcopy(model)
    adapted(model, AdapterConfig("polar", r=2, lora_alpha=2, target_modules=["q_proj"]))
    save_adapters(model, tmp_path)
    w = tmp_path / WEIGHTS_NAME
    tensors = load_file(w)
    key = next(k for k in tensors if k.endswith("theta"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, w)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        load_adapters(fresh, tmp_path)
    assert not adapter_layers(fresh)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


def test_safe_merge_checks_every_layer_before_writing_any():
    from stiefel_opt.adapters import merge_and_unload

    model = Toy()
    adapted(model, AdapterConfig("lora", r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    layers = adapter_layers(model)
    names = sorted(layers)
    with torch.no_grad():
        layers[names[-1]].lora_B.fill_(float("nan"))
    weights = {n: layers[n].base_layer.weight.clone() for n in names}
    for merge in (merge_adapters, merge_and_unload):
        with pytest.raises(ValueError, match="NaN/Inf"):
            merge(model, safe_merge=True)
        assert sorted(adapter_layers(model)) == names and AdapterState.of(model) is not None
        assert not any(layer.merged for layer in adapter_layers(model).values())
        assert all(torch.equal(adapter_layers(model)[n].base_layer.weight, weights[n]) for n in names)
