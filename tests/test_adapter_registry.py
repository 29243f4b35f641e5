"""The open adapter registry: ``register_adapter``, a layer class's option schema, and a registered
method working with inject, merge, save, load and export_peft."""
import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from test_adapters import Toy
from torch import nn

import stiefel_opt as so
from stiefel_opt.adapters import (
    METHODS,
    AdapterConfig,
    AdapterLayer,
    AdapterState,
    adapter_layers,
    adapter_state_dict,
    export_peft,
    inject_adapters,
    load_adapters,
    merge_and_unload,
    register_adapter,
    save_adapters,
)
from stiefel_opt.adapters import base
from stiefel_opt.adapters.io import CONFIG_NAME
from stiefel_opt.adapters.layers import LAYERS

BUILT_IN = ("lora", "dora", "polar", "stella", "symlora")


@pytest.fixture
def registry():
    """Only the built-ins registered during the test (another test, e.g. the docs page of the
    tutorial, may have registered more in this process); the registry restored afterwards."""
    before = dict(base._REGISTRY)
    for name in set(before) - set(BUILT_IN):
        del base._REGISTRY[name]
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(before)


class Scaled(AdapterLayer):
    """ΔW = s·B diag(g) A with a per-rank gain g (core "vector", default) or a shared one
    ("scalar"); init "default" (A random, B = 0) or "ones" (B = 1): only delta_factors is written."""

    inits = ("default", "ones")
    cores = ("vector", "scalar")
    default_core = "vector"

    def __init__(self, base_layer, r, lora_alpha, **options):
        super().__init__(base_layer, r, lora_alpha, **options)
        fk = self.factory_kwargs
        self.A = nn.Parameter(torch.randn(r, self.in_features, **fk) / self.in_features ** 0.5)
        self.B = nn.Parameter((torch.ones if self.init == "ones" else torch.zeros)(self.out_features, r, **fk))
        self.g = nn.Parameter(torch.ones(r if self.core_kind == "vector" else 1, **fk))

    def delta_factors(self):
        return self.scaling * self.B * self.g, self.A


def test_built_ins_are_registered_in_order():
    assert tuple(METHODS)[:5] == BUILT_IN and METHODS[:5] == BUILT_IN
    assert all(LAYERS[m].method == m for m in BUILT_IN)
    assert so.register_adapter is register_adapter


def test_register_by_name_and_by_method_attribute(registry):
    assert register_adapter("scaled")(Scaled) is Scaled and Scaled.method == "scaled"
    assert "scaled" in METHODS and METHODS == (*BUILT_IN, "scaled") and LAYERS["scaled"] is Scaled

    @register_adapter
    class Named(Scaled):
        method = "named"

    assert LAYERS["named"] is Named and METHODS[-1] == "named"


def test_registering_a_name_twice_needs_replace(registry):
    register_adapter("scaled")(Scaled)

    class Other(Scaled):
        pass

    with pytest.raises(ValueError, match="'scaled' is already registered.*replace=True"):
        register_adapter("scaled")(Other)
    assert LAYERS["scaled"] is Scaled
    register_adapter("scaled", replace=True)(Other)
    assert LAYERS["scaled"] is Other
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register_adapter("lora")(type("Third", (Scaled,), {}))


def test_register_refuses_what_is_not_an_adapter_method(registry):
    with pytest.raises(TypeError, match="AdapterLayer subclass"):
        register_adapter("plain")(nn.Linear)

    class NoDelta(AdapterLayer):
        pass

    with pytest.raises(TypeError, match="delta_factors"):
        register_adapter("nodelta")(NoDelta)
    with pytest.raises(ValueError, match="identifier"):
        register_adapter(NoDelta)  # no name: the class has no method of its own
    with pytest.raises(ValueError, match="identifier"):
        register_adapter("a/b")(Scaled)

    class NoDefault(Scaled):
        inits = ("ones",)

    with pytest.raises(ValueError, match="inits must include 'default'"):
        register_adapter("nodefault")(NoDefault)

    class Renamed(Scaled):
        method = "x"

    with pytest.raises(ValueError, match="method='x'"):
        register_adapter("y")(Renamed)
    assert METHODS == BUILT_IN


def test_the_class_owns_its_option_schema(registry):
    register_adapter("scaled")(Scaled)
    AdapterConfig("scaled", target_modules=["q_proj"], init="ones", core="scalar")
    with pytest.raises(ValueError, match=r"AdapterConfig: init for 'scaled' must be one of \('default', 'ones'\)"):
        AdapterConfig("scaled", target_modules=["q_proj"], init="svd")
    with pytest.raises(ValueError, match="AdapterConfig: core must be 'vector' or 'scalar' for 'scaled'"):
        AdapterConfig("scaled", target_modules=["q_proj"], core="full")
    with pytest.raises(ValueError, match="init for 'polar'"):
        AdapterConfig("polar", target_modules=["q_proj"], init="ones")
    with pytest.raises(ValueError, match=r"core applies to polar/stella/symlora/scaled, not 'lora'"):
        AdapterConfig("lora", target_modules=["q_proj"], core="vector")
    model = inject_adapters(Toy(), AdapterConfig("scaled", r=2, target_modules=["q_proj"], core="scalar"))
    assert {layer.g.shape for layer in adapter_layers(model).values()} == {torch.Size([1])}


def test_unregistered_method_is_refused_naming_the_registry(registry):
    with pytest.raises(ValueError, match=r"method must be one of \('lora', .*register_adapter.*'vera'"):
        AdapterConfig("vera", target_modules=["q"])
    with pytest.raises(ValueError, match="method must be one of"):
        AdapterConfig(["lora"], target_modules=["q"])


def test_registered_method_injects_merges_saves_loads_and_exports(registry, tmp_path):
    register_adapter("scaled")(Scaled)
    model = Toy()
    fresh, plain = copy.deepcopy(model), copy.deepcopy(model)
    inject_adapters(model, AdapterConfig("scaled", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         init="ones", core="scalar", modules_to_save=["head"]))
    x = torch.randn(5, 8)
    assert not torch.allclose(model(x), plain(x))  # init "ones": ΔW ≠ 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.{p}" for i in range(2) for m in ("q_proj", "v_proj") for p in "ABg"} \
        | {"head.weight", "head.bias"}

    save_adapters(model, tmp_path / "ckpt")
    load_adapters(fresh, tmp_path / "ckpt")
    assert all(isinstance(m, Scaled) for m in adapter_layers(fresh).values())
    assert torch.equal(fresh(x), model(x))

    from peft import PeftModel

    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is False
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "peft")).eval()(x)
    torch.testing.assert_close(theirs, model(x), rtol=1e-5, atol=1e-6)

    out = model(x)
    merged = merge_and_unload(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_an_unregistered_method_is_refused_before_the_model_is_touched(registry, tmp_path):
    register_adapter("scaled")(Scaled)
    save_adapters(inject_adapters(Toy(), AdapterConfig("scaled", r=2, target_modules=["q_proj"])), tmp_path)
    del base._REGISTRY["scaled"]  # a process that never registered it
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"{tmp_path / CONFIG_NAME}.*method must be one of .*'scaled'"):
        load_adapters(model, tmp_path)
    assert not adapter_layers(model) and so.adapters.adapter_config(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "scaled" not in METHODS  # loading registers nothing


# --- the owner object of an adapted model's state --------------------------------------------------
def test_adapter_state_is_stored_on_the_model_and_owns_its_names():
    cfg = AdapterConfig("polar", r=2, target_modules=["q_proj", "layers.1.v_proj"], modules_to_save=["head"])
    model = inject_adapters(Toy(), cfg)
    state = AdapterState.of(model)
    assert state.config is cfg and so.adapters.adapter_config(model) is cfg
    assert state.targets == ("layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj") == tuple(state.layers(model))
    assert [n for n, _ in state.saved_modules(model)] == ["head"] and state.is_saved("head")
    assert state.parameters(model).keys() == adapter_state_dict(model).keys()
    twin = copy.deepcopy(model)  # names, not modules: the copy's state describes the copy
    assert AdapterState.of(twin) is not state and AdapterState.of(twin).targets == state.targets
    assert all(a is twin.get_submodule(n) for n, a in AdapterState.of(twin).layers(twin).items())
    merge_and_unload(model)
    assert AdapterState.of(model) is None and AdapterState.of(twin) is not None
    assert AdapterState.of(Toy()) is None
    with pytest.raises(ValueError, match="save_adapters: Toy has no adapters"):
        AdapterState.require(Toy(), "save_adapters")


def test_io_uses_only_public_names_of_the_other_adapter_modules():
    io = Path(base.__file__).with_name("io.py")
    private = [(node.module, a.name) for node in ast.walk(ast.parse(io.read_text()))
               if isinstance(node, ast.ImportFrom) and node.level == 1 for a in node.names if a.name.startswith("_")]
    assert not private, private


# --- the custom-adapter tutorial's class ---------------------------------------------------------------
def tutorial_class():
    """Run the tutorial's first block (the adapter) as the docs test does; return its class."""
    from test_docs import DOCS, extract_blocks

    code = extract_blocks((DOCS / "custom-adapter.md").read_text())[0][1]
    namespace = {"__name__": "docs.custom_adapter"}
    exec(compile(code, "custom-adapter.md", "exec"), namespace)
    return namespace["SubspaceAdapter"]


def test_tutorial_adapter_injects_trains_saves_loads_and_exports(registry, tmp_path):
    from peft import PeftModel

    subspace = tutorial_class()
    assert LAYERS["subspace"] is subspace and subspace.method == "subspace"
    with pytest.raises(ValueError, match="init for 'subspace' must be one of"):
        AdapterConfig("subspace", target_modules=["q_proj"], init="svd")
    with pytest.raises(ValueError, match="r=9 exceeds in=8"):
        inject_adapters(Toy(), AdapterConfig("subspace", r=9, target_modules=["q_proj"]))

    torch.manual_seed(0)
    plain = Toy()
    model = inject_adapters(copy.deepcopy(plain), AdapterConfig(
        "subspace", r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], modules_to_save=["head"]))
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    assert torch.equal(model(x), plain(x))  # B = 0
    opt = so.RiemannianAdam(so.param_groups(model, lr=1e-2), lr=1e-2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert not torch.allclose(model(x), plain(x))

    save_adapters(model, tmp_path / "ckpt")
    fresh = load_adapters(copy.deepcopy(plain), tmp_path / "ckpt")
    layers = adapter_layers(fresh)
    assert len(layers) == 4 and all(type(m) is subspace for m in layers.values())
    ours, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert ours.keys() == loaded.keys() and all(torch.equal(ours[k], loaded[k]) for k in ours)  # bit-identical
    assert torch.equal(fresh(x), model(x))

    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-6)
