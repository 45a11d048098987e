"""PEFT file format in and out on small torch models: round trips, the config fields honoured or refused, atomic
loads (bad files leave the model untouched) and atomic saves, several named adapters in MultiLoRALinear slots.
Interop with PEFT itself on Hugging Face models is in test_hf_models.py."""

import copy
import dataclasses
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import installed_version
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_kernels as lk
from lora_kernels import modules, peft_io
from lora_kernels.modules import (LoRALinear, MultiLoRALinear, named_target_modules, state_dict_name,
                                  target_module_matches)

BACKEND = "torch"
PEFT = installed_version("peft")  # None without peft: its tests skip through importorskip
# peft 0.13 fails in get_peft_model (ModulesToSaveWrapper has no attribute 'dense') for a target inside a
# modules_to_save module, and 0.14-0.15 put a LoRA inside the head; from 0.16 on PEFT leaves it out, as here
NO_LORA_INSIDE_MODULES_TO_SAVE = pytest.mark.skipif(
    PEFT is not None and PEFT < (0, 16), reason="peft < 0.16 puts a LoRA inside a modules_to_save module or fails")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8, bias=False)
        self.o_proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return x + self.o_proj(self.v_proj(self.norm(x))) + self.q_proj(x)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(run_layers(self.layers, x))


def run_layers(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _base():
    torch.manual_seed(1)
    return Tiny()


def _trained(targets=("q_proj", "v_proj"), **kwargs):
    """A base model with a LoRA of random non-zero A and B (init_lora_weights=False)."""
    return lk.inject_lora(_base(), list(targets), init_lora_weights=False, backend=BACKEND, **kwargs)


def _lora_attributes(model):
    """What a load sets on a LoRALinear besides its factors (outside the state dict)."""
    return [(n, m.lora_alpha, m.scaling, m.use_rslora, m.lora_dropout) for n, m in model.named_modules()
            if isinstance(m, LoRALinear)]


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            getattr(model, "lora_modules_to_save", None), getattr(model, "lora_bias_mode", None),
            _lora_attributes(model))


def _assert_same(model, snapshot):
    state, types, flags, modules_to_save, bias, lora_attributes = snapshot
    assert getattr(model, "lora_modules_to_save", None) == modules_to_save
    assert getattr(model, "lora_bias_mode", None) == bias
    assert _lora_attributes(model) == lora_attributes
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags


def _write_config(path, **changes):
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def _edit_weights(path, edit):
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


# -------------------------------------------------------------------------------------------------- round trips

def test_save_load_round_trip_gives_the_same_model(tmp_path):
    trained = _trained(lora_alpha=12)
    x = torch.randn(3, 16)
    lk.save_peft_adapter(trained, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["inference_mode"] is True
    assert config["init_lora_weights"] is True and config["use_dora"] is False and config["lora_dropout"] == 0.0
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:  # as PEFT writes it
        assert f.metadata() == {"format": "pt"}
    assert config["r"] == 8 and config["lora_alpha"] == 12 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["use_rslora"] is False
    assert "exclude_modules" not in config  # peft 0.13's PeftModel.from_pretrained raises TypeError on it
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.layers.{i}.{m}.lora_{f}.weight"
                    for i in (0, 1) for m in ("q_proj", "v_proj") for f in "AB"}

    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    assert torch.equal(loaded.layers[1].v_proj.lora_B.weight, trained.layers[1].v_proj.lora_B.weight)
    # freezes non-LoRA params, like inject_lora
    assert all(("lora_" in n) == p.requires_grad for n, p in loaded.named_parameters())
    assert loaded.layers[0].q_proj.scaling == 12 / 8


def test_rank_alpha_patterns_rslora_and_overwrite(tmp_path):
    trained = _trained(("q_proj", "v_proj", "o_proj"), r=4, lora_alpha=8, use_rslora=True,
                       rank_pattern={"o_proj": 2, r"layers\.1\.v_proj": 3}, alpha_pattern={"q_proj": 5})
    lk.save_peft_adapter(_trained(), tmp_path)  # an older adapter, overwritten below
    lk.save_peft_adapter(trained, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True
    assert config["rank_pattern"] == {"o_proj": 2, "layers.1.v_proj": 3}
    assert config["alpha_pattern"] == {"q_proj": 5}
    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    assert loaded.layers[1].v_proj.r == 3 and loaded.layers[0].v_proj.r == 4 and loaded.layers[0].o_proj.r == 2
    assert loaded.layers[0].q_proj.scaling == pytest.approx(5 / 4 ** 0.5)
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_scaling_or_lora_alpha_set_on_a_layer_is_saved_as_the_scaling_the_layer_computes_with(tmp_path, use_rslora):
    """The forward, merge and unmerge use a layer's `scaling` attribute; the save wrote its `lora_alpha`. A scaling set
    since (or a lora_alpha, which the forward ignores) saved a file that reproduced another model, in PEFT and here
    (helper 280)."""
    peft = pytest.importorskip("peft")
    trained = _trained(("q_proj", "v_proj", "o_proj"), r=4, lora_alpha=8, use_rslora=use_rslora)
    trained.layers[0].q_proj.scaling = 5.0
    trained.layers[1].v_proj.scaling = 1 / 3
    trained.layers[1].q_proj.scaling = (8 / 2 if use_rslora else 8 / 4) * (1 + 1e-6)  # near lora_alpha's
    trained.layers[0].o_proj.lora_alpha = 64
    lk.save_peft_adapter(trained, tmp_path)
    x = torch.randn(2, 16)
    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    assert loaded.layers[0].q_proj.scaling == pytest.approx(5.0)
    assert loaded.layers[1].v_proj.scaling == pytest.approx(1 / 3)
    assert loaded.layers[1].q_proj.scaling == pytest.approx(trained.layers[1].q_proj.scaling, rel=1e-12)
    torch.testing.assert_close(loaded(x), trained(x))
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(_base(), tmp_path)(x), trained(x))


def test_load_into_an_injected_model_and_from_bin_with_adapter_names_in_keys(tmp_path):
    trained = _trained(lora_alpha=4, lora_dropout=0.1, use_rslora=True)
    lk.save_peft_adapter(trained, tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    # adapter_model.bin whose keys still carry the adapter name, as PEFT keeps them in memory
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, tmp_path / "adapter_model.bin")
    injected = lk.inject_lora(_base(), ["q_proj", "v_proj"], lora_alpha=16, backend=BACKEND)  # B = 0, other alpha
    target = injected.layers[0].q_proj
    assert lk.load_peft_adapter(injected, tmp_path) is injected
    assert injected.layers[0].q_proj is target  # loaded in place, not replaced
    assert target.scaling == 4 / 8 ** 0.5 and target.lora_dropout == 0.1 and target.use_rslora
    x = torch.randn(2, 16)
    trained.eval(), injected.eval()
    torch.testing.assert_close(injected(x), trained(x), rtol=0, atol=0)
    # the layers hold the file's alpha, rsLoRA and dropout, so they save the same config again
    lk.save_peft_adapter(injected, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == saved_config


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "compile-data_parallel", "data_parallel-compile"])
def test_wrapped_models_save_and_load_under_the_model_names(tmp_path, wrap):
    """torch.compile's OptimizedModule and (Distributed)DataParallel prefix every module name (`_orig_mod.`,
    `module.`). The adapter file keeps the model's own names, as PEFT writes them: a wrapper's name in the keys made
    PEFT load the file as a fresh adapter (a warning only), and a plain file did not load into a compiled model.
    A wrapper inside the other (a compiled DDP model) is taken off as well."""
    def wrapped(model):
        for name in reversed(wrap.split("-")):
            model = torch.compile(model, backend="eager") if name == "compile" else nn.DataParallel(model)
        return model

    trained, x = _trained(), torch.randn(3, 16)
    lk.save_peft_adapter(wrapped(trained), tmp_path / "from_wrapper")
    lk.save_peft_adapter(trained, tmp_path / "plain")
    assert (load_file(tmp_path / "from_wrapper" / "adapter_model.safetensors").keys()
            == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys())
    assert (json.loads((tmp_path / "from_wrapper" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "plain" / "adapter_config.json").read_text()))

    model = wrapped(_base())
    assert lk.load_peft_adapter(model, tmp_path / "plain", backend=BACKEND) is model
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    assert lk.merge_and_unload(model) is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    injected = wrapped(_base())
    assert lk.inject_lora(injected, ["q_proj"], backend=BACKEND) is injected
    with lk.disable_adapter(injected) as inside:
        assert inside is injected
    multi = wrapped(_base())
    assert lk.prepare_multi_adapter(multi, ["q_proj", "v_proj"], max_adapters=2, max_rank=8) is multi
    lk.load_peft_adapter(multi, tmp_path / "plain", adapter_name="a")
    with lk.set_batch_adapters(multi, ["a", "__base__", "a"]):
        rows = multi(x)
    torch.testing.assert_close(rows[::2], trained(x)[::2])  # grouped ops: rounding differs
    torch.testing.assert_close(rows[1], _base()(x)[1])
    assert lk.delete_adapter(multi, "a") is multi


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2))
        self.head = nn.Sequential(nn.Linear(16, 4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("wrapped", ["blocks", "linears"])
@pytest.mark.parametrize("order", ["wrap_after_inject", "inject_after_wrap"])
def test_checkpoint_wrapped_models_save_and_load_under_the_state_dict_names(tmp_path, wrapped, order):
    """torch's activation-checkpoint wrapper (apply_activation_checkpointing: torchtitan's and accelerate's FSDP
    recipes) puts `_checkpoint_wrapped_module.` into the module names and its state_dict hooks take it out again.
    PEFT's keys follow the state dict: the file of a wrapped model is the plain model's (factors, lora_only biases
    and a modules_to_save head alike), which PEFT and we load, and a plain file loads into a wrapped model
    (resuming), whose wrappers stay. The wrapper's name in the keys had made PEFT load the file as a fresh adapter
    (a warning only), and a plain file did not load into a wrapped model. Whole blocks wrapped, or each linear."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointWrapper,
                                                                             apply_activation_checkpointing)

    def wrap(model):
        inside_lora = {id(m) for layer in model.modules() if isinstance(layer, LoRALinear) for m in layer.modules()}
        check = ((lambda m: isinstance(m, nn.Sequential)) if wrapped == "blocks"  # or the outermost linear layers
                 else (lambda m: isinstance(m, (LoRALinear, nn.Linear)) and (isinstance(m, LoRALinear)
                                                                              or id(m) not in inside_lora)))
        apply_activation_checkpointing(model, check_fn=check)
        return model

    def base():
        torch.manual_seed(0)
        return _Blocks()

    def inject(model):
        return lk.inject_lora(model, r"layers\.\d\.0", r=4, init_lora_weights=False, bias="lora_only",
                              modules_to_save=["head"], backend=BACKEND)

    plain = inject(base())
    with torch.no_grad():  # trained biases and head
        for name, tensor in plain.named_parameters():
            if name.endswith("bias") or name.startswith("head"):
                tensor.add_(0.25)
    model = wrap(inject(base())) if order == "wrap_after_inject" else inject(wrap(base()))
    assert any(isinstance(m, CheckpointWrapper) for m in model.modules())
    model.load_state_dict(plain.state_dict())  # the wrapper's hooks: the plain model's keys
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    lk.save_peft_adapter(plain, tmp_path / "plain")
    lk.save_peft_adapter(model, tmp_path / "wrapped")
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "wrapped")]
    assert sorted(files[1]) == sorted(files[0]) and all(torch.equal(files[1][k], files[0][k]) for k in files[0])
    assert "base_model.model.layers.0.0.base_layer.bias" in files[0] and "base_model.model.head.0.weight" in files[0]
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("plain", "wrapped")]
    assert configs[1] == configs[0]
    torch.testing.assert_close(lk.load_peft_adapter(base(), tmp_path / "wrapped", backend=BACKEND)(x), plain(x),
                               rtol=0, atol=0)
    resumed = lk.load_peft_adapter(wrap(base()), tmp_path / "plain", backend=BACKEND)
    assert any(isinstance(m, CheckpointWrapper) for m in resumed.modules())
    assert sum(isinstance(m, LoRALinear) for m in resumed.modules()) == 2
    torch.testing.assert_close(resumed(x), plain(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "wrapped")
    torch.testing.assert_close(theirs(x), plain(x))


def test_a_second_inject_lora_adds_to_the_adapter(tmp_path):
    """inject_lora twice (say q_proj, then v_proj with another rank) is one adapter: the first call's LoRA layers,
    modules_to_save and bias mode stay trained and saved. The second call froze the first call's factors and dropped
    its head from the saved file."""
    model = lk.inject_lora(_base(), ["q_proj"], modules_to_save=["head"], bias="lora_only", backend=BACKEND)
    lk.inject_lora(model, ["v_proj"], r=4, backend=BACKEND)
    lora = {f"layers.{i}.{m}.lora_{f}.weight" for i in (0, 1) for m in ("q_proj", "v_proj") for f in "AB"}
    biases = {f"layers.{i}.q_proj.bias" for i in (0, 1)}  # v_proj has no bias
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | biases | {"head.weight", "head.bias"}
    assert model.lora_modules_to_save == ["head"] and model.lora_bias_mode == "lora_only"
    lk.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["bias"] == "lora_only"
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["rank_pattern"] == {"v_proj": 4}
    x = torch.randn(3, 16)
    torch.testing.assert_close(lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)(x), model(x), rtol=0, atol=0)
    lk.inject_lora(model, ["o_proj"], bias="all", modules_to_save=["head", "norm"], backend=BACKEND)
    assert model.lora_bias_mode == "all" and model.layers[0].norm.bias.requires_grad  # the broader bias mode holds
    assert model.lora_modules_to_save == ["head", "norm"]  # each name once
    # merge_and_unload ends that adapter: an inject after it starts a new one, without the old head or biases
    lk.inject_lora(lk.merge_and_unload(model), ["q_proj"], backend=BACKEND)
    assert not hasattr(model, "lora_modules_to_save") and not hasattr(model, "lora_bias_mode")
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("option,first,second", [("lora_dropout", 0.1, 0.05), ("use_rslora", False, True)])
def test_a_second_inject_lora_with_another_option_warns_before_training(tmp_path, option, first, second):
    """A second call with another lora_dropout or use_rslora is one adapter that save_peft_adapter refuses (PEFT's
    config holds one of each): the inject says so when it happens, not only the save after the training. The same
    value again does not warn. Warned before the model changes: under warnings as errors the call raised out of a
    model whose layers it had already replaced."""
    model = lk.inject_lora(_base(), ["q_proj"], **{option: first}, backend=BACKEND)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.inject_lora(model, ["o_proj"], **{option: first}, backend=BACKEND)
        before = _snapshot(model)
        with pytest.raises(UserWarning, match=f"now have different {option} values"):
            lk.inject_lora(model, ["v_proj"], **{option: second}, backend=BACKEND)
        _assert_same(model, before)
    with pytest.warns(UserWarning, match=rf"inject_lora: the model's LoRA layers now have different {option} values "
                                         rf"\[{min(first, second)}, {max(first, second)}\]: they train, but "
                                         r"save_peft_adapter refuses them"):
        lk.inject_lora(model, ["v_proj"], **{option: second}, backend=BACKEND)
    with pytest.raises(ValueError, match=f"save_peft_adapter: the LoRA layers have different {option} values"):
        lk.save_peft_adapter(model, tmp_path)


def test_checkpointing_model_without_input_embeddings_gets_a_warning_not_a_half_applied_inject():
    """transformers 4's enable_input_require_grads raises NotImplementedError for a model without token
    embeddings; the inject is complete by then, so it warns instead of raising out of a changed model."""
    class NoEmbeddings(Tiny):
        is_gradient_checkpointing = True

        def enable_input_require_grads(self):
            raise NotImplementedError("no input embeddings")

    with pytest.warns(UserWarning, match="no input embeddings to mark as requiring grad"):
        model = lk.inject_lora(NoEmbeddings(), ["q_proj"], backend=BACKEND)
    assert isinstance(model.layers[0].q_proj, LoRALinear)


def test_a_tied_target_gets_peft_warning():
    model = _base()
    model.layers[1].o_proj.weight = model.layers[0].o_proj.weight
    with pytest.warns(UserWarning, match=r"target 'layers.0.o_proj' is tied to 'layers.1.o_proj.weight'"):
        lk.inject_lora(model, ["layers.0.o_proj"], backend=BACKEND)
    # prepare_multi_adapter warns too, with what fails there: transformers re-ties (tie_weights) by assigning
    # `lm_head.weight`, a property of the wrapper (KeyError "attribute 'weight' already exists"), and save_pretrained
    # refuses the shared tensor under its base_layer name
    model = _base()
    model.layers[1].o_proj.weight = model.layers[0].o_proj.weight
    with pytest.warns(UserWarning, match=r"prepare_multi_adapter: the weight of target 'layers.0.o_proj' is tied to "
                                         r"'layers.1.o_proj.weight'; the slots serve and train as usual, but "
                                         r"transformers' tie_weights\(\) and save_pretrained\(\) fail"):
        lk.prepare_multi_adapter(model, ["layers.0.o_proj"], max_adapters=2, max_rank=4)


def test_disable_adapter_warns_that_trained_heads_stay_at_the_callers_line():
    model = _trained(modules_to_save=["head"])
    with pytest.warns(UserWarning, match=r"modules_to_save \['head'\] train in place and stay active") as caught, \
            lk.disable_adapter(model):
        pass
    assert [w.filename for w in caught] == [__file__]  # past the context manager's frames


def test_load_warnings_point_at_the_callers_line(tmp_path):
    """Warnings of functions reached by several paths (the config's, three calls deep in load_peft_adapter; the
    fan_in_fan_out correction, from inject_lora and from loads) named a line inside lora_kernels with a fixed
    stacklevel; warn_at_caller finds the caller's."""
    lk.save_peft_adapter(lk.inject_lora(nn.Sequential(nn.Linear(8, 8)), ["0"]), tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": "pissa",
                                       "fan_in_fan_out": True}))
    with pytest.warns(UserWarning) as caught:
        lk.load_peft_adapter(nn.Sequential(nn.Linear(8, 8)), tmp_path)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "init_lora_weights='pissa'" in messages[0], messages
    assert messages[1].startswith("load_peft_adapter: fan_in_fan_out=True but '0' is an nn.Linear"), messages
    assert [w.filename for w in caught] == [__file__, __file__]


def test_disable_adapter_on_a_multi_adapter_model_points_to_set_batch_adapters():
    """A model prepared for several adapters has MultiLoRALinear layers only: disable_adapter said just "the model
    has no LoRALinear layers", as for a model with no adapter at all; it now names the way to compute the base model
    there, which computes it."""
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"set_batch_adapters\(model, \"__base__\"\) computes the base model"):
        with lk.disable_adapter(model):
            pass
    x = torch.randn(3, 16)
    with torch.no_grad(), lk.set_batch_adapters(model, "__base__"):
        torch.testing.assert_close(model(x), _base()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no LoRALinear layers$"):
        with lk.disable_adapter(_base()):
            pass


def test_disable_adapter_keeps_trained_heads_and_biases():
    """README: inside disable_adapter the LoRA layers compute their base layers, while modules_to_save heads and
    biases trained by bias="all" stay as trained (they are trained in place): the result is the base model with the
    trained head and biases."""
    model = _trained(modules_to_save=["head"], bias="all")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(1.0)  # as if trained
    expected = _base()
    expected.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                              if "lora_" not in k})
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="stay active"), lk.disable_adapter(model):
        y = model(x)
    torch.testing.assert_close(y, expected(x), rtol=0, atol=0)
    assert not torch.allclose(y, _base()(x))


def test_modules_to_save_train_whole_and_round_trip(tmp_path):
    trained = _trained(modules_to_save=["head"])
    assert trained.lora_modules_to_save == ["head"]
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == (
        {f"layers.{i}.{m}.lora_{f}.weight" for i in (0, 1) for m in ("q_proj", "v_proj") for f in "AB"}
        | {"head.weight", "head.bias"})
    with torch.no_grad():
        trained.head.weight.add_(torch.randn_like(trained.head.weight))  # as if trained
    lk.save_peft_adapter(trained, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.head.weight"], trained.head.weight)
    assert "base_model.model.head.bias" in saved and len(saved) == 10

    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    assert loaded.lora_modules_to_save == ["head"] and loaded.head.weight.requires_grad
    # an adapter without modules_to_save loaded over it would run beside this head's trained weights: refused
    lk.save_peft_adapter(_trained(), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"which this adapter does not hold"):
        lk.load_peft_adapter(loaded, tmp_path / "plain")
    assert loaded.lora_modules_to_save == ["head"] and loaded.head.weight.requires_grad
    # PEFT's suffix rule ("norm" selects layers.0.norm and layers.1.norm), buffers and all
    both = _trained(modules_to_save=["head", "norm"])
    lk.save_peft_adapter(both, tmp_path / "both")
    assert {k for k in load_file(tmp_path / "both" / "adapter_model.safetensors") if "norm" in k} == {
        f"base_model.model.layers.{i}.norm.{p}" for i in (0, 1) for p in ("weight", "bias")}


def test_modules_to_save_that_select_no_module_load_and_save_without_them(tmp_path):
    """As in PEFT (its modules_to_save lookup is not strict), modules_to_save entries that select no module of the
    model do not stop the LoRA layers from loading; the model then trains no module whole, and saves none."""
    lk.save_peft_adapter(_trained(), tmp_path)
    _write_config(tmp_path, modules_to_save=["classifier"])
    model = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    assert getattr(model, "lora_modules_to_save", None) is None
    lk.save_peft_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["modules_to_save"] is None


def test_a_scaling_past_float32s_range_is_refused_before_the_load(tmp_path):
    """An adapter whose lora_alpha / r passes float32's range is refused before anything is loaded, into a base model
    and into one injected with it, naming the module, lora_alpha and r: it was loaded, then every forward refused it
    (and merge wrote NaN). A float64 model, which runs in float64, takes it."""
    lk.save_peft_adapter(_trained(), tmp_path)
    _write_config(tmp_path, lora_alpha=1e40)  # r = 8: the scaling 1.25e39
    for model in (_base(), lk.inject_lora(_base(), ["q_proj", "v_proj"])):
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"load_peft_adapter: module 'layers.0.q_proj': the adapter's lora_alpha "
                                             r"1e\+40 / r at r = 8 gives the scaling 1.25e\+39, past float32's range"):
            lk.load_peft_adapter(model, tmp_path)
        _assert_same(model, before)
    wide = lk.load_peft_adapter(_base().double(), tmp_path)
    assert {m.scaling for m in wide.modules() if isinstance(m, LoRALinear)} == {1.25e39}


def test_modules_to_save_errors_leave_the_model_untouched(tmp_path, monkeypatch):
    for kwargs, error, message in [
        (dict(modules_to_save=["classifier"]), ValueError, r"modules_to_save \['classifier'\] matched no module"),
        # PEFT puts no LoRA inside a modules_to_save module: nothing is left to target
        (dict(modules_to_save=["layers"]), ValueError, r"target_modules \['q_proj', 'v_proj'\] matched no nn\.Linear"),
        (dict(modules_to_save="head"), ValueError, r"modules_to_save expected a non-empty list of module names"),
        # every name ends with "": PEFT's suffix test would select every module
        (dict(modules_to_save=["head", ""]), ValueError, r"modules_to_save expected a non-empty list of module "
                                                         r"names, got \['head', ''\]"),
    ]:
        model = _base()
        before = _snapshot(model)
        with pytest.raises(error, match=message):
            lk.inject_lora(model, ["q_proj", "v_proj"], **kwargs)
        _assert_same(model, before)
    tied = _base()
    tied.layers[1].o_proj.weight = tied.layers[0].o_proj.weight
    with_lora = lk.inject_lora(_base(), ["o_proj"])
    for model, head, message in [
        (tied, "layers.1.o_proj", r"module 'layers\.1\.o_proj', whose parameter is tied to 'layers\.0\.o_proj\.weight'"),
        (with_lora, "layers.1", r"module 'layers\.1', which holds the LoRA layer 'layers\.1\.o_proj'"),
        # a LoRA layer's own factors are never a module to save (they end with "lora_A" all the same)
        (with_lora, "lora_A", r"modules_to_save \['lora_A'\] matched no module"),
    ]:
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            lk.inject_lora(model, ["q_proj"], modules_to_save=[head])
        _assert_same(model, before)

    # a failure while copying the second of three modules rolls back the LoRA layers and the first module
    heads = _trained(modules_to_save=["head", "norm"])
    with torch.no_grad():
        for parameter in [*heads.layers[0].norm.parameters(), *heads.head.parameters()]:
            parameter.add_(1.0)  # the saved states differ from the base's
    lk.save_peft_adapter(heads, tmp_path)
    model = _base()
    before = _snapshot(model)
    copies = []
    original = peft_io._copy_state

    def flaky(module, state):
        copies.append(1)
        if len(copies) == 2:
            raise RuntimeError("simulated failure mid-load")
        original(module, state)

    monkeypatch.setattr(peft_io, "_copy_state", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)
    monkeypatch.undo()

    multi = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=r"modules_to_save \['head', 'norm'\], which selects module 'layers\.0\.norm' "
                                         r"\(whole modules trained with the adapter\).*cannot load by adapter_name"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    _assert_same(multi, before)


def test_slots_load_a_file_whose_modules_to_save_selects_no_module(tmp_path):
    """modules_to_save entries that select no module of the model (a "classifier" of a task model the file was
    not trained on) leave the file LoRA factors only: it loads by name as it loads without one, and as PEFT's
    load_adapter takes it as another adapter. Slots refused it as if it held whole modules (helper 255)."""
    lk.save_peft_adapter(_trained(["q_proj"]), tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "modules_to_save": ["classifier"]}))
    x = torch.randn(3, 16)
    expected = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND).eval()(x)
    multi = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=8, backend=BACKEND)
    lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    with lk.set_batch_adapters(multi, ["a"] * 3):
        torch.testing.assert_close(multi.eval()(x), expected)


class _Classifier(nn.Module):
    """A RoBERTa-like model: the classification head holds a `dense` layer like the encoder's."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 16)
        self.classifier = nn.Sequential()
        self.classifier.dense = nn.Linear(16, 16)
        self.classifier.out_proj = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.dense(x))


def test_a_regex_target_that_also_matches_inside_the_wrappers_loads_into_the_slots(tmp_path):
    """A file's regex target_modules such as ".*q_proj.*" also matches the names inside a prepared model's wrappers
    ("layers.0.q_proj.base_layer"); those are no targets (the wrapper is), so the adapter loads into the slots and
    the model computes what the adapter alone does."""
    trained = _trained(["q_proj"])
    lk.save_peft_adapter(trained, tmp_path)
    _write_config(tmp_path, target_modules=r".*q_proj.*")
    multi = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    x = torch.randn(3, 16)
    with torch.no_grad(), lk.set_batch_adapters(multi, "a"):
        torch.testing.assert_close(multi(x), trained(x))


@NO_LORA_INSIDE_MODULES_TO_SAVE
def test_no_lora_inside_modules_to_save_as_peft(tmp_path):
    """PEFT puts no LoRA inside a modules_to_save module: target "dense" with modules_to_save ["classifier"] wraps
    the encoder's dense only and trains the head whole. Same layers here, and the files load both ways."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base, x = _Classifier(), torch.randn(4, 16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["dense"], modules_to_save=["classifier"], init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))  # as if trained
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend=BACKEND)
    assert [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)] == ["dense"]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)

    injected = lk.inject_lora(copy.deepcopy(base), ["dense"], modules_to_save=["classifier"], backend=BACKEND)
    assert [n for n, m in injected.named_modules() if isinstance(m, LoRALinear)] == ["dense"]
    assert injected.classifier.dense.weight.requires_grad and not injected.dense.weight.requires_grad
    # a target inside the head alone: nothing to wrap, and the error says why ("matched no nn.Linear" only, though
    # classifier.dense is one)
    with pytest.raises(ValueError, match=r"inject_lora: target_modules \['classifier.dense'\] matched no nn.Linear "
                                         r"in the model; \['classifier.dense'\] would match, but are \(inside\) "
                                         r"modules_to_save \['classifier'\], which train whole and get no LoRA"):
        lk.inject_lora(copy.deepcopy(base), ["classifier.dense"], modules_to_save=["classifier"])
    lk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(x), ours(x), rtol=1e-6, atol=1e-6)


class _PreClassifier(nn.Module):
    """A DistilBERT-like head: `pre_classifier` (an nn.Linear) ends with "classifier" but is not the classifier."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 16)
        self.pre_classifier = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 3)
        self.my_classifier = nn.Sequential()
        self.my_classifier.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.classifier(self.pre_classifier(self.dense(x)) + self.my_classifier(x))


def _seeded_pre_classifier():
    torch.manual_seed(0)
    return _PreClassifier()


@pytest.mark.parametrize("targets", ["all-linear", ["dense", "pre_classifier", "proj"]])
def test_modules_to_save_select_by_whole_name_components_with_a_warning_naming_the_suffix_matches(targets, tmp_path):
    """modules_to_save selects a module whose name ends with an entry as whole name components, as PEFT >= 0.22:
    "classifier" selects "classifier", not "pre_classifier" or "my_classifier" (PEFT <= 0.21's plain suffix test did,
    and refused them as LoRA targets). They are targets here, with a warning naming them; the file loads the same."""
    with pytest.warns(UserWarning, match=r"inject_lora: modules_to_save \['classifier'\] selects modules by whole "
                                         r"name components \(PEFT >= 0.22's rule\): \['pre_classifier', "
                                         r"'my_classifier'\] end with an entry but are not selected"):
        model = lk.inject_lora(_seeded_pre_classifier(), targets, modules_to_save=["classifier"],
                               init_lora_weights="gaussian", backend=BACKEND)
    assert isinstance(model.pre_classifier, LoRALinear) and isinstance(model.my_classifier.proj, LoRALinear)
    assert model.classifier.weight.requires_grad and not model.pre_classifier.weight.requires_grad
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # as if trained
    with pytest.warns(UserWarning, match=r"save_peft_adapter: PEFT <= 0.21 cannot read this file: it selects "
                                         r"modules_to_save \['classifier'\] by a plain name suffix, so also "
                                         r"\['pre_classifier', 'my_classifier'\]"):
        lk.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    x = torch.randn(3, 16)
    torch.testing.assert_close(lk.load_peft_adapter(_seeded_pre_classifier(), tmp_path, backend=BACKEND)(x), model(x),
                               rtol=0, atol=0)
    # an entry that ends names only as a suffix selects nothing: refused, naming them
    with pytest.raises(ValueError, match=r"modules_to_save \['_classifier'\] matched no module of the model "
                                         r"\(\['pre_classifier', 'my_classifier'\] end with an entry, but "
                                         r"modules_to_save selects by whole name components"):
        lk.inject_lora(_PreClassifier(), ["dense"], modules_to_save=["_classifier"], backend=BACKEND)


def _legacy_heads_file(tmp_path, targets):
    """A file written under PEFT <= 0.21's rule: modules_to_save ["classifier"], holding the state of every module
    whose name ends with it (classifier, pre_classifier, my_classifier), trained."""
    model = lk.inject_lora(_seeded_pre_classifier(), ["dense"], init_lora_weights=False, backend=BACKEND,
                           modules_to_save=["classifier", "pre_classifier", "my_classifier"])
    with torch.no_grad():
        for name in ("classifier", "pre_classifier", "my_classifier.proj"):
            model.get_submodule(name).weight.add_(0.5)  # as if trained
    lk.save_peft_adapter(model, tmp_path)
    _write_config(tmp_path, modules_to_save=["classifier"], target_modules=targets)
    return model


def test_a_file_saved_under_peft_0_21_s_suffix_rule_loads_the_modules_it_holds_and_saves_them_by_name(tmp_path):
    """PEFT <= 0.21 (and lora_kernels until now) selected modules_to_save by a plain name suffix and saved every
    module so selected: such a file holds them, and they load as its writer trained them (PEFT 0.22 would leave them
    out: a model other than the one saved). Saved again, they are named in full, which both rules select."""
    trained = _legacy_heads_file(tmp_path / "legacy", ["dense"])
    loaded = lk.load_peft_adapter(_seeded_pre_classifier(), tmp_path / "legacy", backend=BACKEND)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    assert loaded.lora_modules_to_save == ["classifier", "pre_classifier", "my_classifier"]
    assert all(loaded.get_submodule(name).weight.requires_grad
               for name in ("classifier", "pre_classifier", "my_classifier.proj"))
    lk.save_peft_adapter(loaded, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["classifier", "pre_classifier", "my_classifier"]
    torch.testing.assert_close(lk.load_peft_adapter(_seeded_pre_classifier(), tmp_path / "again", backend=BACKEND)(x),
                               trained(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(_seeded_pre_classifier(), tmp_path / "again").eval()
    torch.testing.assert_close(theirs(x), trained(x))


def test_a_file_that_peft_0_22_wrote_or_one_holding_embedding_layers_is_not_read_by_the_suffix_rule(tmp_path):
    """A file that says PEFT >= 0.22 wrote it selected its modules_to_save by whole name components: the state of a
    module that only the suffix rule selects is no module_to_save there (an unexpected key here). Nor are the
    embedding layers, whose whole weights a file holds for save_embedding_layers; nor a bias alone (bias="all")."""
    _legacy_heads_file(tmp_path / "new", ["dense"])
    _write_config(tmp_path / "new", peft_version="0.22.0")
    fresh = _seeded_pre_classifier()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"unexpected keys 'base_model.model.my_classifier.proj.bias'"):
        lk.load_peft_adapter(fresh, tmp_path / "new", backend=BACKEND)
    _assert_same(fresh, before)
    _legacy_heads_file(tmp_path / "old", ["dense"])
    _write_config(tmp_path / "old", peft_version="0.21.2")
    assert lk.load_peft_adapter(_seeded_pre_classifier(), tmp_path / "old", backend=BACKEND).lora_modules_to_save == [
        "classifier", "pre_classifier", "my_classifier"]

    class WithEmbeddings(_PreClassifier):
        def get_output_embeddings(self):
            return self.pre_classifier  # as an lm_head: save_embedding_layers writes its whole weight and bias

    torch.manual_seed(0)
    base = WithEmbeddings()
    model = lk.inject_lora(copy.deepcopy(base), ["dense"], modules_to_save=["classifier"], bias="all",
                           init_lora_weights=False, backend=BACKEND)
    with torch.no_grad():
        model.pre_classifier.bias.add_(1.0)  # trained by bias="all"
    with pytest.warns(UserWarning, match="PEFT <= 0.21 cannot read this file"):
        lk.save_peft_adapter(model, tmp_path / "bias", save_embedding_layers=False)
    loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "bias", backend=BACKEND)
    assert loaded.lora_modules_to_save == ["classifier"] and not loaded.pre_classifier.weight.requires_grad
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="PEFT <= 0.21 cannot read this file"):
        lk.save_peft_adapter(model, tmp_path / "embedding", save_embedding_layers=True)
    loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "embedding", backend=BACKEND)
    assert loaded.lora_modules_to_save == ["classifier"] and not loaded.pre_classifier.weight.requires_grad
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("targets, culprit", [(["dense", "pre_classifier"], "pre_classifier"),
                                              (["dense", "proj"], "my_classifier.proj")])
def test_a_file_whose_targets_lie_in_a_module_it_holds_under_the_suffix_rule_is_refused_untouched(targets, culprit,
                                                                                               tmp_path):
    """Under PEFT <= 0.21's suffix rule a target could also be a modules_to_save module (PEFT before 0.16 wrapped it
    both ways): it would get a LoRA and train whole. Refused before any change, naming the entry."""
    _legacy_heads_file(tmp_path, targets)
    fresh = _seeded_pre_classifier()
    before = _snapshot(fresh)
    where = "is" if culprit == "pre_classifier" else "lies inside"
    with pytest.raises(ValueError, match=rf"load_peft_adapter: module '{culprit}' is a LoRA target and {where} the "
                                         rf"modules_to_save module '{culprit.partition('.')[0]}', whose state "
                                         rf"{re.escape(str(tmp_path / 'adapter_model.safetensors'))} holds \(entry "
                                         rf"'classifier'"):
        lk.load_peft_adapter(fresh, tmp_path, backend=BACKEND)
    _assert_same(fresh, before)


def test_slots_refuse_a_module_only_the_old_suffix_rule_selects_saying_why_it_is_selected(tmp_path):
    """Slots hold LoRA factors only, so a file's modules_to_save module is refused; one that its entry selects only
    by PEFT <= 0.21's plain-suffix rule (the file holds its whole state) is named with that reason."""
    _legacy_heads_file(tmp_path, ["dense"])
    multi = lk.prepare_multi_adapter(_seeded_pre_classifier(), ["dense"], max_adapters=2, max_rank=8)
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=r"has modules_to_save \['classifier'\], which selects module 'pre_classifier' "
                                         r"\(whole modules trained with the adapter; by PEFT <= 0\.21's plain-suffix "
                                         r"rule, which the file was written under, as it holds the module's whole "
                                         r"state\); MultiLoRALinear slots hold LoRA factors only"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    _assert_same(multi, before)


class _Heads(nn.Module):
    """Modules whose names extend one another: siblings ("head", "head2") and a nested pair ("classifier",
    "classifier.out_proj")."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 16)
        self.head = nn.Linear(16, 16)
        self.head2 = nn.Linear(16, 16)
        self.classifier = nn.Sequential()
        self.classifier.proj = nn.Linear(16, 16)
        self.classifier.out_proj = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.head2(self.head(self.dense(x))))


def test_modules_to_save_take_siblings_whose_names_extend_one_another_and_the_outer_of_nested_matches(tmp_path):
    """"head" does not cover "head2" (a sibling, selected by its own entry or a LoRA target), and "out_proj" inside
    the selected "classifier" is part of that module, saved and loaded once with it. A tie to the sibling "head2" is
    a tie outside "head", and one of a parameter nested in "classifier" is a tie of "classifier"."""
    torch.manual_seed(0)
    model = lk.inject_lora(_Heads(), ["dense"], modules_to_save=["head", "head2", "classifier", "out_proj"],
                           backend=BACKEND)
    assert _trainable(model) == {"dense.lora_A.weight", "dense.lora_B.weight"} | {
        f"{m}.{p}" for m in ("head", "head2", "classifier.proj", "classifier.out_proj") for p in ("weight", "bias")}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(torch.randn_like(parameter))  # as if trained
    lk.save_peft_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = lk.load_peft_adapter(_Heads(), tmp_path, backend=BACKEND)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    sibling = lk.inject_lora(_Heads(), ["dense", "head2"], modules_to_save=["head"], backend=BACKEND)
    assert isinstance(sibling.head2, LoRALinear) and sibling.head.weight.requires_grad

    for tie, entry, message in [
        (lambda m: setattr(m.head2, "weight", m.head.weight), "head",
         r"selects module 'head', whose parameter is tied to 'head2\.weight'"),
        (lambda m: setattr(m.classifier.proj, "weight", m.head.weight), "classifier",
         r"selects module 'classifier', whose parameter is tied to 'head\.weight'"),
    ]:
        tied = _Heads()
        tie(tied)
        before = _snapshot(tied)
        with pytest.raises(ValueError, match=message):
            lk.inject_lora(tied, ["dense"], modules_to_save=[entry], backend=BACKEND)
        _assert_same(tied, before)


# ----------------------------------------------------------------------------------------------------- bias modes

def _peft_trainable(model):
    """The trainable parameters of a PeftModel under our names: PEFT's wrappers and adapter name taken out."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
            .replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("modules_to_save", [None, [], ["head"]])  # [] is None, as in PEFT
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_what_peft_trains(bias, modules_to_save):
    peft = pytest.importorskip("peft")
    kwargs = dict(target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=modules_to_save)
    ours = lk.inject_lora(_base(), r=4, backend=BACKEND, **kwargs)
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=4, **kwargs))
    assert _trainable(ours) == _peft_trainable(theirs)
    assert ("layers.0.norm.bias" in _trainable(ours)) == (bias == "all")  # LayerNorm biases too
    assert ("layers.0.q_proj.bias" in _trainable(ours)) == (bias != "none")
    assert getattr(ours, "lora_bias_mode", "none") == bias


def test_trainable_parameters_summary_is_peft_print_trainable_parameters_line(capsys):
    peft = pytest.importorskip("peft")
    kwargs = dict(target_modules=["q_proj", "v_proj"], bias="all")
    ours = lk.inject_lora(_base(), r=4, backend=BACKEND, **kwargs)
    peft.get_peft_model(_base(), peft.LoraConfig(r=4, **kwargs)).print_trainable_parameters()
    assert lk.trainable_parameters_summary(ours) == capsys.readouterr().out.strip()
    assert lk.count_parameters(ours) == (sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)
                                         + sum(p.numel() for n, p in ours.named_parameters() if n.endswith("bias")),
                                         sum(p.numel() for p in _base().parameters())
                                         + sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_and_save_what_peft_does_beside_heads_attention_and_buffers(bias, tmp_path):
    """PEFT's "all" trains the parameters called bias: those of "head2" beside the modules_to_save module "head" as
    well, but not nn.MultiheadAttention's in_proj_bias. It saves the state-dict entries called bias, a buffer's too
    (which does not train)."""
    peft = pytest.importorskip("peft")
    kwargs = dict(target_modules=["dense"], bias=bias, modules_to_save=["head"])
    models = []
    for _ in range(2):
        model = _Heads()
        model.attn = nn.MultiheadAttention(16, 2)
        model.shift = nn.Module()
        model.shift.register_buffer("bias", torch.ones(16))
        models.append(model)
    ours = lk.inject_lora(models[0], r=4, backend=BACKEND, **kwargs)
    theirs = peft.get_peft_model(models[1], peft.LoraConfig(r=4, **kwargs))
    assert _trainable(ours) == _peft_trainable(theirs)
    assert ("head2.bias" in _trainable(ours)) == (bias == "all") and "attn.in_proj_bias" not in _trainable(ours)
    assert not ours.shift.bias.requires_grad
    lk.save_peft_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    saved = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    # PEFT's "all" also saves its head wrapper's copies of the head's bias (loaded as PEFT loads them: see above)
    assert saved == {k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors")
                     if ".modules_to_save." not in k and ".original_module." not in k}
    assert ("base_model.model.shift.bias" in saved) == (bias == "all")


@pytest.mark.parametrize("recorded", ["bias", "modules_to_save"])
def test_save_refuses_a_bias_mode_or_heads_recorded_on_a_submodule(tmp_path, recorded):
    """inject_lora called on a submodule records its bias mode and modules_to_save there; saving the whole model
    read only the model's own records, so the trained biases (or heads) were silently left out of the file, which
    then loaded as another model. Refused, nothing written; the submodule itself saves them."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Sequential(OrderedDict(q=nn.Linear(6, 6), head=nn.Linear(6, 6))),
                                      out=nn.Linear(6, 3)))
    kwargs = {"bias": "all"} if recorded == "bias" else {"modules_to_save": ["head"]}
    lk.inject_lora(model.body, ["q"], r=2, **kwargs)
    with pytest.raises(ValueError, match=rf"module 'body' records {recorded}=.* on that submodule.*nothing was "
                                         rf"written"):
        lk.save_peft_adapter(model, tmp_path / "whole")
    assert not (tmp_path / "whole").exists()
    lk.save_peft_adapter(model.body, tmp_path / "body")
    saved = load_file(tmp_path / "body" / "adapter_model.safetensors")
    expected = "base_model.model.q.base_layer.bias" if recorded == "bias" else "base_model.model.head.weight"
    assert expected in saved, sorted(saved)
    # the whole model's own records covering the submodule's: nothing is lost, the whole model saves
    lk.inject_lora(model, ["out"], r=2, **kwargs)
    lk.save_peft_adapter(model, tmp_path / "covered")
    assert f"base_model.model.body.{expected.removeprefix('base_model.model.')}" in load_file(
        tmp_path / "covered" / "adapter_model.safetensors")
    # merged away, the adapter leaves no record behind, on the submodule either: a new adapter saves
    merged = lk.merge_and_unload(model)
    lk.inject_lora(merged, ["out"], r=2)
    lk.save_peft_adapter(merged, tmp_path / "after_merge")


def test_inject_lora_refuses_an_unknown_bias_mode_untouched():
    model = _base()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"inject_lora: bias expected one of \['none', 'lora_only', 'all'\], "
                                         r"got 'lora'"):
        lk.inject_lora(model, ["q_proj"], bias="lora")
    _assert_same(model, before)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_round_trip_under_peft_keys(tmp_path, bias):
    trained = _trained(("q_proj",), bias=bias)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if name.endswith("bias") and parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))  # as if trained
    lk.save_peft_adapter(trained, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == bias
    saved = load_file(tmp_path / "adapter_model.safetensors")
    lora_layers = {f"base_model.model.layers.{i}.q_proj.base_layer.bias" for i in (0, 1)}
    others = {"base_model.model.head.bias"} | {f"base_model.model.layers.{i}.{m}.bias" for i in (0, 1)
                                                for m in ("o_proj", "norm")}  # v_proj has no bias
    assert {k for k in saved if "lora_" not in k} == (lora_layers | others if bias == "all" else lora_layers)
    assert torch.equal(saved["base_model.model.layers.1.q_proj.base_layer.bias"], trained.layers[1].q_proj.bias)

    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    assert loaded.lora_bias_mode == bias and _trainable(loaded) == _trainable(trained)
    # an adapter without biases (or with fewer) is refused over it, the model unchanged: the trained biases keep no
    # original, and that adapter ran on them (it had been loaded, differing from PEFT's load into the base model)
    lk.save_peft_adapter(_trained(("q_proj",)), tmp_path / "plain")
    lk.save_peft_adapter(_trained(("q_proj",), bias="lora_only"), tmp_path / "lora_only")
    before = _snapshot(loaded)
    for fewer in ["plain"] + (["lora_only"] if bias == "all" else []):
        with pytest.raises(ValueError, match=rf"^load_peft_adapter: the model's biases were trained in place by the "
                                             rf"adapter loaded or injected before \(bias='{bias}'\), and this adapter "
                                             rf"\(bias='(none|lora_only)'\) does not hold them all"):
            lk.load_peft_adapter(loaded, tmp_path / fewer)
        _assert_same(loaded, before)
    assert loaded.lora_bias_mode == bias
    fresh = lk.load_peft_adapter(_base(), tmp_path / "plain", backend=BACKEND)  # into the base model it loads
    assert not hasattr(fresh, "lora_bias_mode") and not fresh.layers[0].q_proj.bias.requires_grad
    # MultiLoRALinear slots hold LoRA factors only
    multi = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=8)
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=rf"holds '[^']+', a base bias \(bias='{bias}'\), and it differs from the "
                                         rf"model's.*cannot load by adapter_name"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    _assert_same(multi, before)
    # a model never prepared: that is what the error names (it called a LoRA layer's trained bias "the base layer's
    # own bias, which PEFT saves for an embedding layer" with bias="lora_only"; helper 271)
    unprepared = _base()
    before = _snapshot(unprepared)
    with pytest.raises(ValueError, match=r"adapter_name='a' loads into MultiLoRALinear slots, but module "
                                         r"'layers\.0\.q_proj' is a Linear; call prepare_multi_adapter"):
        lk.load_peft_adapter(unprepared, tmp_path, adapter_name="a")
    _assert_same(unprepared, before)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_mode_that_trained_no_bias_of_the_model_loads_by_name(tmp_path, bias):
    """A file saved with bias="all"/"lora_only" for a model whose layers have no bias (Llama's) holds no bias, and
    PEFT loads it by name and serves it in a mixed batch; a named load refused it, saying the file held base biases.
    So does a file whose biases equal the model's. One that trained them stays refused (above)."""
    def base(with_bias):
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(q=nn.Linear(6, 6, bias=with_bias), o=nn.Linear(6, 3, bias=with_bias)))
    x = torch.randn(2, 6)
    for with_bias in (False, True):
        torch.manual_seed(1)
        lk.save_peft_adapter(lk.inject_lora(base(with_bias), ["q"], r=2, bias=bias, init_lora_weights=False),
                             tmp_path / str(with_bias))
        expected = lk.load_peft_adapter(base(with_bias), tmp_path / str(with_bias))(x)
        multi = lk.prepare_multi_adapter(base(with_bias), ["q"], max_adapters=2, max_rank=4)
        lk.load_peft_adapter(multi, tmp_path / str(with_bias), adapter_name="a")
        with lk.set_batch_adapters(multi, ["a", "__base__"]):
            got = multi(x)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], base(with_bias)(x)[1], rtol=1e-6, atol=1e-6)


def test_lora_only_file_without_biases_loads_as_peft_before_0_21_saved_it(tmp_path):
    """PEFT before 0.21 saved no bias with bias="lora_only" (it looked for `<layer>.bias`, the key is
    `<layer>.base_layer.bias`), and loads such files over the base biases: so does load_peft_adapter, with a warning,
    the LoRA layers' biases trainable. A file holding some of those biases but not all stays refused (bad cases)."""
    trained = _trained(("q_proj",), bias="lora_only")
    lk.save_peft_adapter(trained, tmp_path)
    _edit_weights(tmp_path, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".bias")]])
    with pytest.warns(UserWarning, match=r"load_peft_adapter: .*adapter_model\.safetensors has bias='lora_only' but "
                                         r"holds no bias of its LoRA layers \(e\.g\. 'base_model\.model\.layers\.0"
                                         r"\.q_proj\.base_layer\.bias'\): PEFT before 0\.21 saved none"):
        loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    base = _base()
    for i in (0, 1):
        assert torch.equal(loaded.layers[i].q_proj.bias, base.layers[i].q_proj.bias)
        assert torch.equal(loaded.layers[i].q_proj.lora_B.weight, trained.layers[i].q_proj.lora_B.weight)
    assert loaded.lora_bias_mode == "lora_only" and _trainable(loaded) == _trainable(trained)
    assert {"layers.0.q_proj.bias", "layers.1.q_proj.bias"} <= _trainable(loaded)


@NO_LORA_INSIDE_MODULES_TO_SAVE
def test_bias_all_with_modules_to_save_both_ways_with_peft(tmp_path):
    """PEFT's bias="all" also writes the biases of a modules_to_save module under its wrapper's names (the trained
    copy `classifier.modules_to_save.default.dense.bias`, the original `classifier.original_module.dense.bias`):
    accepted here, and not needed by PEFT when our file leaves them out."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base, x = _Classifier(), torch.randn(4, 16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["dense"], modules_to_save=["classifier"], bias="all", init_lora_weights=False))
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))  # as if trained
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # peft < 0.18 strips the adapter name from every key: `classifier.modules_to_save.out_proj.bias`
    copy_key = "modules_to_save.default.out_proj.bias" if PEFT >= (0, 18) else "modules_to_save.out_proj.bias"
    assert {"base_model.model.classifier.original_module.out_proj.bias", "base_model.model.dense.base_layer.bias",
            f"base_model.model.classifier.{copy_key}"} <= set(saved)
    ours = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend=BACKEND)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert _trainable(ours) == _peft_trainable(theirs) and "dense.bias" in _trainable(ours)

    lk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(x), ours(x), rtol=1e-6, atol=1e-6)
    # only the module's own tensors under the wrapper's names are passed over, not any other tensor there
    key = "base_model.model.classifier.original_module.out_proj.weight"
    _edit_weights(tmp_path / "peft", lambda t: t.update({key: torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=rf"unexpected keys '{re.escape(key)}'"):
        lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend=BACKEND)


def _fail_once_after_copying(monkeypatch, selects, error=RuntimeError):
    """peft_io._copy_state copies the first state `selects` picks, then raises (once: the rollback copies too)."""
    original, failed = peft_io._copy_state, []

    def flaky(module, state):
        original(module, state)
        if selects(state) and not failed:
            failed.append(1)
            raise error("simulated failure mid-load")

    monkeypatch.setattr(peft_io, "_copy_state", flaky)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])  # Ctrl-C mid-load is undone too
@pytest.mark.parametrize("into", ["base", "injected"])
def test_a_failure_after_copying_the_biases_is_rolled_back(tmp_path, monkeypatch, into, error):
    # alpha, rsLoRA and dropout unlike the injected model's: a load into it sets them on its layers, then undoes that
    trained = _trained(bias="all", lora_alpha=4, use_rslora=True, lora_dropout=0.1)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if name.endswith("bias") or ".lora_" in name:
                parameter.add_(1.0)  # the saved biases differ from the base's, the factors from the injected ones
    lk.save_peft_adapter(trained, tmp_path)
    # "injected": its factors are those of `trained` before the change above (same seed), so a load that left the
    # file's factors in place on failure shows only because they were changed
    model = _base() if into == "base" else lk.inject_lora(_base(), ["q_proj", "v_proj"], init_lora_weights=False)
    before = _snapshot(model)
    _fail_once_after_copying(monkeypatch, lambda state: True, error)  # the bias copy goes through, then fails
    with pytest.raises(error, match="simulated"):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)


class _LanguageModel(nn.Module):
    """Tiny's layers between token embeddings and an lm_head, with the accessors PEFT looks for: PEFT saves the
    output embedding layer whole when target_modules names it (save_embedding_layers="auto")."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 16)
        self.layers = Tiny().layers
        self.lm_head = nn.Linear(16, 11, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(run_layers(self.layers, self.embed_tokens(ids)))


def _language_model():
    torch.manual_seed(2)
    return _LanguageModel()


def test_a_targeted_lm_head_is_saved_with_its_base_weight_as_peft_saves_it(tmp_path):
    """A targeted lm_head's base weight (a resized vocabulary's new rows) was never written: loaded into a fresh base
    model, the file computed other logits, where PEFT's file (which holds `lm_head.base_layer.weight` whenever
    target_modules names lm_head) computes the trained model's. "auto" now writes it as PEFT's does, with a warning;
    True too; False leaves it out; a merged layer writes the weight unmerge() would leave; a PEFT file loaded and
    saved again keeps it."""
    peft = pytest.importorskip("peft")
    model = lk.inject_lora(_language_model(), ["q_proj", "lm_head"], r=2, init_lora_weights=False)
    with torch.no_grad():  # a base weight the fresh model lacks, as after resizing the vocabulary here
        model.lm_head.weight.add_(0.5)
    weight = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 11, (2, 5))
    expected = model(ids)
    theirs = peft.get_peft_model(_language_model(), peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=2))
    with torch.no_grad():
        theirs.base_model.model.lm_head.base_layer.weight.copy_(weight)
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.copy_(model.get_parameter(name.removeprefix("base_model.model.").replace(".default", "")))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match=r"save_peft_adapter: target_modules names an embedding layer, so the base "
                                         r"weight of \['lm_head'\] is saved whole"):
        lk.save_peft_adapter(model, tmp_path / "auto")
    ours = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(ours["base_model.model.lm_head.base_layer.weight"], weight)
    for path in ("auto", "peft"):
        torch.testing.assert_close(lk.load_peft_adapter(_language_model(), tmp_path / path)(ids), expected,
                                   rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(peft.PeftModel.from_pretrained(_language_model(), tmp_path / path)(ids),
                                       expected, rtol=1e-6, atol=1e-6)
    lk.save_peft_adapter(model, tmp_path / "true", save_embedding_layers=True)  # the untargeted embeddings too
    assert torch.equal(load_file(tmp_path / "true" / "adapter_model.safetensors")[
        "base_model.model.lm_head.base_layer.weight"], weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.save_peft_adapter(model, tmp_path / "false", save_embedding_layers=False)
    assert not any(".base_layer." in key for key in load_file(tmp_path / "false" / "adapter_model.safetensors"))
    model.lm_head.merge()
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        lk.save_peft_adapter(model, tmp_path / "merged")
    torch.testing.assert_close(load_file(tmp_path / "merged" / "adapter_model.safetensors")[
        "base_model.model.lm_head.base_layer.weight"], weight, rtol=0, atol=1e-6)
    loaded = lk.load_peft_adapter(_language_model(), tmp_path / "peft")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        lk.save_peft_adapter(loaded, tmp_path / "again")
    torch.testing.assert_close(lk.load_peft_adapter(_language_model(), tmp_path / "again")(ids), expected,
                               rtol=1e-6, atol=1e-6)


def test_a_targeted_lm_head_that_peft_saved_whole_loads_as_peft_loads_it(tmp_path, monkeypatch):
    """PEFT saves `lm_head.base_layer.weight` beside the factors when target_modules names "lm_head", and loads it
    over the model's weight (found by fuzzing against PEFT: such files were refused as having unexpected keys)."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_language_model(), peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=2,
                                                                   init_lora_weights=False))
    with torch.no_grad():  # a base weight that differs from the fresh model's, as after resizing the vocabulary
        theirs.base_model.model.lm_head.base_layer.weight.add_(0.5)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ids = torch.randint(0, 11, (2, 5))
    expected = peft.PeftModel.from_pretrained(_language_model(), tmp_path)(ids)
    for model in (_language_model(), lk.inject_lora(_language_model(), ["q_proj", "lm_head"], r=2)):
        loaded = lk.load_peft_adapter(model, tmp_path)
        torch.testing.assert_close(loaded(ids), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(loaded.lm_head.weight, theirs.base_model.model.lm_head.base_layer.weight)
        assert not loaded.lm_head.weight.requires_grad  # the base weight stays frozen
    # a file without that weight is refused over it, the model unchanged: the loaded weight keeps no original, and
    # that adapter ran on it (found by a review); the same file again overwrites it, and loads
    theirs.save_pretrained(tmp_path / "without_base", save_embedding_layers=False)
    assert not any(".base_layer." in key for key in load_file(tmp_path / "without_base" / "adapter_model.safetensors"))
    before = _snapshot(loaded)
    with pytest.raises(ValueError, match=r"^load_peft_adapter: the model's layers \['lm_head'\] hold the whole state "
                                         r"that the adapter file loaded before held"):
        lk.load_peft_adapter(loaded, tmp_path / "without_base")
    _assert_same(loaded, before)
    torch.testing.assert_close(lk.load_peft_adapter(loaded, tmp_path)(ids), expected, rtol=1e-6, atol=1e-6)

    # named adapters share the base layer: only a file whose base weight is the model's own loads by name
    multi = lk.prepare_multi_adapter(_language_model(), ["q_proj", "lm_head"], max_adapters=2, max_rank=2)
    with pytest.raises(ValueError, match=r"holds 'base_model\.model\.lm_head\.base_layer\.weight'.*differs from the "
                                         r"model's; MultiLoRALinear slots share the base layer"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    _edit_weights(tmp_path, lambda t: t.update({"base_model.model.lm_head.base_layer.weight":
                                                 _language_model().lm_head.weight.detach().clone()}))
    lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    with lk.set_batch_adapters(multi, "a"):
        torch.testing.assert_close(multi(ids), lk.load_peft_adapter(_language_model(), tmp_path)(ids), rtol=1e-6,
                                   atol=1e-6)

    _edit_weights(tmp_path, lambda t: t.update({"base_model.model.lm_head.base_layer.weight": torch.randn(11, 15)}))
    model = _language_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'base_model\.model\.lm_head\.base_layer\.weight' in .* expected shape "
                                         r"\[11, 16\]"):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)

    _edit_weights(tmp_path, lambda t: t.update({"base_model.model.lm_head.base_layer.weight": torch.randn(11, 16)}))
    _fail_once_after_copying(monkeypatch, lambda state: "lm_head.weight" in state)  # the base weight's copy
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)


def test_a_targets_saved_bias_loads_with_its_weight_and_a_bias_it_lacks_is_refused(tmp_path):
    """PEFT saves the whole layer a LoRA wraps when target_modules names an embedding layer, bias too where it has
    one (Phi's lm_head): `<layer>.base_layer.bias` loads into the layer's bias, frozen, as its weight does; for a
    layer without bias the key is refused by name, not an AttributeError."""
    lk.save_peft_adapter(_trained(), tmp_path)
    weight, bias = torch.randn(16, 16), torch.randn(16)
    _edit_weights(tmp_path, lambda t: t.update({"base_model.model.layers.0.q_proj.base_layer.weight": weight,
                                                 "base_model.model.layers.0.q_proj.base_layer.bias": bias}))
    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    q_proj = loaded.layers[0].q_proj
    assert torch.equal(q_proj.weight, weight) and torch.equal(q_proj.bias, bias)
    assert not q_proj.weight.requires_grad and not q_proj.bias.requires_grad
    key = "base_model.model.layers.0.v_proj.base_layer.bias"  # v_proj has no bias
    _edit_weights(tmp_path, lambda t: t.update({key: torch.randn(8)}))
    model = _base()
    before = _snapshot(model)
    # the hint covers this case too: q_proj and v_proj are targets, v_proj has no bias
    with pytest.raises(ValueError, match=rf"unexpected keys '{re.escape(key)}' \(a wrapped layer's own tensor, which "
                                         r"PEFT saves for a targeted embedding layer such as lm_head; here that module "
                                         r"is no target, or has no such tensor\)"):
        lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
    _assert_same(model, before)


def test_loads_into_meta_weights_are_refused(tmp_path):
    """Copying an adapter into meta tensors would keep nothing: refused by name, LoRA targets and heads alike."""
    lk.save_peft_adapter(_trained(modules_to_save=["head"]), tmp_path)
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(ValueError, match=r"'weight' of module 'head' \(modules_to_save\) is on the meta device"):
        lk.load_peft_adapter(model, tmp_path)
    model.head = nn.Linear(16, 5)
    with pytest.raises(ValueError, match=r"module 'layers\.0\.q_proj' has its weight on the meta device"):
        lk.load_peft_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def _meta_wrapped_then_base_assigned(wrap, base_dtype=torch.float32):
    """Built on the meta device, wrapped (inject_lora / prepare_multi_adapter), then a base checkpoint (of
    base_dtype) loaded with load_state_dict(assign=True, strict=False): real base weights, adapter tensors still meta
    (missing keys)."""
    with torch.device("meta"):
        model = Tiny()
    wrap(model)
    base = {k: v.to(base_dtype) for k, v in _base().state_dict().items()}
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):  # its base layer is `<layer>.base_layer`
        base = {k.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer."): v
                for k, v in base.items()}
    missing = model.load_state_dict(base, assign=True, strict=False).missing_keys
    assert missing and all("lora" in key or key.endswith(("scalings", "ranks")) for key in missing)
    return model


def test_an_adapter_loads_into_the_meta_adapter_tensors_of_an_assigned_base(tmp_path):
    """inject_lora / prepare_multi_adapter on the meta device, then the base checkpoint with assign=True: the LoRA
    tensors, missing from it, stay meta. load_peft_adapter copied the adapter into them, which keeps nothing, and
    reported success (a later forward failed on "lora_a expected device cpu, got meta"); it now makes them on the
    base weight's device (a MultiLoRALinear's other slots empty). A failure mid-load puts the meta tensors back."""
    trained = _trained()
    lk.save_peft_adapter(trained, tmp_path)
    x = torch.randn(3, 16)

    model = _meta_wrapped_then_base_assigned(lambda m: lk.inject_lora(m, ["q_proj", "v_proj"], backend=BACKEND))
    lk.load_peft_adapter(model, tmp_path)
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in trained.named_parameters() if p.requires_grad]

    multi = _meta_wrapped_then_base_assigned(
        lambda m: lk.prepare_multi_adapter(m, ["q_proj", "v_proj"], max_adapters=2, max_rank=8, backend=BACKEND))
    lk.load_peft_adapter(multi, tmp_path, adapter_name="x")
    assert not any(t.is_meta for t in [*multi.parameters(), *multi.buffers()])
    assert not any(p.requires_grad for p in multi.parameters())  # frozen, as prepared: the slots are not trained
    assert multi.layers[0].q_proj.ranks.tolist() == [8, 0] and multi.layers[0].q_proj.scalings.tolist() == [1.0, 0.0]
    with torch.no_grad(), lk.set_batch_adapters(multi, ["x", "__base__"]):
        torch.testing.assert_close(multi(torch.stack([x, x])), torch.stack([trained(x), _base()(x)]))


def test_meta_slots_take_the_dtype_of_the_base_weight_assigned_since(tmp_path):
    """A MultiLoRALinear built on the meta device in float32 whose bf16 base checkpoint was assigned since gets bf16
    slots from load_peft_adapter, as one prepared on that base gets (adapter_dtype=None: the base weight's), and the
    other way round: the slots were made in the meta model's dtype (a float32 adapter rounded to bf16 slots on a
    float32 model). adapter_dtype given keeps its dtype. A LoRALinear's meta factors too, by autocast_adapter_dtype."""
    lk.save_peft_adapter(_trained(), tmp_path)
    for base_dtype, adapter_dtype, expected in ((torch.bfloat16, None, torch.bfloat16),
                                                (torch.bfloat16, torch.float32, torch.float32)):
        multi = _meta_wrapped_then_base_assigned(
            lambda m: lk.prepare_multi_adapter(m, ["q_proj", "v_proj"], max_adapters=2, max_rank=8, backend=BACKEND,
                                               adapter_dtype=adapter_dtype), base_dtype)
        lk.load_peft_adapter(multi, tmp_path, adapter_name="x")
        layer = multi.layers[0].q_proj
        assert (layer.base_layer.weight.dtype, layer.lora_a.dtype, layer.lora_b.dtype) == (base_dtype, expected,
                                                                                            expected)
    lk.save_peft_adapter(_trained(("q_proj",)), tmp_path / "q")
    for pickled_before_the_setting in (False, True):
        with torch.device("meta"):
            model = Tiny().to(torch.bfloat16)
        lk.prepare_multi_adapter(model, ["q_proj"], max_adapters=2, max_rank=8, backend=BACKEND)
        if pickled_before_the_setting:  # a layer unpickled from before _requested_adapter_dtype was kept
            for layer in model.modules():
                if isinstance(layer, MultiLoRALinear):
                    del layer._requested_adapter_dtype
        base = {k.replace("q_proj.", "q_proj.base_layer."): v for k, v in _base().state_dict().items()}
        model.load_state_dict(base, assign=True, strict=False)
        lk.load_peft_adapter(model, tmp_path / "q", adapter_name="x")
        assert model.layers[0].q_proj.lora_a.dtype == torch.float32  # the float32 checkpoint's, not bf16
    # LoRALinear factors likewise, where they take the weight's dtype (autocast_adapter_dtype=False): bf16 factors
    # on a float32 base had rounded the adapter to bf16
    for autocast_adapter_dtype, expected in ((False, torch.float32), (True, torch.float32)):
        with torch.device("meta"):
            model = Tiny().to(torch.bfloat16)
        lk.inject_lora(model, ["q_proj"], backend=BACKEND, autocast_adapter_dtype=autocast_adapter_dtype)
        model.load_state_dict(_base().state_dict(), assign=True, strict=False)
        lk.load_peft_adapter(model, tmp_path / "q")
        layer = model.layers[0].q_proj
        assert (layer.weight.dtype, layer.lora_A.weight.dtype, layer.lora_B.weight.dtype) == (torch.float32,
                                                                                            expected, expected)
    with torch.device("meta"):
        model = Tiny()
    lk.inject_lora(model, ["q_proj"], backend=BACKEND, autocast_adapter_dtype=False)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in _base().state_dict().items()}, assign=True,
                          strict=False)
    lk.load_peft_adapter(model, tmp_path / "q")
    assert model.layers[0].q_proj.lora_A.weight.dtype == torch.bfloat16  # the bf16 base's


def test_a_failed_load_into_meta_adapter_tensors_puts_them_back(tmp_path, monkeypatch):
    lk.save_peft_adapter(_trained(bias="all"), tmp_path / "biases")
    model = _meta_wrapped_then_base_assigned(lambda m: lk.inject_lora(m, ["q_proj", "v_proj"], backend=BACKEND))
    before = [(name, p, p.requires_grad) for name, p in model.named_parameters()]
    _fail_once_after_copying(monkeypatch, lambda state: True)  # after the factors, at the biases' copy
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(model, tmp_path / "biases")
    assert [(name, p, p.requires_grad) for name, p in model.named_parameters()] == before
    assert model.layers[0].q_proj.lora_A.weight.is_meta

    lk.save_peft_adapter(_trained(), tmp_path / "plain")
    multi = _meta_wrapped_then_base_assigned(
        lambda m: lk.prepare_multi_adapter(m, ["q_proj", "v_proj"], max_adapters=2, max_rank=8, backend=BACKEND))
    before = [*multi.named_parameters(), *multi.named_buffers()]
    set_adapter, calls = MultiLoRALinear.set_adapter, []

    def fails_on_the_second_layer(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure mid-load")
        set_adapter(self, *args)

    monkeypatch.setattr(MultiLoRALinear, "set_adapter", fails_on_the_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(multi, tmp_path / "plain", adapter_name="x")
    assert [*multi.named_parameters(), *multi.named_buffers()] == before and multi.lora_adapter_slots == {}


def test_save_refuses_meta_tensors_by_name_before_writing(tmp_path):
    """An adapter, head or bias still on the meta device holds no values: torch's "Cannot copy out of meta tensor"
    came out of the save naming nothing (for a slot's ranks or scalings: "Tensor.item() cannot be called on meta
    tensors"). A ValueError names the tensor before any file is written."""
    lk.save_peft_adapter(_trained(), tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    meta_factors = _meta_wrapped_then_base_assigned(lambda m: lk.inject_lora(m, ["q_proj", "v_proj"]))
    head = _trained(modules_to_save=["head"])
    head.head.to("meta")
    bias = _trained(bias="all")
    bias.layers[1].norm.to("meta")
    multi, meta_scalings = (lk.load_peft_adapter(lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"],
                                                                         max_adapters=2, max_rank=8),
                                                tmp_path, adapter_name="x") for _ in range(2))
    multi.to("meta")
    meta_scalings.layers[1].v_proj.scalings = meta_scalings.layers[1].v_proj.scalings.to("meta")
    for model, adapter_name, what in [
            (meta_factors, None, r"lora_A\.weight of module 'layers\.0\.q_proj'"),
            (head, None, r"'weight' of module 'head' \(modules_to_save\)"),
            (bias, None, r"the model's 'layers\.1\.norm\.bias' \(bias='all'\)"),
            (multi, "x", r"ranks of module 'layers\.0\.q_proj'"),
            (meta_scalings, "x", r"scalings of module 'layers\.1\.v_proj'")]:
        with pytest.raises(ValueError, match=rf"save_peft_adapter: {what} is on the meta device.*nothing was written"):
            lk.save_peft_adapter(model, tmp_path, adapter_name=adapter_name)
        with pytest.raises(ValueError, match=r"is on the meta device"):
            lk.save_peft_adapter(model, tmp_path / "new", adapter_name=adapter_name)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files


def test_target_modules_regex_exclude_and_layers_to_transform(tmp_path):
    lk.save_peft_adapter(_trained(("q_proj", "v_proj", "o_proj")), tmp_path)
    model = _base()
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    for changes, expected in [
        ({"target_modules": r"layers\.\d\.(q|o)_proj"}, {"layers.0.q_proj", "layers.0.o_proj", "layers.1.q_proj",
                                                          "layers.1.o_proj"}),
        ({"exclude_modules": ["layers.0.q_proj"]}, {"layers.1.q_proj", "layers.0.v_proj", "layers.1.v_proj",
                                                    "layers.0.o_proj", "layers.1.o_proj"}),
        ({"layers_to_transform": [1], "layers_pattern": "layers"}, {"layers.1.q_proj", "layers.1.v_proj",
                                                                   "layers.1.o_proj"}),
        ({"layers_to_transform": 0, "layers_pattern": ["blocks", "layers"]}, {"layers.0.q_proj", "layers.0.v_proj",
                                                                              "layers.0.o_proj"}),
        # PEFT's default layer pattern needs a component before the layer list ("model.layers.0."): none here
        ({"layers_to_transform": 0}, set()),
        # PEFT puts no LoRA on a module trained whole
        ({"modules_to_save": ["o_proj"]}, {"layers.0.q_proj", "layers.1.q_proj", "layers.0.v_proj", "layers.1.v_proj"}),
    ]:
        config = peft_io.parse_adapter_config({**raw, **changes})
        selected = named_target_modules(model, config.target_modules, config.exclude_modules,
                                        layers_to_transform=config.layers_to_transform,
                                        layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save)
        assert {n for n, _ in selected} == expected, changes
    # the loader honours exclude_modules too: the file holds no o_proj factors
    _write_config(tmp_path, target_modules=r".*_proj", exclude_modules=["layers.0.o_proj", "layers.1.o_proj"])
    _edit_weights(tmp_path, lambda t: [t.pop(k) for k in [k for k in t if ".o_proj." in k]])
    loaded = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    assert {n for n, m in loaded.named_modules() if isinstance(m, LoRALinear)} == {
        f"layers.{i}.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}


def _raw_config(**changes):
    """An adapter_config.json dict as PEFT writes it, with `changes` (None values drop the field)."""
    raw = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": False,
           "use_rslora": False, "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none"}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": None}, r"field 'peft_type' expected \"LORA\" \(only LoRA adapters are supported\), got None"),
    ({"r": True}, r"field 'r' expected an int >= 1, got True"),
    ({"lora_alpha": True}, r"field 'lora_alpha' expected a finite number, got True"),
    # json.load takes NaN and Infinity; a NaN alpha loaded into an injected model NaN'd the weights merge() wrote
    ({"lora_alpha": float("nan")}, r"field 'lora_alpha' expected a finite number, got nan"),
    ({"lora_alpha": float("-inf")}, r"field 'lora_alpha' expected a finite number, got -inf"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, r"field \"alpha_pattern\['q_proj'\]\" expected a finite number, "
                                                  r"got inf"),
    ({"lora_dropout": 1}, r"field 'lora_dropout' expected a number in \[0, 1\), got 1$"),
    ({"lora_dropout": -0.1}, r"field 'lora_dropout' expected a number in \[0, 1\), got -0\.1$"),
    ({"lora_dropout": False}, r"field 'lora_dropout' expected a number in \[0, 1\), got False"),
    ({"use_rslora": "true"}, r"field 'use_rslora' expected true or false, got 'true'"),
    ({"fan_in_fan_out": 1}, r"field 'fan_in_fan_out' expected true or false, got 1"),
    ({"target_modules": ""}, r"field 'target_modules' expected a regex string or a non-empty list .*, got ''"),
    ({"target_modules": []}, r"field 'target_modules' expected .*, got \[\]"),
    ({"target_modules": ["q_proj", ""]}, r"field 'target_modules' expected .*, got \['q_proj', ''\]"),
    ({"target_modules": "(q|v_proj"}, r"field 'target_modules' is not a valid regular expression"),
    ({"exclude_modules": "("}, r"field 'exclude_modules' is not a valid regular expression"),
    ({"rank_pattern": [["q_proj", 4]]}, r"field 'rank_pattern' expected an object \{module-name regex: value\}"),
    ({"rank_pattern": {"(": 4}}, r"field 'rank_pattern' has an invalid regex key '\('"),
    # inline flags compile alone but not inside the lookup regex: re.error, naming neither file nor field, escaped
    ({"alpha_pattern": {"(?i)V_PROJ": 2}},
     r"field 'alpha_pattern' has an invalid regex key '\(\?i\)V_PROJ' \(global flags not at the start .*, inside .*, "
     r"the regex it is matched as"),
    ({"layers_to_transform": [0], "layers_pattern": ["layers", "(?i)LAYERS"]},
     r"field 'layers_pattern' has an invalid regex '\(\?i\)LAYERS' \(global flags not at the start .*, inside "),
    ({"rank_pattern": {"q_proj": 0}}, r"field \"rank_pattern\['q_proj'\]\" expected an int >= 1, got 0"),
    ({"rank_pattern": {"q_proj": True}}, r"field \"rank_pattern\['q_proj'\]\" expected an int >= 1, got True"),
    ({"rank_pattern": {"q_proj": 4.0}}, r"field \"rank_pattern\['q_proj'\]\" expected an int >= 1, got 4\.0"),
    ({"alpha_pattern": {"q_proj": True}}, r"field \"alpha_pattern\['q_proj'\]\" expected a finite number, got True"),
    ({"layers_to_transform": [0, -1]}, r"field 'layers_to_transform' expected an int or a list of ints >= 0"),
    ({"layers_to_transform": [0], "target_modules": r".*\.q_proj"},
     r"field 'layers_to_transform' cannot be used with a regex target_modules"),
    ({"layers_to_transform": [0], "layers_pattern": ["layers", 1]},
     r"field 'layers_pattern' expected a str or a list of str, got \['layers', 1\]"),
    ({"modules_to_save": ["head", ""]}, r"field 'modules_to_save' expected a list of module names"),
    ({"modules_to_save": ["head", "(?i)norm"]},  # a bare re.error from PEFT's name match, naming no field
     r"field 'modules_to_save' has an invalid regex entry '\(\?i\)norm' \(global flags not at the start .*, inside "),
    ({"trainable_token_indices": [3, 5]}, r"field 'trainable_token_indices' = \[3, 5\] asks for trainable tokens"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_config_fields_are_checked_by_name(changes, message):
    """A malformed or unsupported field is a ValueError naming it and the value, never accepted with a guess (a
    missing peft_type, r=true, a rank of 4.0 in rank_pattern, a dropout of 1 were each accepted by some variant)."""
    with pytest.raises(ValueError, match=rf"^adapter_config\.json: .*{message}"):
        peft_io.parse_adapter_config(_raw_config(**changes))


@pytest.mark.parametrize("field", ["kasa_config", "velora_config", "monteclora_config", "use_bdlora", "arrow_config"])
def test_an_empty_variant_config_is_refused_as_peft_turns_the_variant_on(field):
    """PEFT's LoraConfig makes its sub-config object of any dict, {} included, whose defaults switch the variant on
    (a "kasa_config": {} file ran KaSA in PEFT, 0.44 apart from the plain LoRA this loaded silently, as "unset").
    null still means off."""
    with pytest.raises(ValueError, match=rf"^adapter_config\.json: field '{field}' = \{{\}} asks for "):
        peft_io.parse_adapter_config(_raw_config(**{field: {}}))
    assert peft_io.parse_adapter_config(_raw_config(**{field: None})).r == _raw_config()["r"]
    peft = pytest.importorskip("peft")
    if field in {f.name for f in dataclasses.fields(peft.LoraConfig)}:  # PEFT 0.21's fields; an older one lacks some
        assert getattr(peft.LoraConfig(target_modules=["q_proj"], **{field: {}}), field)  # truthy: the variant is on


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match=r"adapter_config\.json: expected a JSON object, got list"):
        peft_io.parse_adapter_config([_raw_config()])


def test_config_defaults_and_unset_fields_are_peft_s():
    """A field left out takes LoraConfig's default (r=8, lora_alpha=8, no dropout, bias "none"); null, false or
    empty values of fields that change nothing when unset are accepted, as PEFT writes them (null use_rslora, an
    empty layers_pattern, a field of a newer PEFT at its default)."""
    config = peft_io.parse_adapter_config({"peft_type": "LORA", "target_modules": ["q_proj"], "use_rslora": None,
                                           "fan_in_fan_out": None, "layers_pattern": [], "exclude_modules": [],
                                           "use_dora": False,
                                           "layer_replication": None, "lora_bias": False, "trainable_token_indices": [],
                                           "future_field": None, "other_future_field": ""})
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.use_rslora is False and config.fan_in_fan_out is False
    config = peft_io.parse_adapter_config({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4})
    assert config.rank_and_alpha("layers.0.q_proj") == (4, 8)  # lora_alpha's default is 8, not r
    config = peft_io.parse_adapter_config({"peft_type": "LORA", "target_modules": ["q_proj"], "exclude_modules": ""})
    assert config.exclude_modules is None  # PEFT: "" excludes nothing


@pytest.mark.parametrize("init, warns", [("pissa", True), ("pissa_niter_16", True), ("olora", True), ("corda", True),
                                         ("loftq", True), ("lora_ga", True), (True, False), ("gaussian", False),
                                         ("eva", False), ("orthogonal", False)])
def test_adapters_trained_on_a_base_that_peft_modified_load_with_a_warning(init, warns):
    """PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA initialisations change the base weights PEFT trains against: such an
    adapter only computes what it was trained to on that modified base, which the caller must pass."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_io.parse_adapter_config(_raw_config(init_lora_weights=init))
    assert any("PEFT modified (residual weights)" in str(w.message) for w in caught) == warns


def test_an_astra_adapter_loads_with_a_warning_that_peft_modified_its_base():
    """PEFT 0.22's Astra initialisation subtracts the initial product from the base weight, as PiSSA does, and
    writes its astra_config (how the base was modified) into the file: refused as an unknown field until now."""
    astra_config = {"cache_file": None, "covariance_file": None, "verbose": False, "use_float16_for_covariance": False,
                    "prune_temporary_fields": True}
    with pytest.warns(UserWarning, match=r"init_lora_weights='astra': this adapter was trained on a base model that "
                                         r"PEFT modified \(residual weights\)"):
        config = peft_io.parse_adapter_config(_raw_config(init_lora_weights="astra", astra_config=astra_config))
    assert config.r == _raw_config()["r"]


@pytest.mark.parametrize("init, warns", [("mica", True), ("MiCA", True), (True, False), ("pissa", False)])
def test_a_mica_adapter_loads_with_a_warning_that_lora_b_trains_here(init, warns):
    """PEFT 0.21.2's MiCA (init_lora_weights="mica") computes as plain LoRA but keeps lora_B frozen in training; it
    loaded here with lora_B trainable without a word (helper 271)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_io.parse_adapter_config(_raw_config(init_lora_weights=init))
    assert any("init_lora_weights='mica': PEFT trains this adapter's lora_A only (lora_B frozen)" in str(w.message)
               for w in caught) == warns


def test_conv1d_like_layers_need_transformers():
    # without transformers imported nothing is a Conv1D and fan_in_fan_out on nn.Linear is refused by from_linear
    with pytest.raises(TypeError, match="fan_in_fan_out=True expects a transformers Conv1D"):
        LoRALinear.from_linear(nn.Linear(4, 3), fan_in_fan_out=True)


def test_a_file_with_fan_in_fan_out_loads_into_linear_layers_with_peft_s_warning(tmp_path):
    trained = _trained()
    lk.save_peft_adapter(trained, tmp_path)
    _write_config(tmp_path, fan_in_fan_out=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lk.load_peft_adapter(_base(), tmp_path, backend=BACKEND)
    # one warning for the call, as PEFT's one per model (it was one per layer)
    assert [str(w.message) for w in caught] == [
        "load_peft_adapter: fan_in_fan_out=True but 'layers.0.q_proj', 'layers.0.v_proj', 'layers.1.q_proj' and 1 "
        "more are nn.Linear layers (weight [out, in]); wrapping them with fan_in_fan_out=False, as PEFT does"]
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- bad adapter files

def _bad_cases():
    def drop_key(t):
        del t["base_model.model.layers.1.v_proj.lora_B.weight"]

    def wrong_shape(t):
        t["base_model.model.layers.0.q_proj.lora_A.weight"] = torch.randn(8, 15)

    def extra_key(t):
        t["base_model.model.layers.0.o_proj.lora_A.weight"] = torch.randn(8, 8)
        t["base_model.model.layers.0.o_proj.lora_B.weight"] = torch.randn(16, 8)

    def dora_key(t):
        t["base_model.model.layers.0.q_proj.lora_magnitude_vector"] = torch.randn(16)

    def int_dtype(t):
        key = "base_model.model.layers.0.q_proj.lora_A.weight"
        t[key] = t[key].to(torch.int32)

    def head_key(t):
        t["base_model.model.head.weight"] = torch.randn(5, 16)

    def head_saved(path):  # the file holds the head's state, the config names it: an adapter with modules_to_save
        _write_config(path, modules_to_save=["head"])
        _edit_weights(path, lambda t: t.update({"base_model.model.head.weight": torch.randn(5, 16),
                                                "base_model.model.head.bias": torch.randn(5)}))

    def then(*edits):
        return lambda path: [edit(path) for edit in edits]

    def two_names(t):
        key = "base_model.model.layers.0.q_proj.lora_A.weight"
        t[key.replace(".weight", ".other.weight")] = t.pop(key)
        key = "base_model.model.layers.0.q_proj.lora_B.weight"
        t[key.replace(".weight", ".default.weight")] = t.pop(key)

    def malformed_json(path):
        (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')

    def truncated(path):
        file = path / "adapter_model.safetensors"
        data = file.read_bytes()
        file.write_bytes(data[: len(data) - 100])

    def config(**changes):
        return lambda path: _write_config(path, **changes)

    def weights(edit):
        return lambda path: _edit_weights(path, edit)

    def bias_saved(mode):  # an adapter trained with PEFT's bias option: its biases are in the file
        return lambda path: lk.save_peft_adapter(_trained(bias=mode), path)

    def add(key, tensor):
        return weights(lambda t: t.update({key: tensor}))

    q_bias = "base_model.model.layers.0.q_proj.base_layer.bias"

    return [
        ("missing key", weights(drop_key), ValueError,
         r"missing 'base_model\.model\.layers\.1\.v_proj\.lora_B\.weight'"),
        ("wrong shape", weights(wrong_shape), ValueError, r"expected shape \[8, 16\].*got \[8, 15\]"),
        ("extra keys", weights(extra_key), ValueError, r"unexpected keys 'base_model\.model\.layers\.0\.o_proj"),
        ("DoRA key", weights(dora_key), ValueError, r"unexpected keys.*lora_magnitude_vector.*DoRA"),
        ("int dtype", weights(int_dtype), ValueError, r"expected a floating dtype, got torch\.int32"),
        ("two adapter names", weights(two_names), ValueError, r"several adapter names"),
        ("malformed JSON", malformed_json, ValueError, r"adapter_config\.json: malformed JSON"),
        ("truncated safetensors", truncated, ValueError, r"not a readable safetensors file"),
        ("unknown peft_type", config(peft_type="IA3"), ValueError, r"'peft_type' expected \"LORA\""),
        ("use_dora", config(use_dora=True), ValueError, r"'use_dora' = True asks for DoRA"),
        ("bias not a mode", config(bias="some"), ValueError,
         r"field 'bias' expected one of \['none', 'lora_only', 'all'\], got 'some'"),
        ("bias all, biases missing", config(bias="all"), ValueError,
         rf"missing '{q_bias}' \(bias='all' trains the model's 'layers\.0\.q_proj\.bias'\)"),
        ("bias lora_only, a bias missing", then(bias_saved("lora_only"), weights(
            lambda t: t.pop("base_model.model.layers.1.q_proj.base_layer.bias"))), ValueError,
         r"missing 'base_model\.model\.layers\.1\.q_proj\.base_layer\.bias' \(bias='lora_only'"),
        ("bias wrong shape", then(bias_saved("all"), add(q_bias, torch.randn(15))), ValueError,
         rf"'{q_bias}' in .* expected shape \[16\].*\(the model's 'layers\.0\.q_proj\.bias'\), got shape \[15\]"),
        ("bias of no module", then(bias_saved("all"), add("base_model.model.layers.0.k_proj.bias", torch.randn(16))),
         ValueError, r"has 'base_model\.model\.layers\.0\.k_proj\.bias', which maps to no bias that bias='all'"),
        ("bias of a LoRA layer without base_layer", then(bias_saved("all"), add(
            "base_model.model.layers.0.q_proj.bias", torch.randn(16))), ValueError,
         r"has 'base_model\.model\.layers\.0\.q_proj\.bias', which maps to no bias"),
        ("bias of another layer, lora_only", then(bias_saved("lora_only"), add("base_model.model.head.bias",
                                                                               torch.randn(5))), ValueError,
         r"has 'base_model\.model\.head\.bias', which maps to no bias that bias='lora_only' trains"),
        ("bias of another layer, lora_only, none of its own", then(bias_saved("lora_only"), weights(
            lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".base_layer.bias")]]),
            add("base_model.model.head.bias", torch.randn(5))), ValueError,
         r"has 'base_model\.model\.head\.bias', which maps to no bias that bias='lora_only' trains"),
        # PEFT's lora_bias (a bias on lora_B) in a file whose config says lora_bias=false: named as such, not as a
        # base bias (helper 271)
        ("lora_B bias, bias none", add("base_model.model.layers.0.q_proj.lora_B.bias", torch.randn(16)), ValueError,
         r"unexpected keys 'base_model\.model\.layers\.0\.q_proj\.lora_B\.bias' \(PEFT's lora_bias: a bias on "
         r"lora_B, which is not supported; the config has lora_bias=false\)"),
        ("lora_B bias, bias all", then(bias_saved("all"), add("base_model.model.layers.0.q_proj.lora_B.bias",
                                                              torch.randn(16))), ValueError,
         r"has 'base_model\.model\.layers\.0\.q_proj\.lora_B\.bias' \(PEFT's lora_bias: a bias on lora_B"),
        ("bias key, bias none", add("base_model.model.head.bias", torch.randn(5)), ValueError,
         (r"unexpected keys 'base_model\.model\.head\.bias' \(a bias, which PEFT saves with bias='all' or "
          r"'lora_only'; the config has bias='none'\)")),
        ("head key, no modules_to_save", weights(head_key), ValueError,
         r"unexpected keys 'base_model\.model\.head\.weight'; expected only"),
        ("modules_to_save, head missing", config(modules_to_save=["head"]), ValueError,
         r"missing 'base_model\.model\.head\.(weight|bias)' \(modules_to_save \['head'\] selects module 'head'\)"),
        ("modules_to_save, head wrong shape", then(head_saved, weights(lambda t: t.update(
            {"base_model.model.head.weight": torch.randn(5, 15)}))), ValueError,
         r"'base_model\.model\.head\.weight' in .* expected shape \[5, 16\].*got shape \[5, 15\]"),
        ("modules_to_save, head of int dtype", then(head_saved, weights(lambda t: t.update(
            {"base_model.model.head.weight": torch.zeros(5, 16, dtype=torch.int64)}))), ValueError,
         (r"'base_model\.model\.head\.weight' in .* expected shape \[5, 16\] and a floating dtype .*got shape "
          r"\[5, 16\], torch\.int64")),
        ("modules_to_save, a LoRA key missing", then(head_saved, weights(drop_key)), ValueError,
         r"missing 'base_model\.model\.layers\.1\.v_proj\.lora_B\.weight'"),
        ("modules_to_save, unknown module's keys", then(head_saved, config(modules_to_save=["classifier"])),
         ValueError, (r"unexpected keys 'base_model\.model\.head\.bias'.*or the state of a module that "
                      r"modules_to_save \['classifier'\] selects")),
        # q_proj becomes a module trained whole (PEFT then puts no LoRA on it): the file has no state for it
        ("modules_to_save, a LoRA target", then(head_saved, config(modules_to_save=["head", "q_proj"])), ValueError,
         r"missing 'base_model\.model\.layers\.0\.q_proj\.weight'|module 'layers\.0\.q_proj', which holds the "
         r"LoRA layer 'layers\.0\.q_proj'"),
        ("modules_to_save not a list", config(modules_to_save="head"), ValueError,
         r"'modules_to_save' expected a list of module names, got 'head'"),
        ("lora_bias", config(lora_bias=True), ValueError, r"'lora_bias'"),
        ("unknown field", config(new_peft_feature={"on": 1}), ValueError, r"unknown field\(s\) \['new_peft_feature'\]"),
        ("null targets", config(target_modules=None), ValueError, r"'target_modules' is null"),
        ("targets match nothing", config(target_modules=["k_proj"]), ValueError, r"match no module"),
        ("target is not linear", config(target_modules=["q_proj", "v_proj", "norm"]), ValueError,
         r"targets module 'layers\.0\.norm', a LayerNorm"),
        ("bad r", config(r=0), ValueError, r"'r' expected an int >= 1, got 0"),
        ("layers_pattern alone", config(layers_pattern="layers"), ValueError,
         r"field 'layers_pattern' needs 'layers_to_transform' \(as in PEFT\)"),
        # into an injected model the dropout is assigned to the existing layers, not checked by a constructor
        ("bad lora_dropout", config(lora_dropout=1.5), ValueError,
         r"adapter_config\.json.*'lora_dropout' expected a number in \[0, 1\), got 1\.5"),
        ("bad rank_pattern", config(rank_pattern={"q_proj": 4}), ValueError,
         r"expected shape \[4, 16\]|LoRALinear of r=8, the adapter has r=4"),
        ("no config", lambda path: os.remove(path / "adapter_config.json"), FileNotFoundError, "adapter_config.json"),
        ("no weights", lambda path: os.remove(path / "adapter_model.safetensors"), FileNotFoundError,
         "neither adapter_model.safetensors nor adapter_model.bin"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("into", ["base", "injected"])
def test_bad_adapter_files_raise_and_leave_the_model_untouched(tmp_path, case, into):
    _, corrupt, error, message = case
    lk.save_peft_adapter(_trained(), tmp_path)
    corrupt(tmp_path)
    model = _base() if into == "base" else lk.inject_lora(_base(), ["q_proj", "v_proj"], init_lora_weights=False)
    if into == "injected":
        model.layers[0].q_proj.lora_A.weight.requires_grad_(False)  # an odd flag must survive too
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)


class _WritesAFile:
    """Unpickling it opens (creates) `path`: code that a full torch.load would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_unreadable_weight_files_are_value_errors_naming_the_file(tmp_path):
    """An adapter_model.bin is read with weights_only=True: a pickle that runs code is refused, never executed; a
    checkpoint that is not a flat {str: tensor} mapping, and a config that is not UTF-8, are ValueErrors naming the
    file (the raw UnpicklingError, AttributeError or UnicodeDecodeError did not)."""
    lk.save_peft_adapter(_trained(), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    bin_file, marker = tmp_path / "adapter_model.bin", tmp_path / "code-ran"
    for content, message in [
        ({**tensors, "extra": _WritesAFile(str(marker))}, r"not a readable torch checkpoint"),
        ({**tensors, "base_model.model.layers.0.q_proj.lora_A.weight": 5},
         r"expected a flat mapping of names to tensors"),
        ({**tensors, 0: torch.zeros(8, 16)}, r"expected a flat mapping of names to tensors"),
        (list(tensors.values()), r"expected a flat mapping of names to tensors"),
    ]:
        torch.save(content, bin_file)
        model = _base()
        before = _snapshot(model)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(bin_file))}: {message}"):
            lk.load_peft_adapter(model, tmp_path)
        _assert_same(model, before)
        assert not marker.exists()
    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": \xff}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'adapter_config.json'))}: malformed JSON"):
        lk.load_peft_adapter(_base(), tmp_path)


def test_config_errors_name_the_file_they_come_from(tmp_path):
    lk.save_peft_adapter(_trained(), tmp_path)
    _write_config(tmp_path, r=0)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'adapter_config.json'))}: field 'r'"):
        lk.load_peft_adapter(_base(), tmp_path)


@pytest.mark.parametrize("key, hint", [
    ("layers.0.q_proj.lora_magnitude_vector", "DoRA magnitude: DoRA is not supported"),
    ("embed.lora_embedding_A", "LoRA on an embedding: only linear layers are supported"),
    ("head.base_layer.weight", "a wrapped layer's own tensor, which PEFT saves for a targeted embedding layer"),
    ("head.bias", "a bias, which PEFT saves with bias='all' or 'lora_only'"),
    ("head.modules_to_save.default.weight", "PEFT's wrapper name of a modules_to_save module: read for a module the "
                                            "config selects, under that module's own keys and shapes only"),
    ("head.original_module.weight", "PEFT's wrapper name of a modules_to_save module"),
    ("head.weight", None),
])
def test_unexpected_keys_say_what_peft_saved_them_for(key, hint):
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(8, 16),
               f"base_model.model.{key}": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"f: unexpected keys") as info:
        peft_io.group_adapter_weights(tensors, "f")
    assert (hint in str(info.value)) if hint else f"'base_model.model.{key}'; expected only" in str(info.value)


def _lora_key(module, factor="A", adapter=None):
    return f"base_model.model.{module}.lora_{factor}{'.' + adapter if adapter else ''}.weight"


@pytest.mark.parametrize("keys, message", [
    # another prefix of the same length, none, two adapter-name components
    (["base_model.MODEL.layers.0.q_proj.lora_A.weight"], r"unexpected keys 'base_model\.MODEL\.layers"),
    (["layers.0.q_proj.lora_A.weight"], r"unexpected keys 'layers\.0\.q_proj\.lora_A\.weight'"),
    ([_lora_key("q", adapter="default.x")], r"unexpected keys 'base_model\.model\.q\.lora_A\.default\.x\.weight'"),
    ([f"base_model.model.m{i}.weight" for i in range(6)],
     "unexpected keys " + ", ".join(rf"'base_model\.model\.m{i}\.weight'" for i in range(5)) + " and 1 more; expected"),
    ([_lora_key("q", "A", "x"), _lora_key("q", "B", "y"), _lora_key("v", "A", "z")],
     r"the keys carry several adapter names \(\['x', 'y', 'z'\]\)"),
    ([_lora_key("q", "A"), _lora_key("q", "B", "default")],  # 'None' had been listed as a name
     r"the keys carry several adapter names \(\['default'\] and keys without one\); expected one adapter per file"),
    ([], r"holds no LoRA tensors"),
])
def test_keys_that_name_no_lora_factor_of_one_adapter_are_refused(keys, message):
    """Only `base_model.model.<module>.lora_A|B[.<adapter>].weight` names a LoRA factor, one adapter name per file:
    a key with another prefix of the same length was read as `<module>` with its first characters cut off."""
    with pytest.raises(ValueError, match=rf"^f: {message}"):
        peft_io.group_adapter_weights({key: torch.zeros(8, 8) for key in keys}, "f")


def test_a_factor_that_is_not_a_matrix_is_refused_by_its_key():
    with pytest.raises(ValueError, match=r"^f: tensor 'base_model\.model\.q\.lora_A\.weight' expected 2 dimensions, "
                                         r"got shape \(8, 8, 1\)"):
        peft_io.group_adapter_weights({_lora_key("q"): torch.zeros(8, 8, 1)}, "f")


def test_injected_model_mismatches_are_refused_untouched(tmp_path):
    lk.save_peft_adapter(_trained(), tmp_path)
    for model, message in [
        (lk.inject_lora(_base(), ["q_proj", "v_proj"], r=4), r"LoRALinear of r=4, the adapter has r=8"),
        (lk.inject_lora(_base(), ["q_proj", "v_proj", "o_proj"]), r"LoRA layers the adapter does not target.*o_proj"),
    ]:
        before = _snapshot(model)
        with pytest.raises(ValueError, match=message):
            lk.load_peft_adapter(model, tmp_path)
        _assert_same(model, before)
    merged = lk.inject_lora(_base(), ["q_proj", "v_proj"])
    merged.layers[1].q_proj.merge()
    with pytest.raises(ValueError, match="merged adapter"):
        lk.load_peft_adapter(merged, tmp_path)


def _every_entry_point_refuses(model, adapter_dir, message):
    """inject_lora, load_peft_adapter (of the adapter in adapter_dir) and prepare_multi_adapter each raise a
    ValueError matching `message` and leave the model's modules as they were."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    for call in (lambda m: lk.inject_lora(m, ["q_proj", "v_proj"]), lambda m: lk.load_peft_adapter(m, adapter_dir),
                 lambda m: lk.prepare_multi_adapter(m, ["q_proj"], max_adapters=2, max_rank=8)):
        with pytest.raises(ValueError, match=message):
            call(model)
        assert [(n, type(m)) for n, m in model.named_modules()] == modules
        assert not hasattr(model, "lora_adapter_slots")

def test_layers_with_accelerate_hooks_are_refused_untouched(tmp_path):
    """Offloading (device_map "cpu"/"disk", cpu_offload) keeps a layer's weight on "meta" behind a hook on that layer:
    wrapping it would drop the hook. Refused by name before anything changes, by every entry point."""
    accelerate = pytest.importorskip("accelerate")
    lk.save_peft_adapter(_trained(), tmp_path)
    offloaded = accelerate.cpu_offload(_base(), execution_device="cpu")
    assert offloaded.layers[0].q_proj.weight.is_meta
    _every_entry_point_refuses(offloaded, tmp_path, r"module 'layers\.0\.q_proj' carries an accelerate hook "
                                                    r"\(AlignDevicesHook.*drop; its weight is on the meta device")
    # an offloaded head (modules_to_save) is refused too: the saved state would go into meta tensors
    lk.save_peft_adapter(_trained(modules_to_save=["head"]), tmp_path / "head")
    model = _base()
    accelerate.cpu_offload(model.head, execution_device="cpu")
    with pytest.raises(ValueError, match=r"module 'head' carries an accelerate hook .*meta device"):
        lk.load_peft_adapter(model, tmp_path / "head")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    # a hook that only moves inputs (a dispatched model's layer, weight on a real device)
    model = _base()
    accelerate.hooks.add_hook_to_module(model.layers[1].v_proj, accelerate.hooks.AlignDevicesHook("cpu"))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"module 'layers\.1\.v_proj' carries an accelerate hook.*would drop\. Load"):
        lk.inject_lora(model, ["q_proj", "v_proj"])
    _assert_same(model, before)


def test_layers_inside_a_block_accelerate_offloads_are_refused_untouched(tmp_path):
    """cpu_offload (or a device_map with "disk") with preload_module_classes puts the offloading hook on the block,
    not on its linear layers, whose weights sit on the meta device: inject_lora and prepare_multi_adapter wrapped
    them, and the first forward failed inside accelerate with a KeyError on the LoRA factors' names (the block's hook
    loads every tensor under it from its offloaded copies by name). Refused naming the layer and the block; a block
    whose hook only moves inputs (a dispatched model's) takes its LoRA layers."""
    accelerate = pytest.importorskip("accelerate")
    lk.save_peft_adapter(_trained(), tmp_path)
    offloaded = accelerate.cpu_offload(_base(), execution_device="cpu", preload_module_classes=["Block"])
    assert getattr(offloaded.layers[0].q_proj, "_hf_hook", None) is None and offloaded.layers[0].q_proj.weight.is_meta
    _every_entry_point_refuses(offloaded, tmp_path, r"module 'layers\.0\.q_proj' lies inside 'layers\.0', which an "
                                                    r"accelerate hook \(AlignDevicesHook, .*\) offloads as a whole")
    model = _base()
    accelerate.hooks.add_hook_to_module(model.layers[0], accelerate.hooks.AlignDevicesHook("cpu", io_same_device=True))
    lk.inject_lora(model, ["q_proj"], init_lora_weights=False, backend=BACKEND)
    x = torch.randn(3, 16)
    expected = _trained(["q_proj"])(x)  # the same seeds: the same base and factors
    torch.testing.assert_close(model(x), expected)


def test_a_lora_model_offloaded_by_accelerate_is_refused_by_name(tmp_path):
    """A LoRA model offloaded afterwards (cpu_offload, dispatch_model with "cpu"/"disk" entries): accelerate's hooks
    move in the weights of the modules they wrap for their forward, and the LoRA factors' modules are never called,
    so they stay on the meta device. The forward, save_peft_adapter and merge_and_unload said the factors were never
    loaded and advised load_peft_adapter, which then refused the model for its meta weight; each now names the
    offloading and what to do instead."""
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.cpu_offload(_trained(), execution_device="cpu")
    offloaded = r"this LoRALinear is offloaded by accelerate .* merge_and_unload\(\) it before offloading"
    calls = {"LoRALinear.forward": lambda: model(torch.randn(3, 16)),
             "save_peft_adapter": lambda: lk.save_peft_adapter(model, tmp_path / "saved"),
             "merge_and_unload": lambda: lk.merge_and_unload(model),
             "load_peft_adapter": lambda: lk.load_peft_adapter(model, tmp_path / "file")}
    lk.save_peft_adapter(_trained(), tmp_path / "file")
    for op, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{re.escape(op)}.*{offloaded}"):
            call()
    assert not (tmp_path / "saved").exists()
    assert isinstance(model.layers[0].q_proj, LoRALinear)


def test_conv1d_layers_that_cannot_be_wrapped_are_refused_by_name_untouched(tmp_path):
    """The loader's checks of an nn.Linear target hold for transformers' Conv1D (GPT-2's linear layer) too: an
    accelerate hook, which the LoRA layer would drop, and a weight computed by a parametrization."""
    accelerate = pytest.importorskip("accelerate")
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    def gpt2_like():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(c_fc=conv1d(8, 16), act=nn.ReLU(), c_proj=conv1d(4, 8)))  # Conv1D(out, in)

    trained = lk.inject_lora(gpt2_like(), ["c_fc", "c_proj"], r=2, fan_in_fan_out=True, backend=BACKEND)
    lk.save_peft_adapter(trained, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # as PEFT's
    hooked = gpt2_like()
    accelerate.hooks.add_hook_to_module(hooked.c_proj, accelerate.hooks.AlignDevicesHook("cpu"))
    parametrized = gpt2_like()
    torch.nn.utils.parametrizations.weight_norm(parametrized.c_fc)
    # a file that says fan_in_fan_out=False for them loads with PEFT's warning
    _write_config(tmp_path, fan_in_fan_out=False)
    with pytest.warns(UserWarning, match=r"^load_peft_adapter: 'c_fc', 'c_proj' are transformers Conv1D \(weight "
                                         r"\[in, out\]\) but fan_in_fan_out is False; wrapping them with "
                                         r"fan_in_fan_out=True, as PEFT does$"):
        lk.load_peft_adapter(gpt2_like(), tmp_path, backend=BACKEND)
    for model, error, message in [
        (hooked, ValueError, r"load_peft_adapter: module 'c_proj' carries an accelerate hook"),
        (parametrized, TypeError, r"load_peft_adapter: module 'c_fc' \(ParametrizedConv1D\) has parametrizations"),
    ]:
        before = _snapshot(model)
        with pytest.raises(error, match=message):
            lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
        _assert_same(model, before)


class _FakeQuantLinear(nn.Linear):
    def forward(self, x):  # its own computation: a LoRA layer would replace it by F.linear on the raw weight
        return nn.functional.linear(x, torch.round(self.weight * 4) / 4, self.bias)


def test_loading_into_a_linear_subclass_with_its_own_forward_is_refused_untouched(tmp_path):
    lk.save_peft_adapter(_trained(), tmp_path)
    model = _base()
    fake = _FakeQuantLinear(16, 8, bias=False)
    fake.load_state_dict(model.layers[1].v_proj.state_dict())
    model.layers[1].v_proj = fake
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"load_peft_adapter: module 'layers.1.v_proj' is a .*_FakeQuantLinear, an "
                                        r"nn.Linear subclass with its own forward"):
        lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
    _assert_same(model, before)


def test_a_failure_while_changing_the_model_is_rolled_back(tmp_path, monkeypatch):
    lk.save_peft_adapter(_trained(), tmp_path)
    model = _base()
    before = _snapshot(model)
    calls = []
    original = LoRALinear.from_linear.__func__

    def flaky(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure mid-load")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "from_linear", classmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(model, tmp_path)
    _assert_same(model, before)


def test_save_is_atomic_a_crash_keeps_the_old_file(tmp_path, monkeypatch):
    lk.save_peft_adapter(_trained(), tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch
    written = []

    def crash(tensors, filename, metadata=None, error=None):
        written.append(filename)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise error or OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lk.save_peft_adapter(_trained(("q_proj",)), tmp_path)
    # the temporary file is beside the target (a rename across file systems would fail), and removed also when the
    # save is interrupted (Ctrl-C)
    assert os.path.dirname(written[0]) == str(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *args, **kwargs: crash(*args, error=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        lk.save_peft_adapter(_trained(("q_proj",)), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("blocked", ["adapter_config.json", "adapter_model.safetensors"])
def test_save_over_a_directory_named_as_an_adapter_file_writes_nothing(tmp_path, blocked):
    """A directory where one of the two files goes: the second rename failed after the first had replaced its file
    (new weights beside the old config), with a bare IsADirectoryError naming the temporary file; refused by name
    before anything is written."""
    lk.save_peft_adapter(_trained(), tmp_path)
    (tmp_path / blocked).unlink()
    (tmp_path / blocked).mkdir()
    other = ({"adapter_config.json", "adapter_model.safetensors"} - {blocked}).pop()
    old = (tmp_path / other).read_bytes()
    with pytest.raises(ValueError, match=rf"save_peft_adapter: path '{re.escape(str(tmp_path))}' holds a directory "
                                         rf"named '{blocked}', where the adapter's file goes; nothing was written"):
        lk.save_peft_adapter(_trained(("q_proj",)), tmp_path)
    assert (tmp_path / other).read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    # a new directory under it is empty, and a link to a directory is replaced by the rename as a file is
    lk.save_peft_adapter(_trained(("q_proj",)), tmp_path / "run" / "checkpoint-1")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / blocked).symlink_to(tmp_path / blocked, target_is_directory=True)
    lk.save_peft_adapter(_trained(("q_proj",)), tmp_path / "linked")
    assert (tmp_path / "linked" / blocked).is_file() and (tmp_path / blocked).is_dir()


def test_under_a_process_group_only_rank_0_writes(tmp_path, monkeypatch):
    """Every rank may call save_peft_adapter (under FSDP2 they must: gathering the shards is a collective), and only
    rank 0 writes: others writing the same files at once could interleave (checked on a stand-in process group;
    test_distributed.py saves from real ranks)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank in (1, 0):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        lk.save_peft_adapter(_trained(), tmp_path / f"rank{rank}")
    assert not (tmp_path / "rank1").exists()
    assert sorted(os.listdir(tmp_path / "rank0")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_whose_config_write_fails_keeps_the_old_weights_too(tmp_path, monkeypatch):
    """Both files are written before either replaces the old one: the weights were renamed into place first, and a
    config write that then failed (disk full) left new factors beside the old config, which loaded with its alpha."""
    lk.save_peft_adapter(_trained(), tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io.json, "dump", disk_full)
    with pytest.raises(OSError, match="disk full"):
        lk.save_peft_adapter(_trained(("q_proj",), lora_alpha=4), tmp_path)  # another alpha, other targets
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_refuses_what_one_peft_config_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        lk.save_peft_adapter(_base(), tmp_path)
    model = _trained()
    model.layers[0].q_proj.lora_dropout = 0.2
    with pytest.raises(ValueError, match="different lora_dropout"):
        lk.save_peft_adapter(model, tmp_path)
    model = _trained()
    model.layers[1].v_proj.use_rslora = True
    with pytest.raises(ValueError, match=r"the LoRA layers have different use_rslora values \[False, True\]"):
        lk.save_peft_adapter(model, tmp_path)
    model = _trained(modules_to_save=["head"])
    del model.head  # the module trained whole is gone: its state cannot be saved
    with pytest.raises(ValueError, match=r"model\.lora_modules_to_save = \['head'\] matches no module of the model"):
        lk.save_peft_adapter(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_a_merged_layer_saves_the_file_an_unmerged_one_does(tmp_path):
    """PEFT saves a merged model's factors (merge for a quick evaluation, then a checkpoint): so does
    save_peft_adapter, byte for byte the file of the unmerged model, which loads back to the same outputs."""
    model = _trained()
    lk.save_peft_adapter(model, tmp_path / "unmerged")
    model.layers[0].q_proj.merge()
    lk.save_peft_adapter(model, tmp_path / "merged")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "unmerged" / name).read_bytes()
    assert model.layers[0].q_proj.merged  # saving leaves the layer as it was
    x = torch.randn(3, 16)
    loaded = lk.load_peft_adapter(_base(), tmp_path / "merged", backend=BACKEND).eval()
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_slots_load_base_tensors_equal_to_the_model_s_of_layers_prepared_for_other_adapters(tmp_path):
    """A file that holds base tensors equal to the model's (embed_tokens and lm_head from save_embedding_layers=True,
    the biases of bias="all") loads by name, but was refused once the layer they belong to was a MultiLoRALinear
    prepared for another adapter: the file's plain `lm_head.weight` / `o_proj.bias` were looked up under the
    prepared layer's `base_layer.` keys, and the bias refusal said bias='none' of a bias='all' config (helper 255)."""
    trained = lk.inject_lora(_language_model(), ["q_proj"], r=2, bias="all", init_lora_weights=False)
    lk.save_peft_adapter(trained, tmp_path, save_embedding_layers=True)
    ids = torch.randint(0, 11, (3, 5))
    expected = lk.load_peft_adapter(_language_model(), tmp_path, backend=BACKEND).eval()(ids)
    multi = lk.prepare_multi_adapter(_language_model(), ["q_proj", "o_proj", "lm_head"], max_adapters=2, max_rank=2,
                                     backend=BACKEND)
    lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    with lk.set_batch_adapters(multi, ["a"] * 3):
        torch.testing.assert_close(multi.eval()(ids), expected)
    # a base tensor that differs from the model's is still refused by name, the slots unchanged
    bias = multi.layers[0].o_proj.base_layer.bias
    saved_bias = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1.0)
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=r"holds 'base_model\.model\.layers\.0\.o_proj\.bias', a base bias "
                                         r"\(bias='all'\), and it differs from the model's"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="b")
    _assert_same(multi, before)
    # a bias key of no module: unexpected, and the hint no longer says bias='none' of a bias='all' config
    file = str(tmp_path / "adapter_model.safetensors")
    save_file({**load_file(file), "base_model.model.layers.0.k_proj.bias": torch.zeros(16)}, file)
    with torch.no_grad():
        bias.copy_(saved_bias)
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=r"unexpected keys 'base_model\.model\.layers\.0\.k_proj\.bias' \(a bias, as "
                                         r"bias='all' saves them, of no module of this model\)"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="c")
    _assert_same(multi, before)


def test_an_embedding_layer_tied_to_a_merged_target_saves_its_unmerged_weight(tmp_path):
    """embed_tokens tied to a targeted lm_head (tie_word_embeddings): once lm_head was merged, save_embedding_layers
    wrote embed_tokens.weight merged beside the unmerged lm_head.base_layer.weight, two values for one tensor, and
    the file loaded back 0.7 away from the model (helper 255). Both are now the weight unmerge() would leave."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _language_model()
    model.lm_head.weight = model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"tied to 'embed_tokens\.weight'"):
        model = lk.inject_lora(model, ["q_proj", "lm_head"], r=2, init_lora_weights=False)
    with torch.no_grad():
        model.lm_head.lora_B.weight.normal_()
    ids = torch.randint(0, 11, (2, 5))
    expected = model(ids)
    model.lm_head.merge()
    lk.save_peft_adapter(model, tmp_path, save_embedding_layers=True)
    saved = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(saved["base_model.model.embed_tokens.weight"],
                               saved["base_model.model.lm_head.base_layer.weight"], rtol=0, atol=0)
    torch.testing.assert_close(saved["base_model.model.embed_tokens.weight"], model.lm_head._unmerged_weight())
    fresh = _language_model()
    fresh.lm_head.weight = fresh.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"tied to 'embed_tokens\.weight'"):
        loaded = lk.load_peft_adapter(fresh, tmp_path, backend=BACKEND)
    torch.testing.assert_close(loaded(ids), expected)


def test_save_checks_the_config_fields_it_is_given(tmp_path):
    """task_type was written to the config whatever it was (task_type=5 made a config PEFT's TaskType does not
    know), and a pathlib.Path base_model_name_or_path failed in json with "Object of type PosixPath is not JSON
    serializable", naming no argument. A path is taken as its str; anything else is a TypeError before any file."""
    import pathlib
    with pytest.raises(TypeError, match=r"save_peft_adapter: task_type expected None or a str such as 'CAUSAL_LM', "
                                        r"got 5"):
        lk.save_peft_adapter(_trained(), tmp_path, task_type=5)
    with pytest.raises(TypeError, match=r"save_peft_adapter: base_model_name_or_path expected None, a str or a path, "
                                        r"got 7"):
        lk.save_peft_adapter(_trained(), tmp_path, base_model_name_or_path=7)
    assert not os.listdir(tmp_path)
    lk.save_peft_adapter(_trained(), tmp_path, base_model_name_or_path=pathlib.Path("/models/base"))
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "/models/base"
    # by default the model's own: a transformers model's config._name_or_path, null where that is "" (a model
    # built from a config, not loaded from a checkpoint)
    model = _trained()
    for name_or_path, saved in [("", None), ("org/base", "org/base")]:
        model.config = types.SimpleNamespace(_name_or_path=name_or_path)
        lk.save_peft_adapter(model, tmp_path)
        with open(tmp_path / "adapter_config.json") as f:
            assert json.load(f)["base_model_name_or_path"] == saved


def test_save_refuses_a_task_type_peft_does_not_know(tmp_path):
    """Any str was written as task_type: a typo ("causal_lm", "CAUSAL") gave a file that PEFT refuses to load
    (PeftConfig: "Invalid task type"). Refused by name before any file, as PEFT's LoraConfig refuses it."""
    peft = pytest.importorskip("peft")
    for bad in ("causal_lm", "CAUSAL"):
        with pytest.raises(ValueError, match=r"save_peft_adapter: task_type expected None or one of PEFT's task "
                                             r"types \['SEQ_CLS', .*\], got '" + bad + "'"):
            lk.save_peft_adapter(_trained(), tmp_path, task_type=bad)
        with pytest.raises(ValueError, match="Invalid task type"):
            peft.LoraConfig(task_type=bad)
    assert not os.listdir(tmp_path)
    for good in list(peft.TaskType):  # every task type PEFT knows, as str and as its enum
        lk.save_peft_adapter(_trained(), tmp_path, task_type=good)
        assert peft.PeftConfig.from_pretrained(str(tmp_path)).task_type == good


def test_save_refuses_a_lora_layer_that_is_the_whole_model(tmp_path):
    """A LoRALinear or MultiLoRALinear saved on its own has no module name for PEFT's keys and target_modules: it was
    refused for a target_modules entry '' that the caller never passed (helper 192). Refused naming the model, no
    file written; inside a module it saves."""
    for model, adapter_name in ((LoRALinear(4, 4, r=2), None), (MultiLoRALinear(nn.Linear(4, 4), 2, 2), "a")):
        with pytest.raises(TypeError, match=f"save_peft_adapter: model expected a module that holds LoRA layers, got "
                                            f"a {type(model).__name__} itself"):
            lk.save_peft_adapter(model, tmp_path, adapter_name)
    assert not os.listdir(tmp_path)
    lk.save_peft_adapter(nn.Sequential(LoRALinear(4, 4, r=2)), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["0"]


def test_a_loaded_task_type_is_saved_again(tmp_path):
    """PEFT keeps a loaded adapter's task_type when it saves it again; here a PEFT file with task_type "CAUSAL_LM",
    loaded, trained and saved, came back with task_type null, which AutoPeftModelForCausalLM.from_pretrained refuses
    ("Cannot infer the auto class from the config"). An explicit task_type still wins; merge_and_unload ends the
    adapter, so a new one starts without it."""
    def saved_task_type(model, name, **kwargs):
        lk.save_peft_adapter(model, tmp_path / name, **kwargs)
        with open(tmp_path / name / "adapter_config.json") as f:
            return json.load(f)["task_type"]

    assert saved_task_type(_trained(), "causal", task_type="CAUSAL_LM") == "CAUSAL_LM"
    model = lk.load_peft_adapter(_base(), tmp_path / "causal", backend=BACKEND)
    assert saved_task_type(model, "again") == "CAUSAL_LM"
    assert saved_task_type(model, "explicit", task_type="SEQ_CLS") == "SEQ_CLS"
    assert saved_task_type(_trained(), "none") is None
    assert saved_task_type(lk.load_peft_adapter(model, tmp_path / "none", backend=BACKEND), "none_again") is None
    model = lk.load_peft_adapter(_base(), tmp_path / "causal", backend=BACKEND)
    lk.inject_lora(lk.merge_and_unload(model), ["q_proj"], backend=BACKEND)
    assert saved_task_type(model, "new") is None


def test_saved_target_modules_select_exactly_the_lora_layers(tmp_path):
    # only layer 1's q_proj: the suffix "q_proj" would also select layer 0, so full names are written
    model = lk.inject_lora(_base(), ["layers.1.q_proj", "v_proj"], init_lora_weights=False)
    lk.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    loaded = lk.load_peft_adapter(_base(), tmp_path)
    assert not isinstance(loaded.layers[0].q_proj, LoRALinear) and isinstance(loaded.layers[1].q_proj, LoRALinear)


def test_target_matching_agrees_with_peft():
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig
    names = [n for n, _ in _base().named_modules() if n]
    names += ["model." + n for n in names] + ["model.blocks.1.q_proj"]  # PEFT's default layer pattern needs "model."
    for kwargs in [
        {"target_modules": ["q_proj", "o_proj"]},
        {"target_modules": r".*\.(q|v)_proj"},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.1.q_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*0\.v_proj"},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "head"], "layers_to_transform": 0},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []},  # empty: every layer
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": ""},  # the default
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": ["layers", "blocks"]},
    ]:
        if "exclude_modules" in kwargs and PEFT < (0, 14):
            continue  # peft < 0.14's LoraConfig has no exclude_modules
        checked = names
        if kwargs.get("layers_pattern") and PEFT < (0, 21):
            # peft < 0.21 needs a name component before the pattern ("model.layers.1" matches, "layers.1" does not);
            # lora_kernels follows peft >= 0.21
            checked = [n for n in names if not n.startswith("layers.")]
        config = LoraConfig(**kwargs)
        ours = [n for n in checked if target_module_matches(n, kwargs["target_modules"], kwargs.get("exclude_modules"),
                                                            kwargs.get("layers_to_transform"),
                                                            kwargs.get("layers_pattern"))]
        excluded = getattr(tuners_utils, "_ExcludedModule", ())  # peft >= 0.14 returns one for an excluded name
        theirs = [n for n in checked if tuners_utils.check_target_module_exists(config, n)
                  and not isinstance(tuners_utils.check_target_module_exists(config, n), excluded)]
        assert ours == theirs, kwargs


@pytest.mark.skipif(PEFT is None or PEFT < (0, 21), reason="lora_kernels follows peft >= 0.21's layer index rules")
def test_target_matching_and_patterns_agree_with_peft_on_near_miss_names():
    """Names where a looser rule would differ from PEFT's: a layer index nested in another (an expert's, a layer
    list inside a layer), a layers_pattern that ends a longer component, a modules_to_save entry that ends or starts
    a longer component; and rank_pattern keys that match only a name's start, or two keys that both match."""
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from lora_kernels.modules import pattern_value
    names = ["model.layers.1.moe.experts.0.w1", "model.layers.0.moe.experts.1.w1",
             "model.layers.1.mixer.layers.0.q_proj", "model.layers.0.mixer.layers.1.q_proj", "model.sublayers.1.q_proj",
             "model.pre_classifier", "model.classifier_head", "model.classifier.dense"]
    for kwargs in [
        {"target_modules": ["w1", "q_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["pre_classifier", "classifier_head", "dense"], "modules_to_save": ["classifier"]},
    ]:
        config = LoraConfig(**kwargs)
        ours = [n for n in names if target_module_matches(n, kwargs["target_modules"], None,
                                                          kwargs.get("layers_to_transform"),
                                                          kwargs.get("layers_pattern"), kwargs.get("modules_to_save"))]
        theirs = [n for n in names if tuners_utils.check_target_module_exists(config, n)
                  and not isinstance(tuners_utils.check_target_module_exists(config, n), tuners_utils._ExcludedModule)]
        assert ours == theirs, kwargs
    for pattern in [{"q": 4}, {"self_attn.q_proj": 2, "q_proj": 1}, {"q_proj": 1, "self_attn.q_proj": 2},
                    {"down_proj|q_proj": 9}]:  # an alternation is one group: it matches whole components only
        name = "model.layers.0.self_attn.q_proj"
        assert pattern_value(pattern, name, 8) == pattern.get(get_pattern_key(pattern.keys(), name), 8), pattern
    # a key that is a module's own name but no regex of it ("a+b" matches "aab", not "a+b"): PEFT's lookup falls back
    # to the name itself (found by a review: such a layer got the default alpha here, PEFT's pattern's in PEFT)
    for pattern, name in [({"heads.a+b": 5}, "heads.a+b"), ({"heads.a+b": 5}, "heads.aab"), ({"a+b": 5}, "heads.a+b")]:
        assert pattern_value(pattern, name, 8) == pattern.get(get_pattern_key(pattern.keys(), name), 8), (pattern, name)
    assert pattern_value({"heads.a+b": 5}, "heads.a+b", 8) == 5


def test_save_writes_patterns_for_a_name_that_ends_another_and_for_regex_characters(tmp_path):
    """A top-level layer "proj" of another rank than "block.proj" (its name ends the other's), and a layer whose name
    holds a regex character: the keys of the first try ("proj" matched "block.proj", "a+b" matched no "a+b") gave
    other ranks when read back, so save raised an internal error. Every layer now gets its own full-name key, longer
    names first, regex characters escaped; our loader and PEFT's lookup give each layer its rank."""
    def build():
        model = nn.Module()
        model.proj, model.block, model.other = nn.Linear(16, 16), nn.Module(), nn.Module()
        model.block.proj, model.other.proj = nn.Linear(16, 16), nn.Linear(16, 16)
        model.heads = nn.ModuleDict({"a+b": nn.Linear(16, 16), "aab": nn.Linear(16, 16)})
        return model

    torch.manual_seed(0)
    model = build()
    lk.inject_lora(model, ["proj", "a+b", "aab"], r=4, lora_alpha=8, init_lora_weights=False, backend=BACKEND,
                   rank_pattern={"^proj": 2, r"heads\.a\+b": 6}, alpha_pattern={"^proj": 3})
    ranks = {name: module.r for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    assert ranks == {"proj": 2, "block.proj": 4, "other.proj": 4, "heads.a+b": 6, "heads.aab": 4}
    lk.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"]["^proj"] == 2 and config["rank_pattern"]["heads.a\\+b"] == 6
    fresh = build()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    lk.load_peft_adapter(fresh, tmp_path, backend=BACKEND)
    loaded = {name: (m.r, m.lora_alpha) for name, m in fresh.named_modules() if isinstance(m, LoRALinear)}
    assert loaded == {"proj": (2, 3), "block.proj": (4, 8), "other.proj": (4, 8), "heads.a+b": (6, 8),
                      "heads.aab": (4, 8)}
    x = torch.randn(3, 16)
    for name in loaded:
        torch.testing.assert_close(fresh.get_submodule(name)(x), model.get_submodule(name)(x), rtol=0, atol=0)
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key  # PEFT's own lookup agrees
    for name, (rank, alpha) in loaded.items():
        assert config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), name), config["r"]) == rank
        assert config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), name),
                                           config["lora_alpha"]) == alpha


@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_saved_patterns_hold_in_the_sorted_order_the_file_has(tmp_path, order):
    """The config is written with sorted keys (rank_pattern's too, as PEFT writes it): patterns checked in the order
    built ({"x.proj": 6, "proj": 2}, or a fallback's longer names first) were written as {"proj": .., "x.proj": ..},
    where "proj" matches "x.proj" first, so neither our loader nor PEFT could read the file (size mismatch)."""
    def build():
        torch.manual_seed(0)
        model = nn.Module()
        names = ["proj", "x", "y"] if order == "short_first" else ["x", "y", "proj"]
        for name in names:
            if name == "proj":
                model.proj = nn.Linear(16, 16)
            else:
                setattr(model, name, nn.Module())
                getattr(model, name).proj = nn.Linear(16, 16)
        return model

    model = build()
    lk.inject_lora(model, ["proj"], r=4, lora_alpha=8, init_lora_weights=False, backend=BACKEND,
                   rank_pattern={"^proj": 2, "^x.proj": 6}, alpha_pattern={"^proj": 3})
    expected = {"proj": (2, 3), "x.proj": (6, 8), "y.proj": (4, 8)}
    assert {n: (m.r, m.lora_alpha) for n, m in model.named_modules() if isinstance(m, LoRALinear)} == expected
    lk.save_peft_adapter(model, tmp_path)
    loaded = lk.load_peft_adapter(build(), tmp_path, backend=BACKEND)
    assert {n: (m.r, m.lora_alpha) for n, m in loaded.named_modules() if isinstance(m, LoRALinear)} == expected
    x = torch.randn(3, 16)
    for name in expected:
        torch.testing.assert_close(loaded.get_submodule(name)(x), model.get_submodule(name)(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(), tmp_path)
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in back.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ranks == {name: r for name, (r, _) in expected.items()}


def test_embedding_layers_peft_saves_for_a_resized_vocabulary_load_as_peft_loads_them(tmp_path):
    """PEFT's flow for new tokens (resize_token_embeddings, LoRA, save_pretrained) saves the embedding layers whole,
    `<layer>.weight` beside the LoRA factors (save_embedding_layers="auto" when the vocabulary was resized, or True),
    and loads them over the model's. They were refused as unexpected keys, so such an adapter could not load."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama_config

    def base(vocab=104):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, tie_word_embeddings=False)).eval()

    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                         init_lora_weights=False)).eval()
    with torch.no_grad():  # the new tokens' rows, trained (or initialised at the resize: random)
        theirs.base_model.model.model.embed_tokens.weight[100:] += 1.0
        theirs.base_model.model.lm_head.weight[100:] -= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(
        load_file(tmp_path / "adapter_model.safetensors"))
    ids = torch.tensor([[1, 5, 101, 102]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours = lk.load_peft_adapter(base(), tmp_path, backend=BACKEND)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
    assert not ours.model.embed_tokens.weight.requires_grad and not ours.lm_head.weight.requires_grad
    # saved again (save_embedding_layers="auto": those the file held), they come back for PEFT too
    lk.save_peft_adapter(ours, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    theirs_file = load_file(tmp_path / "adapter_model.safetensors")
    for key in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        assert torch.equal(again[key], theirs_file[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(base(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected)
    # a file without embedding layers is refused over it, the model unchanged: the loaded embeddings keep no original,
    # and that adapter ran on them (found by a review); after merge_and_unload and a new inject_lora, "auto" saves
    # the LoRA factors alone (whole embedding matrices had been written into the next adapter's file)
    plain = tmp_path / "plain"
    lk.save_peft_adapter(lk.inject_lora(base(), ["q_proj", "v_proj"], r=4), plain)
    before, held = _snapshot(ours), ours.lora_embedding_layers
    with pytest.raises(ValueError, match=r"^load_peft_adapter: the model's layers \['lm_head', 'model\.embed_tokens'\] "
                                         r"hold the whole state that the adapter file loaded before held"):
        lk.load_peft_adapter(ours, plain, backend=BACKEND)
    _assert_same(ours, before)
    assert ours.lora_embedding_layers == held == ["lm_head", "model.embed_tokens"]
    merged = lk.merge_and_unload(lk.load_peft_adapter(base(), tmp_path, backend=BACKEND))
    lk.save_peft_adapter(lk.inject_lora(merged, ["o_proj"], r=2), tmp_path / "merged")
    keys = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert keys and all(".lora_" in key for key in keys), sorted(keys)
    # named adapters share the embedding layers: only a file whose embedding layers are the model's own loads by name
    multi = lk.prepare_multi_adapter(base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    before = {k: v.clone() for k, v in multi.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds 'base_model\.model\.model\.embed_tokens\.weight', the embedding "
                                         r"layer's weight .*differs from the model's; MultiLoRALinear slots share"):
        lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    assert all(torch.equal(v, before[k]) for k, v in multi.state_dict().items())
    _edit_weights(tmp_path, lambda t: t.update({"base_model.model.model.embed_tokens.weight":
                                                 base().model.embed_tokens.weight.detach().clone(),
                                                 "base_model.model.lm_head.weight": base().lm_head.weight.detach()}))
    lk.load_peft_adapter(multi, tmp_path, adapter_name="a")
    with lk.set_batch_adapters(multi, "a"), torch.no_grad():
        torch.testing.assert_close(multi(input_ids=ids).logits,
                                   lk.load_peft_adapter(base(), tmp_path, backend=BACKEND)(input_ids=ids).logits)
    other = base(vocab=100)  # not resized: refused by key and shapes, the model unchanged
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"embed_tokens\.weight.*expected shape \[100, 64\].*got shape \[104, 64\]"):
        lk.load_peft_adapter(other, tmp_path, backend=BACKEND)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_embedding_heads_peft_saves_under_wrapper_names_for_a_resized_vocabulary_load(tmp_path):
    """The other recipe for new tokens: modules_to_save=["embed_tokens", "lm_head"]. PEFT's save_embedding_layers
    (on a resized vocabulary) then also writes each head under its wrapper's names, `<layer>.modules_to_save.weight`
    and `<layer>.original_module.weight`, beside `<layer>.weight`, and loads `<layer>.weight`: the file was refused
    as unexpected keys, with a hint that PEFT's files hold no such names (helper 255)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama_config

    def base():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=104, tie_word_embeddings=False)).eval()

    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                         modules_to_save=["embed_tokens", "lm_head"],
                                                         init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad and "modules_to_save" in name:
                parameter.add_(0.5)  # the heads, trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    saved = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {f"base_model.model.{layer}.{part}weight" for layer in ("model.embed_tokens", "lm_head")
            for part in ("", "modules_to_save.", "original_module.")} <= saved
    ids = torch.tensor([[1, 5, 101, 102]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        ours = lk.load_peft_adapter(base(), tmp_path, backend=BACKEND)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
    # a wrapper-named tensor of another shape is no copy of the head: refused as unexpected, with PEFT's name for it
    key = "base_model.model.lm_head.original_module.weight"
    _edit_weights(tmp_path, lambda t: t.update({key: torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=rf"unexpected keys '{re.escape(key)}' \(PEFT's wrapper name of a "
                                         rf"modules_to_save module: read for a module the config selects, under that "
                                         rf"module's own keys and shapes only\)"):
        lk.load_peft_adapter(base(), tmp_path, backend=BACKEND)


def test_save_embedding_layers_writes_a_resized_vocabulary_as_peft_does(tmp_path):
    """New tokens (resize_token_embeddings, their rows trained or initialised at the resize) live in the embedding
    layers, which the LoRA factors do not hold: save_embedding_layers=True writes them under their own keys, as PEFT's
    option does, and they load over a resized base model's; the default ("auto": none that a loaded file did not
    hold) and False write none; anything else is refused by name before a file is written."""
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_llama_config

    def base():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=100, tie_word_embeddings=False)).eval()
        model.resize_token_embeddings(104)
        return model

    model = lk.inject_lora(base(), ["q_proj", "v_proj"], r=4, init_lora_weights=False, backend=BACKEND)
    with torch.no_grad():  # the new tokens' rows, as trained
        model.model.embed_tokens.weight[100:] += 1.0
        model.lm_head.weight[100:] -= 1.0
    embedding_keys = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    for option in ("auto", False):
        lk.save_peft_adapter(model, tmp_path / str(option), save_embedding_layers=option)
        assert not embedding_keys & set(load_file(tmp_path / str(option) / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"save_embedding_layers expected True, False or 'auto', got 'yes'"):
        lk.save_peft_adapter(model, tmp_path / "bad", save_embedding_layers="yes")
    assert not (tmp_path / "bad").exists()
    lk.save_peft_adapter(model, tmp_path / "with", save_embedding_layers=True)
    assert embedding_keys <= set(load_file(tmp_path / "with" / "adapter_model.safetensors"))
    ids = torch.tensor([[1, 5, 101, 102]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = lk.load_peft_adapter(base(), tmp_path / "with", backend=BACKEND)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        without = lk.load_peft_adapter(base(), tmp_path / "auto", backend=BACKEND)
        assert not torch.equal(without(input_ids=ids).logits, expected)  # the new tokens' rows are the resize's


def test_a_lora_layer_whose_name_ends_another_modules_saves_with_a_regex_target(tmp_path):
    """LoRA on "attn.q" only, where "vision.attn.q" (no LoRA) ends with that name: neither ["q"] nor ["attn.q"]
    selects it alone under PEFT's list rule, so save raised "cannot express"; PEFT writes a regex for such an
    adapter, which selects exactly the layer, for our loader and PEFT's."""
    def build():
        torch.manual_seed(0)
        model = nn.Module()
        model.attn, model.vision = nn.Module(), nn.Module()
        model.attn.q, model.vision.attn = nn.Linear(8, 8), nn.Module()
        model.vision.attn.q = nn.Linear(8, 8)
        return model

    model = lk.inject_lora(build(), r"attn\.q", r=2, init_lora_weights=False, backend=BACKEND)
    lk.save_peft_adapter(model, tmp_path)
    x = torch.randn(3, 8)
    loaded = lk.load_peft_adapter(build(), tmp_path, backend=BACKEND)
    assert [n for n, m in loaded.named_modules() if isinstance(m, LoRALinear)] == ["attn.q"]
    torch.testing.assert_close(loaded.attn.q(x), model.attn.q(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(), tmp_path)
    assert [n for n, m in back.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)] == [
        "base_model.model.attn.q"]
    torch.testing.assert_close(back.base_model.model.attn.q(x), model.attn.q(x))


# ---------------------------------------------------------------------------------------- several named adapters

def test_batch_with_no_active_adapter_skips_the_lora_ops(tmp_path, monkeypatch):
    """set_batch_adapters with every row "__base__" (or a name deleted since): each layer computes its base layer
    alone, known from the names on the host, without the grouped ops (a serving stack's "no LoRA" flag); while a
    slot trains, the ops run, so its gradient is a zero tensor as in a mixed batch."""
    lk.save_peft_adapter(_trained(("q_proj", "v_proj"), r=4, lora_alpha=8), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(3, 2, 16)
    with lk.set_batch_adapters(model, ["a", "__base__", "a"]):
        mixed = model(x)
    calls = []
    monkeypatch.setattr(modules, "multi_lora_linear_float32_factors", lambda *args, **kwargs: calls.append(1))
    expected = _base()(x)
    for names in ("__base__", ["__base__"] * 3):
        with lk.set_batch_adapters(model, names):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with lk.set_batch_adapters(model, ["a", "__base__", "a"]):
        lk.delete_adapter(model, "a")  # deleted since: the base model for every row
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert calls == []
    monkeypatch.undo()
    assert not torch.equal(mixed[0], expected[0]) and torch.equal(mixed[1], expected[1])
    layer = model.layers[0].q_proj
    layer.lora_a.requires_grad_(True)
    with lk.set_batch_adapters(model, "__base__"):
        model(x).sum().backward()
    assert layer.lora_a.grad is not None and torch.count_nonzero(layer.lora_a.grad) == 0
    layer.lora_a.requires_grad_(False)  # lora_B alone trained: its gradient too
    layer.lora_b.requires_grad_(True)
    with lk.set_batch_adapters(model, "__base__"):
        model(x).sum().backward()
    assert layer.lora_b.grad is not None and torch.count_nonzero(layer.lora_b.grad) == 0
    monkeypatch.setattr(modules, "multi_lora_linear_float32_factors", lambda *args, **kwargs: calls.append(1))
    with torch.no_grad(), lk.set_batch_adapters(model, "__base__"):  # evaluation while a slot trains: the shortcut
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert calls == []


@pytest.mark.parametrize("case", ["autocast", "reference"])
def test_batch_with_no_active_adapter_matches_base_rows_under_autocast_and_on_the_reference_backend(case):
    """As below, for an fp32 layer under torch.autocast (bf16; the cpu backend's fp32 GEMM past 16 rows runs on the
    autocast-cast inputs) and an fp32 layer on the reference backend (the base GEMM in float64, rounded once): the
    shortcut's row is the grouped path's "__base__" row, bit for bit."""
    backend = "cpu" if case == "autocast" else "reference"
    if backend not in lk.available_backends("cpu"):
        pytest.skip(f"needs the {backend} backend")
    torch.manual_seed(0)
    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(1024, 64)), ["0"], max_adapters=2, max_rank=4,
                                     backend=backend)
    model[0].set_adapter(0, torch.randn(4, 1024), torch.randn(64, 4), 0.5)
    model.lora_adapter_slots["a"] = 0
    x = torch.randn(3, 24, 1024)  # 72 rows: past CPU_DECODE_MAX_M
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with torch.no_grad(), autocast:
        with lk.set_batch_adapters(model, ["a", "__base__", "a"]):
            mixed = model(x)
        with lk.set_batch_adapters(model, "__base__"):
            base_only = model(x)
    assert base_only.dtype == mixed.dtype == (torch.bfloat16 if case == "autocast" else torch.float32)
    assert torch.equal(base_only[1], mixed[1])


def test_batch_with_no_active_adapter_refuses_what_the_triton_grouped_path_refuses():
    """The no-adapter shortcut checks the triton backend's dtypes as the grouped path does: float64 is a TypeError
    naming the backends that run it, with or without an adapter row."""
    if "triton" not in lk.available_backends("cpu"):
        pytest.skip("needs the triton backend (TRITON_INTERPRET=1 on CPU)")
    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(8, 4)).double(), ["0"], max_adapters=2, max_rank=2,
                                     backend="triton")
    model.lora_adapter_slots["a"] = 0
    for names in (["a", "__base__"], "__base__"):
        with lk.set_batch_adapters(model, names), pytest.raises(
                TypeError, match=r"multi_lora_linear: the triton backend runs float32/float16/bfloat16, got "
                                 r"torch.float64"):
            model(torch.randn(2, 8, dtype=torch.float64))


def test_batch_with_no_active_adapter_computes_what_the_grouped_path_gives_base_rows():
    """The base-only shortcut of test_batch_with_no_active_adapter_skips_the_lora_ops computes a row as the grouped
    path computes a "__base__" row of a mixed batch, also where that path's base GEMM is not a plain F.linear (the
    cpu backend's fp32 GEMM past 16 rows of a bf16 layer: a bf16 F.linear there was 4-6x slower than the grouped
    path with an adapter at K = N = 1024 on this project's CPU, and rounded differently), and refuses bad input with
    the grouped path's errors, which name the argument (F.linear raised a RuntimeError of its own)."""
    if "cpu" not in lk.available_backends("cpu"):
        pytest.skip("needs the C++ extension's cpu backend")
    torch.manual_seed(0)
    model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(1024, 64)).to(torch.bfloat16), ["0"], max_adapters=2,
                                     max_rank=4, backend="cpu")
    layer = model[0]
    layer.set_adapter(0, torch.randn(4, 1024), torch.randn(64, 4), 0.5)
    model.lora_adapter_slots["a"] = 0
    x = torch.randn(3, 24, 1024, dtype=torch.bfloat16)  # 72 rows: past CPU_DECODE_MAX_M
    with torch.no_grad():
        with lk.set_batch_adapters(model, ["a", "__base__", "a"]):
            mixed = model(x)
        with lk.set_batch_adapters(model, "__base__"):
            assert torch.equal(model(x)[1], mixed[1])
            with pytest.raises(ValueError, match=r"multi_lora_linear: x expected shape \[\.\.\., 1024\] \(K of weight "
                                                 r"\(64, 1024\)"):
                model(torch.randn(3, 1023, dtype=torch.bfloat16))
            with pytest.raises(TypeError, match=r"multi_lora_linear: weight expected dtype torch.float32 \(same as "
                                                r"x\), got torch.bfloat16"):
                model(torch.randn(3, 1024))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_a_fake_or_functionalized_forward_leaves_no_batch_for_the_next_forward(backend):
    """A forward under FakeTensorMode (a memory estimator's, outside torch.compile) or torch.func.functionalize inside
    set_batch_adapters caches no LoRABatch of its fake or wrapped tensors: the next eager forward of the same shape
    took it from the cache, and the cpu backend then added no LoRA term (the base output, silently), the others
    raised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conftest import assert_close, backend_or_skip
    from lora_kernels import reference
    backend_or_skip(backend, "cpu")

    def fake_forward(model, x):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model(mode.from_tensor(x))

    for first_forward in (fake_forward, lambda model, x: torch.func.functionalize(model)(x)):
        torch.manual_seed(0)
        model = lk.prepare_multi_adapter(nn.Sequential(nn.Linear(8, 6)), ["0"], max_adapters=2, max_rank=4,
                                         backend=backend)
        model[0].set_adapter(0, torch.randn(4, 8), torch.randn(6, 4), 1.0)
        model.lora_adapter_slots["a"] = 0  # what load_peft_adapter(..., adapter_name="a") records
        x = torch.randn(2, 3, 8)
        with torch.no_grad(), lk.set_batch_adapters(model, ["a", "__base__"]):
            first_forward(model, x)
            y = model(x)
        layer = model[0]
        expected = reference.multi_lora_linear(x, layer.base_layer.weight, layer.lora_a, layer.lora_b,
                                               torch.tensor([[0] * 3, [-1] * 3]), layer.scalings,
                                               layer.base_layer.bias, layer.ranks)
        assert_close(y, expected, torch.float32)


def test_named_adapters_in_slots_and_mixed_batch(tmp_path):
    lk.save_peft_adapter(_trained(("q_proj", "v_proj"), r=4, lora_alpha=8), tmp_path / "a")
    lk.save_peft_adapter(_trained(("q_proj", "o_proj"), r=6, lora_alpha=3), tmp_path / "b")
    singles = {name: lk.load_peft_adapter(_base(), tmp_path / name) for name in ("a", "b")}
    singles["__base__"] = _base()

    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj", "o_proj"], max_adapters=3, max_rank=8)
    assert model.lora_adapter_slots == {}
    assert isinstance(model.layers[0].o_proj, MultiLoRALinear)
    assert not any(p.requires_grad for p in model.parameters())
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    lk.load_peft_adapter(model, tmp_path / "b", adapter_name="b")
    assert model.lora_adapter_slots == {"a": 0, "b": 1}
    assert int(model.layers[0].o_proj.ranks[0]) == 0 and int(model.layers[0].v_proj.ranks[1]) == 0

    x = torch.randn(5, 3, 16)
    names = ["b", "__base__", "a", "a", "b"]
    with lk.set_batch_adapters(model, names):
        mixed = model(x)
        states = {id(m.batch_adapters) for m in model.modules() if isinstance(m, MultiLoRALinear)}
        assert len(states) == 1 and len(model.layers[0].q_proj.batch_adapters._cache) == 1  # one LoRABatch shared
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name](x[row]), rtol=1e-5, atol=1e-5)
    with lk.set_batch_adapters(model, "a"):  # one name for every row
        torch.testing.assert_close(model(x), singles["a"](x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="set_batch_adapters"):
        model(x)  # restored on exit: no per-row adapters set
    with pytest.raises(ValueError, match=r"unknown adapter name 'c'; loaded: \['a', 'b'\]"):
        lk.set_batch_adapters(model, ["a", "c"])
    with lk.set_batch_adapters(model, ["a", "b"]), pytest.raises(ValueError, match="got 2 adapter names"):
        model(x)

    # reloading a name reuses its slot; a full table is refused untouched; a slot saves as a PEFT adapter
    lk.load_peft_adapter(model, tmp_path / "b", adapter_name="a")
    assert model.lora_adapter_slots == {"a": 0, "b": 1}
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="c")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="all 3 adapter slots are taken"):
        lk.load_peft_adapter(model, tmp_path / "a", adapter_name="d")
    _assert_same(model, before)
    assert model.lora_adapter_slots == {"a": 0, "b": 1, "c": 2}
    lk.save_peft_adapter(model, tmp_path / "b_again", adapter_name="b")
    resaved = lk.load_peft_adapter(_base(), tmp_path / "b_again")
    torch.testing.assert_close(resaved(x), singles["b"](x), rtol=1e-6, atol=1e-6)

    # unloading frees the slot for the next load; the other adapters are untouched
    with pytest.raises(ValueError, match=r"unknown adapter name 'zz'; loaded: \['a', 'b', 'c'\]"):
        lk.delete_adapter(model, "zz")
    assert lk.delete_adapter(model, "b") is model
    assert model.lora_adapter_slots == {"a": 0, "c": 2}
    assert all(int(m.ranks[1]) == 0 and not m.lora_b[1].any()
               for m in model.modules() if isinstance(m, MultiLoRALinear))
    lk.load_peft_adapter(model, tmp_path / "b", adapter_name="d")
    assert model.lora_adapter_slots == {"a": 0, "c": 2, "d": 1}
    with lk.set_batch_adapters(model, ["d", "a", "__base__", "c", "d"]):
        mixed = model(x)
    for row, name in enumerate(["b", "a", "__base__", "a", "b"]):
        torch.testing.assert_close(mixed[row], singles[name](x[row]), rtol=1e-5, atol=1e-5)


def test_a_named_load_failing_after_some_layers_restores_their_slots(tmp_path, monkeypatch):
    """Reloading adapter "a" from another file, with the second layer's slot write failing: the first layer's slot,
    already rewritten, gets adapter "a" back (factors, scaling and rank), so no layer mixes two adapters."""
    lk.save_peft_adapter(_trained(("q_proj", "v_proj"), r=4, lora_alpha=8), tmp_path / "a")
    other = _trained(("q_proj", "v_proj"), r=2, lora_alpha=3)
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if ".lora_" in name:
                parameter.normal_()
    lk.save_peft_adapter(other, tmp_path / "other")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    before = _snapshot(model)
    original, calls = MultiLoRALinear.set_adapter, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure mid-load")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiLoRALinear, "set_adapter", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_peft_adapter(model, tmp_path / "other", adapter_name="a")
    assert len(calls) == 2  # the first layer's slot was rewritten before the failure
    _assert_same(model, before)
    assert model.lora_adapter_slots == {"a": 0}


def test_prepare_multi_adapter_failing_mid_way_leaves_the_model_untouched(monkeypatch):
    """A MultiLoRALinear that fails to build (e.g. out of memory for its slots) after others were built: every base
    layer keeps its requires_grad flag (the layers freeze their base, which used to happen outside the rollback)."""
    model = _base()
    before = _snapshot(model)
    built = []
    original = MultiLoRALinear.__init__

    def flaky(self, *args, **kwargs):
        built.append(1)
        if len(built) == 3:
            raise RuntimeError("simulated allocation failure")
        original(self, *args, **kwargs)

    monkeypatch.setattr(MultiLoRALinear, "__init__", flaky)
    with pytest.raises(RuntimeError, match="simulated allocation failure"):
        lk.prepare_multi_adapter(model, ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    _assert_same(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options, wrapped", [
    (dict(exclude_modules=["layers.1.v_proj"]), {"0.layers.0.q_proj", "0.layers.0.v_proj", "0.layers.1.q_proj"}),
    (dict(layers_to_transform=[1]), {"0.layers.1.q_proj", "0.layers.1.v_proj"}),  # PEFT's: a name before "layers"
])
def test_prepare_multi_adapter_selects_layers_with_peft_options(options, wrapped):
    model = lk.prepare_multi_adapter(nn.Sequential(_base()), ["q_proj", "v_proj"], max_adapters=2, max_rank=8,
                                     **options)
    assert {n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)} == wrapped


def test_named_adapter_errors(tmp_path):
    lk.save_peft_adapter(_trained(("q_proj", "v_proj"), r=4), tmp_path / "a")
    with pytest.raises(ValueError, match="prepare_multi_adapter"):
        lk.load_peft_adapter(_base(), tmp_path / "a", adapter_name="a")
    small = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=2)
    before = _snapshot(small)
    with pytest.raises(ValueError, match="holds ranks up to 2, the adapter has r=4"):
        lk.load_peft_adapter(small, tmp_path / "a", adapter_name="a")
    _assert_same(small, before)
    partial = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="call prepare_multi_adapter with target_modules covering it"):
        lk.load_peft_adapter(partial, tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match="pass adapter_name"):
        lk.load_peft_adapter(lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], 2, 8), tmp_path / "a")
    by_hand = _base()  # MultiLoRALinear layers put in by hand: no table of adapter names
    for block in by_hand.layers:
        block.q_proj, block.v_proj = MultiLoRALinear(block.q_proj, 2, 8), MultiLoRALinear(block.v_proj, 2, 8)
    with pytest.raises(ValueError, match=r"adapter_name='a' needs a model prepared with prepare_multi_adapter"):
        lk.load_peft_adapter(by_hand, tmp_path / "a", adapter_name="a")
    # slots on layers the file does not target: not mixed with LoRALinear layers on those it does
    other_layers = lk.prepare_multi_adapter(_base(), ["o_proj"], 2, 8)
    before = _snapshot(other_layers)
    with pytest.raises(ValueError, match=r"the model has LoRA layers the adapter does not target "
                                         r"\(\['layers\.0\.o_proj'"):
        lk.load_peft_adapter(other_layers, tmp_path / "a")
    _assert_same(other_layers, before)
    with pytest.raises(ValueError, match="prepared already"):
        lk.prepare_multi_adapter(partial, ["q_proj"], 2, 8)
    # into a model with LoRALinear layers: the error sent the user to prepare_multi_adapter, which refuses them
    injected = lk.inject_lora(_base(), ["q_proj", "v_proj"], r=4, backend=BACKEND)
    with pytest.raises(ValueError, match=r"is a LoRALinear; prepare_multi_adapter refuses LoRALinear layers: "
                                         r"prepare a fresh base model"):
        lk.load_peft_adapter(injected, tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lk.prepare_multi_adapter(injected, ["q_proj", "v_proj"], 2, 8)
    # bad names and models for the name-based calls: ValueError / TypeError naming what is wrong, nothing set
    lk.load_peft_adapter(partial, _q_only(tmp_path), adapter_name="a")
    bare = nn.Sequential(MultiLoRALinear(nn.Linear(16, 16), max_adapters=2, max_rank=8))  # no name table
    for call, error, message in [
        (lambda: lk.delete_adapter(_base(), "a"), ValueError,
         r"delete_adapter: the model has no named adapters \(prepare_multi_adapter first\)"),
        (lambda: lk.delete_adapter(partial, ["a"]), ValueError, r"unknown adapter name \['a'\]; loaded: \['a'\]"),
        (lambda: lk.set_batch_adapters(_base(), "a"), ValueError, r"the model has no MultiLoRALinear layers"),
        (lambda: lk.set_batch_adapters(bare, "__base__"), ValueError, r"the model has no named adapters; call "
                                                                       r"prepare_multi_adapter"),
        (lambda: lk.set_batch_adapters(partial, []), TypeError, r"adapter_names expected a non-empty list of str, "
                                                                r"a str or None, got \[\]"),
        (lambda: lk.set_batch_adapters(partial, ["a", None]), TypeError, r"got \['a', None\]"),
        (lambda: lk.set_batch_adapters(partial, {"a"}), TypeError, r"got \{'a'\}"),  # a set has no row order
    ]:
        with pytest.raises(error, match=message):
            call()
    assert partial.lora_adapter_slots == {"a": 0}
    assert all(m.batch_adapters is None for m in partial.modules() if isinstance(m, MultiLoRALinear))


def _q_only(path):
    lk.save_peft_adapter(_trained(("q_proj",), r=4), path / "q")
    return path / "q"


def test_a_file_with_dropout_loads_into_slots_with_a_warning_that_slots_apply_none(tmp_path):
    lk.save_peft_adapter(_trained(lora_dropout=0.1), tmp_path)
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    with pytest.warns(UserWarning, match=r"load_peft_adapter: lora_dropout=0\.1 is not applied by MultiLoRALinear "
                                         r"slots"):
        lk.load_peft_adapter(model, tmp_path, adapter_name="a")


def test_a_slot_saves_the_config_it_was_loaded_from(tmp_path):
    """MultiLoRALinear keeps scalings, not alphas: a slot's alpha is scaling * r, an int again where it was one
    (10 / 3 * 3 is not 10 in float32), the others as given; layers the adapter does not target (rank 0 in its
    slot) are not in the file. Another adapter in the next slot, of a larger rank and on
    another layer too, changes none of it: each layer's rank is the slot's own, not the layer's largest."""
    trained = _trained(r=3, lora_alpha=10, rank_pattern={"v_proj": 6}, alpha_pattern={"v_proj": 7.05})
    lk.save_peft_adapter(trained, tmp_path / "a")
    lk.save_peft_adapter(_trained(targets=("q_proj", "v_proj", "o_proj"), r=8), tmp_path / "b")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(model, tmp_path / "b", adapter_name="b")
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    lk.save_peft_adapter(model, tmp_path / "slot", adapter_name="a")
    config = json.loads((tmp_path / "slot" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 10 and isinstance(config["lora_alpha"], int)
    assert config["rank_pattern"] == {"v_proj": 6} and config["alpha_pattern"] == {"v_proj": pytest.approx(7.05)}
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert set(load_file(tmp_path / "slot" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "a" / "adapter_model.safetensors"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(lk.load_peft_adapter(_base(), tmp_path / "slot")(x), trained(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora_alpha", [4e-7, -3e-9, 7.05, 16.000008])
def test_a_slot_saves_a_small_or_fractional_alpha_as_it_was_given(tmp_path, lora_alpha):
    """The alpha rebuilt from the slot's scaling was snapped to the nearest int within 1e-6 absolute: every |alpha|
    <= 1e-6 was saved as 0, an adapter that changes nothing (helper 301). It is rebuilt from the scaling as given
    (7.05 had been 7.0500001907 from the float32 scaling; 16.000008 had been 16), snapped to an int only within
    float64's rounding."""
    trained = _trained(r=2, lora_alpha=lora_alpha)
    lk.save_peft_adapter(trained, tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    lk.save_peft_adapter(model, tmp_path / "slot", adapter_name="a")
    saved = json.loads((tmp_path / "slot" / "adapter_config.json").read_text())["lora_alpha"]
    assert saved == pytest.approx(lora_alpha, rel=1e-15, abs=0)
    x = torch.randn(3, 16)
    reloaded = lk.load_peft_adapter(_base(), tmp_path / "slot")
    assert [s for *_, s, _, _ in _lora_attributes(reloaded)] == pytest.approx(
        [s for *_, s, _, _ in _lora_attributes(trained)], rel=1e-15, abs=0)
    torch.testing.assert_close(reloaded(x), trained(x))


def test_a_slot_whose_scaling_was_set_since_saves_the_int_alpha_its_float32_scaling_holds(tmp_path):
    """A slot's scaling written since the load (here directly; a state dict loads it so) is no longer the one given:
    alpha comes from its float32 value, snapped to the int within float32's rounding (16 / 3 · 3 = 16.0000005)."""
    lk.save_peft_adapter(_trained(r=3, lora_alpha=10), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    slot = model.lora_adapter_slots["a"]
    for layer in (m for m in model.modules() if isinstance(m, MultiLoRALinear)):
        layer.scalings[slot] = 16 / 3
    assert float(torch.tensor(16 / 3)) * 3 != 16
    lk.save_peft_adapter(model, tmp_path / "slot", adapter_name="a")
    alpha = json.loads((tmp_path / "slot" / "adapter_config.json").read_text())["lora_alpha"]
    assert alpha == 16 and isinstance(alpha, int)


def test_a_name_that_cannot_name_a_slot_is_refused_before_any_file_is_read(tmp_path):
    """adapter_name "" or "__base__" (the base rows of a mixed batch), or not a str: load_peft_adapter refused it only
    after reading (or downloading) the files, so a missing path gave FileNotFoundError and a model not prepared a
    hint to prepare it; save_peft_adapter raised "unhashable type: 'list'", naming no argument."""
    prepared = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    for name, error in (("", ValueError), ("__base__", ValueError), (5, TypeError), (["a"], TypeError)):
        message = rf"adapter_name expected None or a non-empty str other than '__base__', got {re.escape(repr(name))}"
        for model in (_base(), prepared):
            with pytest.raises(error, match=rf"^load_peft_adapter: {message}$"):
                lk.load_peft_adapter(model, tmp_path / "missing", adapter_name=name)
        with pytest.raises(error, match=rf"^save_peft_adapter: {message}$"):
            lk.save_peft_adapter(prepared, tmp_path / "out", adapter_name=name)
    assert prepared.lora_adapter_slots == {} and not os.path.exists(tmp_path / "out")
    # a name that is no slot's, or any name for a model without slots
    for model in (prepared, _trained()):
        with pytest.raises(ValueError, match=r"^save_peft_adapter: unknown adapter_name 'zz'; loaded: \[\]$"):
            lk.save_peft_adapter(model, tmp_path / "out", adapter_name="zz")


def test_loading_into_an_eval_model_keeps_it_in_eval_mode(tmp_path):
    """load_peft_adapter / prepare_multi_adapter into a model in eval mode (as from_pretrained returns it): the new
    layers are in eval mode too, so an adapter saved with dropout runs none at inference. They had started in train
    mode: every forward of the loaded model drew a new dropout mask."""
    lk.save_peft_adapter(_trained(lora_dropout=0.5), tmp_path / "a")
    model = lk.load_peft_adapter(_base().eval(), tmp_path / "a")
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 16)
    assert torch.equal(model(x), model(x))
    multi = lk.prepare_multi_adapter(_base().eval(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    assert not any(m.training for m in multi.modules())


def test_16_bit_model_loads_float32_factors_exactly(tmp_path):
    """A bfloat16 base model gets float32 factors, equal to the file's (PEFT's autocast_adapter_dtype); with
    autocast_adapter_dtype=False they are rounded to bfloat16."""
    lk.save_peft_adapter(_trained(), tmp_path / "a")
    saved = load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
    key = "base_model.model.layers.0.q_proj.lora_A.weight"
    assert saved[key].dtype == torch.float32
    model = lk.load_peft_adapter(_base().to(torch.bfloat16), tmp_path / "a")
    factor = model.layers[0].q_proj.lora_A.weight
    assert factor.dtype == torch.float32 and torch.equal(factor, saved[key])
    assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    rounded = lk.load_peft_adapter(_base().to(torch.bfloat16), tmp_path / "a", autocast_adapter_dtype=False)
    assert torch.equal(rounded.layers[0].q_proj.lora_A.weight, saved[key].to(torch.bfloat16))


def test_factors_past_the_16_bit_range_are_refused_with_the_model_unchanged(tmp_path):
    """A float32 factor too large for the layer's fp16 factors (autocast_adapter_dtype=False) or fp16 slots became
    inf without a word (PEFT's load too), and the layer's output inf or NaN; refused by module, nothing loaded."""
    trained = _trained()
    with torch.no_grad():
        trained.layers[1].v_proj.lora_B.weight[2, 1] = 7e4  # the second layer: the first is loaded before it
    lk.save_peft_adapter(trained, tmp_path / "a")
    message = r"module 'layers.1.v_proj': lora_B holds finite values past the range of torch.float16 .*70000"
    lk.load_peft_adapter(_base().half(), tmp_path / "a")  # float32 factors (PEFT's autocast_adapter_dtype) take it
    model = lk.inject_lora(_base(), ["q_proj", "v_proj"], r=8, backend=BACKEND).half()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message + r".*convert the layer's factors to float32 first"):
        lk.load_peft_adapter(model, tmp_path / "a", autocast_adapter_dtype=False)
    _assert_same(model, before)
    base = _base().half()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message + r".*load with autocast_adapter_dtype=True"):
        lk.load_peft_adapter(base, tmp_path / "a", autocast_adapter_dtype=False)
    _assert_same(base, before)
    multi = lk.prepare_multi_adapter(_base().half(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    lk.save_peft_adapter(_trained(r=2), tmp_path / "small")
    lk.load_peft_adapter(multi, tmp_path / "small", adapter_name="small")
    before = _snapshot(multi)
    slots = dict(multi.lora_adapter_slots)
    with pytest.raises(ValueError, match=message + r".*adapter_dtype=torch.float32"):
        lk.load_peft_adapter(multi, tmp_path / "a", adapter_name="big")
    _assert_same(multi, before)
    assert multi.lora_adapter_slots == slots


@pytest.mark.parametrize("whole", ["modules_to_save head", "bias", "base layer"])
def test_whole_tensors_past_the_16_bit_range_are_refused_with_the_model_unchanged(tmp_path, whole):
    """A float32 file's head (modules_to_save), trained bias (bias="all") or target's base layer (saved whole, as
    PEFT saves a tied lm_head's) too large for an fp16 model became inf there without a word, where the factors'
    overflow was refused; refused by key now, as theirs is, nothing loaded."""
    targets, kwargs, key = {"modules_to_save head": (("q_proj",), dict(modules_to_save=["head"]), "head.weight"),
                            "bias": (("q_proj",), dict(bias="all"), "layers.1.q_proj.base_layer.bias"),
                            "base layer": (("q_proj", "head"), {}, "head.base_layer.weight")}[whole]
    lk.save_peft_adapter(_trained(targets, **kwargs), tmp_path / "a")
    file_key = "base_model.model." + key
    big = torch.full_like(_base().head.weight if whole == "base layer" else load_file(
        os.path.join(tmp_path / "a", "adapter_model.safetensors"))[file_key], 7e4)
    _edit_weights(tmp_path / "a", lambda tensors: tensors.update({file_key: big}))
    lk.load_peft_adapter(_base(), tmp_path / "a")  # float32 takes it
    model = _base().half()
    before = _snapshot(model)
    shown = key.replace(".base_layer.bias", ".bias") if whole == "bias" else key.replace(".base_layer", "")
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(shown)}' holds finite values past the range of "
                                         r"torch.float16 .*70000.*convert the model to float32 or bfloat16 first"):
        lk.load_peft_adapter(model, tmp_path / "a")
    _assert_same(model, before)
    # a float64 file's 1e39 into the float32 model: no advice to convert to float32
    _edit_weights(tmp_path / "a", lambda tensors: tensors.update({file_key: big.double().fill_(1e39)}))
    model = _base()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(shown)}' holds finite values past the range of "
                                         r"torch.float32 .*convert the model to a wider dtype first"):
        lk.load_peft_adapter(model, tmp_path / "a")
    _assert_same(model, before)


def test_by_name_load_takes_a_base_layer_saved_rounded_to_16_bits(tmp_path):
    """A file saved from the bf16 model holds the base layer PEFT saves whole (an lm_head target) in bf16: the
    float32 model's weights rounded. Loading it by name into the float32 model was refused as differing from the
    model's; the comparison is now in the narrower dtype, and a real difference is still refused, saying so."""
    key = "base_model.model.head.base_layer.weight"
    lk.save_peft_adapter(_trained(("q_proj", "head")), tmp_path / "a")
    _edit_weights(tmp_path / "a", lambda t: t.update({key: _base().head.weight.detach().to(torch.bfloat16)}))
    multi = lk.prepare_multi_adapter(_base(), ["q_proj", "head"], max_adapters=2, max_rank=8)
    lk.load_peft_adapter(multi, tmp_path / "a", adapter_name="a")
    assert torch.equal(multi.head.base_layer.weight, _base().head.weight)  # shared by every slot: the model's own
    assert multi.lora_adapter_slots == {"a": 0}
    _edit_weights(tmp_path / "a", lambda t: t.update({key: (t[key].float() * 1.01).to(torch.bfloat16)}))
    before = _snapshot(multi)
    with pytest.raises(ValueError, match=rf"holds '{key}', the base layer's own weight .*, and it differs from the "
                                         rf"model's \(compared in torch.bfloat16\); MultiLoRALinear slots share"):
        lk.load_peft_adapter(multi, tmp_path / "a", adapter_name="b")
    _assert_same(multi, before)


def test_rows_of_a_deleted_adapter_get_the_base_model_even_after_its_slot_is_reused(tmp_path):
    """set_batch_adapters keeps names, looked up at each forward: after delete_adapter a row naming the deleted
    adapter computes the base model, as documented, also once another adapter took over its slot (it had then
    computed that other adapter)."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    lk.save_peft_adapter(_trained(("q_proj", "o_proj"), r=2, lora_alpha=5), tmp_path / "c")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 3, 16)
    lk.set_batch_adapters(model, ["a", "__base__"])  # not as a context manager: stays in effect
    model(x)  # a forward of these names before the table changes: its slot ids are not reused after
    lk.delete_adapter(model, "a")
    lk.load_peft_adapter(model, tmp_path / "c", adapter_name="c")
    assert model.lora_adapter_slots == {"c": 0}
    base = _base()
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")  # back under its name: its rows use it again
    single = lk.load_peft_adapter(_base(), tmp_path / "a")
    out = model(x)
    torch.testing.assert_close(out[0], single(x[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], base(x[1]), rtol=1e-6, atol=1e-6)


def test_an_error_inside_the_adapter_contexts_propagates_and_the_setting_is_restored(tmp_path):
    """An exception inside `with set_batch_adapters(...)` or `with disable_adapter(...)` reaches the caller (the
    context does not swallow it) and the layers get their previous setting back; None unsets the names."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 16)
    with pytest.raises(KeyError, match="inside"), lk.set_batch_adapters(model, "a"):
        raise KeyError("inside")
    with pytest.raises(RuntimeError, match="set_batch_adapters"):
        model(x)  # no names in effect again
    lk.set_batch_adapters(model, "a")
    lk.set_batch_adapters(model, None)
    with pytest.raises(RuntimeError, match="set_batch_adapters"):
        model(x)

    trained = _trained()
    with_adapter = trained(x)
    with pytest.raises(KeyError, match="inside"), lk.disable_adapter(trained):
        raise KeyError("inside")
    torch.testing.assert_close(trained(x), with_adapter, rtol=0, atol=0)
    assert not torch.allclose(with_adapter, _base()(x))


def test_nested_set_batch_adapters_restore_the_outer_names(tmp_path):
    """Leaving an inner set_batch_adapters context (a reference pass on the base model, say) puts back the names of
    the outer one, not 'no names'."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 3, 16)
    base, single = _base(), lk.load_peft_adapter(_base(), tmp_path / "a")
    with lk.set_batch_adapters(model, ["a", "__base__"]):
        with lk.set_batch_adapters(model, "__base__"):
            torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
        out = model(x)  # the outer names again
        torch.testing.assert_close(out[0], single(x[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], base(x[1]), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="set_batch_adapters"):
        model(x)


def test_set_batch_adapters_contexts_that_exit_out_of_order_leave_the_open_ones_in_effect(tmp_path):
    """Two requests' contexts that exit in the order they were entered (asyncio tasks, threads: A enters, B enters,
    A exits, B exits): each had put back the names it saw on entry, so B ran under no names once A left and, after
    both, A's names stayed in effect (a forward without names ran adapter "a" instead of refusing). The newest open
    context's names are in effect, and after all of them the setting from before; a call made without `with` stays
    in effect until the next."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 16)
    base, single = _base()(x), lk.load_peft_adapter(_base(), tmp_path / "a")(x)
    first, second = lk.set_batch_adapters(model, "a"), lk.set_batch_adapters(model, "__base__")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)  # the second still open
    second.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="set_batch_adapters"):
        model(x)  # no names in effect again
    lk.set_batch_adapters(model, "a")  # without `with`: in effect under and after the contexts
    for _ in range(3):  # each replaces the one before (the settings kept do not grow)
        lk.set_batch_adapters(model, "a")
    outer = lk.set_batch_adapters(model, "__base__")
    outer.__enter__()
    with lk.set_batch_adapters(model, "a"):
        torch.testing.assert_close(model(x), single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)
    outer.__exit__(None, None, None)
    torch.testing.assert_close(model(x), single, rtol=1e-5, atol=1e-5)
    assert len(modules._BATCH_SETTINGS[model.layers[0].q_proj]) == 1


def test_a_prepared_models_state_dict_holds_the_slots_but_not_the_name_table(tmp_path):
    """README: the state_dict of a prepared model holds the slots (<path>.lora_a, lora_b, scalings, ranks) and the base
    weights under <path>.base_layer., not model.lora_adapter_slots: a fresh prepared model takes it strictly and
    computes the same slots, but knows no adapter names."""
    lk.save_peft_adapter(_trained(["q_proj"], r=4), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    state = model.state_dict()
    for i in (0, 1):
        path = f"layers.{i}.q_proj"
        assert {k for k in state if k.startswith(path + ".")} == {
            f"{path}.{name}" for name in ("lora_a", "lora_b", "scalings", "ranks", "base_layer.weight",
                                          "base_layer.bias")}
    assert not any("slot" in key for key in state)
    fresh = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=4)
    fresh.load_state_dict(state)
    assert fresh.lora_adapter_slots == {} and model.lora_adapter_slots == {"a": 0}
    x, ids = torch.randn(3, 16), torch.tensor([0, -1, 0])
    torch.testing.assert_close(fresh.layers[0].q_proj(x, ids), model.layers[0].q_proj(x, ids), rtol=0, atol=0)


def test_new_adapter_names_run_the_compiled_graph_with_their_ids(tmp_path):
    """README: set_batch_adapters' slot ids reach a torch.compile graph as a tensor, not as constants: a new list of
    as many names runs the same graph and computes its own names (HF generate cannot pass adapter ids, and a graph
    per list hit dynamo's recompile limit after a few mixes); another number of names and a list with no adapter
    (the base-only shortcut) compile one more each; a delete or load by name reaches the compiled graph."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    lk.save_peft_adapter(_trained(("q_proj", "o_proj"), r=2, lora_alpha=5), tmp_path / "b")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=4)
    for name in ("a", "b"):
        lk.load_peft_adapter(model, tmp_path / name, adapter_name=name)
    base, single = _base(), {name: lk.load_peft_adapter(_base(), tmp_path / name) for name in ("a", "b")}
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    x = torch.randn(2, 16)
    for names, count in ((["a", "__base__"], 1), (["__base__", "b"], 1), (["b", "a"], 1), ("a", 2),
                         (["__base__", "__base__"], 3), (["a", "b"], 3)):
        with lk.set_batch_adapters(model, names):
            out = compiled(x)
        for row, name in enumerate([names] * 2 if isinstance(names, str) else names):
            torch.testing.assert_close(out[row], single.get(name, base)(x[row]), rtol=1e-5, atol=1e-5)
        assert len(graphs) == count, names
    with lk.set_batch_adapters(model, ["a", "b"]):
        lk.delete_adapter(model, "a")
        torch.testing.assert_close(compiled(x)[0], base(x[0]), rtol=1e-6, atol=1e-6)
        lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
        torch.testing.assert_close(compiled(x)[0], single["a"](x[0]), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 3


def test_outer_names_are_looked_up_again_when_an_inner_context_ends(tmp_path):
    """An adapter deleted while an inner set_batch_adapters context is in effect, and its slot taken by another: the
    outer names put back on leaving count it as the base model, not as the adapter now in its slot."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    lk.save_peft_adapter(_trained(("q_proj", "o_proj"), r=2, lora_alpha=5), tmp_path / "c")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    x = torch.randn(2, 3, 16)
    with lk.set_batch_adapters(model, ["a", "__base__"]):
        with lk.set_batch_adapters(model, "__base__"):
            lk.delete_adapter(model, "a")
            lk.load_peft_adapter(model, tmp_path / "c", adapter_name="c")
        assert model.lora_adapter_slots == {"c": 0}
        torch.testing.assert_close(model(x), _base()(x), rtol=1e-6, atol=1e-6)


def test_a_batch_a_multiple_of_the_names_gives_each_name_consecutive_rows(tmp_path):
    """generate(num_beams=k) and num_return_sequences=k repeat each row k times, side by side: each name then covers
    its k rows, as PEFT expands adapter_names for beams. Other batch sizes stay an error."""
    lk.save_peft_adapter(_trained(r=4), tmp_path / "a")
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    lk.load_peft_adapter(model, tmp_path / "a", adapter_name="a")
    single, base = lk.load_peft_adapter(_base(), tmp_path / "a"), _base()
    x = torch.randn(6, 2, 16)
    with lk.set_batch_adapters(model, ["a", "__base__"]):
        out = model(x)
        with pytest.raises(ValueError, match=r"got 2 adapter names, but the layer input has shape \(5, 2\).*a "
                                             r"multiple of 2"):
            model(x[:5])
    torch.testing.assert_close(out[:3], single(x[:3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:], base(x[3:]), rtol=1e-6, atol=1e-6)
    # a 1-D input (one token, no batch dimension) takes one name for every row, not a list of names
    token = x[0, 0]
    with lk.set_batch_adapters(model, "a"):
        torch.testing.assert_close(model(token), single(token), rtol=1e-5, atol=1e-5)
    with lk.set_batch_adapters(model, ["a", "__base__"]), pytest.raises(
            ValueError, match=r"got 2 adapter names, but the layer input has shape \(\) \+ \[features\]"):
        model(token)


def test_merge_and_unload_refuses_multi_adapter_models_untouched():
    model = lk.prepare_multi_adapter(_base(), ["q_proj"], max_adapters=2, max_rank=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"merge_and_unload: the model has MultiLoRALinear layers"):
        lk.merge_and_unload(model)
    _assert_same(model, before)


def test_a_folder_of_named_adapters_gets_a_hint(tmp_path):
    """PEFT's save_pretrained(..., adapter_name="fr") writes into path/fr: the error points there."""
    lk.save_peft_adapter(_trained(), tmp_path / "fr")
    os.makedirs(tmp_path / "logs")  # not an adapter: not listed
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found; adapters saved under a name are in "
                                                r"subfolders: fr \(pass .*fr, or subfolder='fr'\)"):
        lk.load_peft_adapter(_base(), tmp_path)
    model = lk.load_peft_adapter(_base(), tmp_path, subfolder="fr", backend=BACKEND)
    assert isinstance(model.layers[0].q_proj, LoRALinear)


def test_the_path_of_an_adapter_file_gets_a_hint(tmp_path, monkeypatch):
    """The weights (or config) file given instead of its directory: the error read ".../adapter_model.safetensors/
    adapter_config.json not found"; it now says to pass the directory that holds the files. So does a relative path,
    "a/adapter_config.json", which has a Hub repo id's form and was looked up on the Hub."""
    lk.save_peft_adapter(_trained(), tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        for path in (tmp_path / "a" / name, f"a/{name}"):
            with pytest.raises(FileNotFoundError, match=rf"{name} is a file: pass the directory that holds "
                                                        rf"adapter_config.json and the weights \(.*a\)"):
                lk.load_peft_adapter(_base(), path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found$"):
        lk.load_peft_adapter(_base(), tmp_path / "missing")


# ------------------------------------------------------------------------------------------ Hugging Face Hub repo ids

def _fake_hub(monkeypatch, snapshot_dir, error=None):
    """huggingface_hub.snapshot_download replaced by a stand-in (the tests run offline) that records its calls and
    returns snapshot_dir as the downloaded repo, or raises `error`."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": sorted(allow_patterns), **kwargs})
        if error is not None:
            raise error
        return str(snapshot_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_load_from_a_hub_repo_id_downloads_only_the_adapter_files(tmp_path, monkeypatch):
    """A repo id ("namespace/name") that is not a local directory is fetched through huggingface_hub, as
    PeftModel.from_pretrained fetches it: only the config and weight files, at the revision asked, under subfolder."""
    trained = _trained()
    lk.save_peft_adapter(trained, tmp_path / "snapshot" / "sub")
    calls = _fake_hub(monkeypatch, tmp_path / "snapshot")
    monkeypatch.chdir(tmp_path)  # no local directory called someone/adapter
    loaded = lk.load_peft_adapter(_base(), "someone/adapter", revision="v1.0", subfolder="/sub/", backend=BACKEND)
    assert calls == [{"repo_id": "someone/adapter", "revision": "v1.0", "allow_patterns": [
        "sub/adapter_config.json", "sub/adapter_model.safetensors"]}]
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    # an adapter saved as adapter_model.bin only (older PEFT): fetched in a second call, as PEFT falls back to it
    state = load_file(tmp_path / "snapshot" / "sub" / "adapter_model.safetensors")
    os.remove(tmp_path / "snapshot" / "sub" / "adapter_model.safetensors")
    torch.save(state, tmp_path / "snapshot" / "sub" / "adapter_model.bin")
    loaded = lk.load_peft_adapter(_base(), "someone/adapter", revision="v2", subfolder="sub", backend=BACKEND)
    assert [(call["revision"], call["allow_patterns"]) for call in calls[1:]] == [
        ("v2", ["sub/adapter_config.json", "sub/adapter_model.safetensors"]), ("v2", ["sub/adapter_model.bin"])]
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    # a local directory wins over the Hub, also when its name reads as a repo id; subfolder applies there too
    os.makedirs(tmp_path / "someone")
    os.rename(tmp_path / "snapshot", tmp_path / "someone" / "adapter")
    loaded = lk.load_peft_adapter(_base(), "someone/adapter", subfolder="sub", backend=BACKEND)
    assert len(calls) == 3
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)


def test_load_from_a_hub_repo_id_through_the_real_huggingface_hub_offline(tmp_path):
    """The same through huggingface_hub itself, in a subprocess with HF_HUB_OFFLINE=1 and a hub cache laid out as
    huggingface_hub lays it out (refs/<revision> -> snapshots/<commit>/files): what a user with a cached adapter and
    no network gets. The subprocess's model must equal this process's."""
    pytest.importorskip("huggingface_hub")
    trained = _trained()
    repo = tmp_path / "hub" / "models--someone--adapter"
    commit = "0123456789abcdef0123456789abcdef01234567"
    lk.save_peft_adapter(trained, repo / "snapshots" / commit)
    os.makedirs(repo / "refs")
    (repo / "refs" / "v1.0").write_text(commit)
    x = torch.randn(3, 16)
    torch.save({"x": x, "y": trained(x).detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); import test_peft_io as t, lora_kernels as lk\n"
        "io = torch.load(sys.argv[1] + '/io.pt')\n"
        "model = lk.load_peft_adapter(t._base(), 'someone/adapter', revision='v1.0', backend=t.BACKEND)\n"
        "assert torch.equal(model(io['x']), io['y']), 'loaded adapter differs'\n"
        "try:\n"
        "    lk.load_peft_adapter(t._base(), 'someone/adapter')  # no refs/main in the cache, and offline\n"
        "except ValueError as exc:\n"
        "    print(exc)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), os.path.dirname(os.path.abspath(__file__))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'someone/adapter' is not a local directory, and fetching it from the Hugging Face Hub failed" in proc.stdout


def test_hub_failures_are_errors_naming_the_repo_and_leave_the_model_untouched(tmp_path, monkeypatch):
    model = _base()
    before = _snapshot(model)
    monkeypatch.chdir(tmp_path)
    calls = _fake_hub(monkeypatch, tmp_path, error=RuntimeError("404 Client Error: Repository Not Found"))
    with pytest.raises(ValueError, match=r"load_peft_adapter: 'someone/missing' is not a local directory, and fetching "
                                         r"it from the Hugging Face Hub failed: RuntimeError: 404 Client Error"):
        lk.load_peft_adapter(model, "someone/missing")
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"load_peft_adapter: revision='main' selects a version of a Hugging Face Hub "
                                         r"repo, but .* is a local path"):
        lk.load_peft_adapter(model, tmp_path, revision="main")
    for subfolder in (3, "/"):
        with pytest.raises(TypeError, match=r"load_peft_adapter: subfolder expected a non-empty str or None, got "):
            lk.load_peft_adapter(model, "someone/adapter", subfolder=subfolder)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ValueError, match=r"'someone/adapter' is not a local directory; loading it as a Hugging Face "
                                         r"Hub repo needs huggingface_hub"):
        lk.load_peft_adapter(model, "someone/adapter")
    # not a repo id (and not a directory): the missing file is named, nothing is fetched; a relative path, or an
    # os.PathLike (never a repo id), reads as one too
    for path in ("no/such/adapter", "./adapter", "../adapter", pathlib.Path("someone/adapter")):
        with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found"):
            lk.load_peft_adapter(model, path)
    assert len(calls) == 1
    _assert_same(model, before)


# ------------------------------------------------------------------ README claims, checked as written (helper79)

def test_a_saved_head_is_copied_into_the_models_head_keeping_no_original(tmp_path):
    """README: a saved modules_to_save head comes along: its weights are copied into the model's head (the same module
    and Parameters), keeping no copy of the original, where PEFT keeps the original beside it."""
    trained = _trained(modules_to_save=["head"])
    with torch.no_grad():
        trained.head.weight.add_(1.0)  # as if trained
    lk.save_peft_adapter(trained, tmp_path)
    model = _base()
    head, weight = model.head, model.head.weight
    modules_before = [name for name, module in model.named_modules() if not name.startswith("layers")]
    loaded = lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
    assert loaded.head is head and loaded.head.weight is weight and torch.equal(weight, trained.head.weight)
    assert [name for name, module in loaded.named_modules() if not name.startswith("layers")] == modules_before


def test_read_adapter_weights_reads_every_dtype_safetensors_writes(tmp_path):
    """A valid safetensors file is read whatever its dtypes: safetensors.torch.load (236b3fe) raised KeyError
    'F8_E8M0' for one, reported as "truncated or corrupt?", where load_file reads it."""
    from safetensors.torch import save_file

    from lora_kernels.peft_io import read_adapter_weights
    saved = {"scales": torch.ones(3, 4).to(torch.float8_e8m0fnu), "w": torch.randn(2, 3).bfloat16()}
    save_file(saved, str(tmp_path / "adapter_model.safetensors"))
    tensors, _ = read_adapter_weights(str(tmp_path))
    for key, tensor in saved.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key].view(torch.uint8),
                                                                  tensor.view(torch.uint8))


def test_an_adapter_without_the_heads_of_the_one_loaded_before_is_refused_untouched(tmp_path):
    """Adapter A (with a modules_to_save head) then adapter B (without one) into the same model: A's head was copied
    into the model's head in place, so B ran beside A's trained head (PEFT's load_adapter + set_adapter computes B
    with the original head) and a save dropped it; refused like LoRA layers B does not target (helper 158)."""
    with_head = _trained(modules_to_save=["head"])
    with torch.no_grad():
        with_head.head.weight.add_(1.0)
    lk.save_peft_adapter(with_head, tmp_path / "a")
    lk.save_peft_adapter(_trained(), tmp_path / "b")
    model = lk.load_peft_adapter(_base(), tmp_path / "a")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] .* which this adapter does not hold"):
        lk.load_peft_adapter(model, tmp_path / "b")
    _assert_same(model, before)
    # an adapter that holds the same head loads over it
    lk.load_peft_adapter(model, tmp_path / "a")


def test_loading_into_a_tied_target_gets_the_warning_inject_lora_gives(tmp_path):
    """A target whose weight is tied (a tied lm_head): inject_lora warns, as PEFT's from_pretrained does, that
    LoRALinear.merge() would change both; load_peft_adapter, which makes the same layers, said nothing (helper 158)."""
    lk.save_peft_adapter(_trained(["layers.0.o_proj"]), tmp_path)
    model = _base()
    model.layers[1].o_proj.weight = model.layers[0].o_proj.weight
    with pytest.warns(UserWarning, match=r"load_peft_adapter: the weight of target 'layers.0.o_proj' is tied to "
                                         r"'layers.1.o_proj.weight'; .*merge\(\) would change both"):
        lk.load_peft_adapter(model, tmp_path, backend=BACKEND)


@pytest.mark.parametrize("kind", ["head", "bias", "factors"])
def test_load_into_a_model_made_under_inference_mode_is_refused_by_name_before_any_write(kind, tmp_path):
    """A base model built under torch.inference_mode, loaded outside it with an adapter that writes the model's own
    tensors (a modules_to_save head, biases trained by bias="all"): torch refused the write only after it, the
    rollback's requires_grad_(True) then failed too, and every parameter of the model was left frozen. The factors
    of a model injected under inference mode are refused the same way, naming the layer."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.q_proj(x))

    source = Net()
    options = {"head": {"modules_to_save": ["head"]}, "bias": {"bias": "all"}, "factors": {}}[kind]
    lk.inject_lora(source, ["q_proj"], r=2, init_lora_weights=False, **options)
    lk.save_peft_adapter(source, tmp_path)
    with torch.inference_mode():
        model = Net()
        if kind == "factors":
            lk.inject_lora(model, ["q_proj"], r=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    message = "q_proj.lora_A is an inference tensor" if kind == "factors" else "is an inference tensor"
    with pytest.raises(ValueError, match=message):
        lk.load_peft_adapter(model, tmp_path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.q_proj, LoRALinear) == (kind == "factors")


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "deprecated weight_norm"])
def test_a_load_into_a_computed_factor_is_refused_by_name_with_the_model_unchanged(kind, tmp_path):
    """README: parametrizations of a factor work. A load copied the file's factor into the weight a parametrization
    computes on each access, so that factor silently kept its values while the other factor and the scaling loaded
    (helper 292; PEFT reports the parametrization's keys as missing). The deprecated weight_norm hook's weight is a
    plain attribute the forward refuses: the load refuses it first."""
    lk.save_peft_adapter(_trained(lora_alpha=6), tmp_path)
    model = _trained()
    layer = model.layers[0].q_proj
    if kind == "weight_norm":
        nn.utils.parametrizations.weight_norm(layer.lora_A)
    elif kind == "orthogonal":
        nn.utils.parametrizations.orthogonal(layer.lora_B)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its deprecation
            nn.utils.weight_norm(layer.lora_A)
    key = "lora_B" if kind == "orthogonal" else "lora_A"
    remedy = "remove_weight_norm" if kind == "deprecated weight_norm" else rf"remove_parametrizations\(layer.{key}"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = _lora_attributes(model)
    with pytest.raises(ValueError, match=rf"load_peft_adapter: module 'layers.0.q_proj': {key}.weight is computed "
                                         rf"from other parameters by .* the model is unchanged. To load, .*{remedy}"):
        lk.load_peft_adapter(model, tmp_path)
    assert _lora_attributes(model) == attributes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_loaded_task_type_peft_does_not_know_is_refused_before_any_file_is_written(tmp_path):
    """README: "a task type PEFT does not know is refused before any file is written". One read from an adapter
    file (which PEFT itself refuses to load: "Invalid task type") was written to the new file unchecked."""
    source = nn.Sequential(nn.Linear(8, 8))
    lk.inject_lora(source, ["0"], r=2)
    lk.save_peft_adapter(source, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["task_type"] = "NOT_A_TASK"
    config_path.write_text(json.dumps(config))
    model = nn.Sequential(nn.Linear(8, 8))
    lk.load_peft_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="NOT_A_TASK"):
        lk.save_peft_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    lk.save_peft_adapter(model, tmp_path / "c", task_type="CAUSAL_LM")  # replaced by name
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def _safetensors_bytes(entries, data):
    """A safetensors file by hand: entries {name: (dtype, shape, [begin, end])}, data the bytes after the header."""
    header = json.dumps({name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()})
    header = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("entries, data, what", [
    # two tensors over the same bytes (safetensors refuses overlapping entries)
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [0, 8])}, bytes(8), "overlap"),
    # a gap between two tensors
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [16, 24])}, bytes(24), "gap"),
    # bytes after the last tensor
    ({"a": ("F32", [2], [0, 8])}, bytes(16), "trailing"),
    # the last tensor runs past the file's end
    ({"a": ("F32", [4], [0, 16])}, bytes(8), "past the end"),
])
def test_safetensors_whose_offsets_do_not_tile_the_data_are_refused(tmp_path, entries, data, what):
    """A safetensors file whose entries overlap, leave gaps or do not cover the data exactly is refused as
    safetensors refuses it, never read as aliasing or partial tensors."""
    (tmp_path / "adapter_model.safetensors").write_bytes(_safetensors_bytes(entries, data))
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        peft_io.read_adapter_weights(str(tmp_path))


def test_a_slot_scaling_past_float32_is_refused_by_module_before_any_slot_is_written(tmp_path, monkeypatch):
    """lora_alpha=1e40 (finite as JSON, 1.25e39 / r past float32): refused in the checks, naming the module and the
    rule, before any set_adapter call (not by set_adapter half-way through, whose message names no module)."""
    lk.save_peft_adapter(_trained(("q_proj", "v_proj"), r=4), tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        config = json.load(f)
    config["lora_alpha"] = 1e40
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump(config, f)
    model = lk.prepare_multi_adapter(_base(), ["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    before = _snapshot(model)
    calls = []
    original = MultiLoRALinear.set_adapter

    def counted_set_adapter(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiLoRALinear, "set_adapter", counted_set_adapter)
    with pytest.raises(ValueError, match=r"^load_peft_adapter: module 'layers\.0\.q_proj': the adapter's scaling "
                                         r"2\.5e\+39 \(lora_alpha / r, lora_alpha 1e\+40, r=4\) is past the range"):
        lk.load_peft_adapter(model, tmp_path, adapter_name="a")
    assert calls == []
    _assert_same(model, before)
    assert model.lora_adapter_slots == {}


def test_rank_pattern_by_full_name_loads_into_a_checkpoint_wrapped_model(tmp_path):
    """rank_pattern keyed by full module names ("layers.1.0") is looked up under the state dict's name of each
    target, so it holds in a model whose blocks carry apply_activation_checkpointing's wrapper
    (`layers.1._checkpoint_wrapped_module.0`): looked up under the model's name it fell back to r and the factors'
    shapes were refused."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    def base():
        torch.manual_seed(0)
        return _Blocks()

    plain = lk.inject_lora(base(), [r"layers.0.0"], r=4, init_lora_weights=False, backend=BACKEND)
    plain = lk.inject_lora(plain, [r"layers.1.0"], r=2, lora_alpha=3, init_lora_weights=False, backend=BACKEND)
    lk.save_peft_adapter(plain, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert any("layers" in key for key in config["rank_pattern"]), config["rank_pattern"]  # full-name keys
    wrapped = base()
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, nn.Sequential) and m is not wrapped.head)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    lk.load_peft_adapter(wrapped, tmp_path, backend=BACKEND)
    x = torch.randn(3, 16)
    torch.testing.assert_close(wrapped(x), plain(x), rtol=0, atol=0)


def test_inject_lora_reads_patterns_and_names_targets_by_state_dict_names_in_a_checkpoint_wrapped_model():
    """inject_lora's rank_pattern / alpha_pattern and its warning for list entries that match no module go by the
    state dict's names, as its targets do (found by a review: in a wrapped model every layer got the default r and
    alpha, and the entry "layers.0.0", which it adapted, was reported as matching no module)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    def inject(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning that no entry should get
            lk.inject_lora(model, ["layers.0.0", "head.0"], r=4, lora_alpha=8, backend=BACKEND,
                           rank_pattern={"layers.0.0": 2}, alpha_pattern={"head.0": 3})
        return {state_dict_name(n): (m.r, m.lora_alpha) for n, m in model.named_modules() if isinstance(m, LoRALinear)}

    wrapped = _Blocks()
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, nn.Sequential))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    assert inject(wrapped) == inject(_Blocks()) == {"layers.0.0": (2, 8), "head.0": (4, 3)}


def test_an_empty_modules_to_save_parses_as_none():
    assert peft_io.parse_adapter_config(_raw_config(modules_to_save=[])).modules_to_save is None


def test_save_embedding_layers_true_without_embedding_layers_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"save_peft_adapter: save_embedding_layers=True, but the model has no input "
                                         r"or output embedding layer"):
        lk.save_peft_adapter(_trained(), tmp_path / "out", save_embedding_layers=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_save_into_a_path_that_is_or_lies_under_a_file_is_a_value_error_naming_it(tmp_path, where):
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    with pytest.raises(ValueError, match=r"save_peft_adapter: path expected a directory \(created if missing\), got "):
        lk.save_peft_adapter(_trained(), path)
    assert (tmp_path / "f").read_text() == "x"


def test_a_flattened_lora_a_alone_is_refused_by_name_before_writing(tmp_path):
    """A lora_A held as a 1-D view (FSDP1's flat shard) is refused naming lora_A, even where lora_B has its shape:
    saved, the file held a [0] tensor under the layer's key."""
    model = _trained()
    layer = model.layers[0].q_proj
    layer.lora_A.weight = nn.Parameter(torch.zeros(0))
    with pytest.raises(ValueError, match=r"module 'layers\.0\.q_proj'\'s lora_A\.weight has shape \[0\], expected "
                                         r"\[8, 16\]"):
        lk.save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_contiguous_factors_and_heads_are_saved(tmp_path):
    """A factor or head parameter with a dense but transposed layout (w.t().contiguous().t()) is saved: safetensors
    refuses non-contiguous tensors, and a CPU copy keeps a dense layout as it is."""
    model = _trained(modules_to_save=["head"])
    layer = model.layers[0].q_proj
    layer.lora_A.weight.data = layer.lora_A.weight.detach().t().contiguous().t()
    model.head.weight.data = model.head.weight.detach().t().contiguous().t()
    assert not layer.lora_A.weight.is_contiguous() and not model.head.weight.is_contiguous()
    lk.save_peft_adapter(model, tmp_path)
    x = torch.randn(3, 16)
    torch.testing.assert_close(lk.load_peft_adapter(_base(), tmp_path)(x), model(x))  # layouts round differently


class _AttentionThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


def _file_with_an_attention_out_proj(path, target_modules):
    """A PEFT file for _AttentionThenLinear that holds factors for attn.out_proj as well as fc, as PEFT saves one
    with "all-linear"; and the model it reproduces (PEFT's LoRA on out_proj changes no output)."""
    torch.manual_seed(0)
    trained = lk.inject_lora(_AttentionThenLinear(), ["fc"], r=4, init_lora_weights=False, backend=BACKEND).eval()
    lk.save_peft_adapter(trained, path)
    _write_config(path, target_modules=target_modules)
    _edit_weights(path, lambda tensors: tensors.update({
        f"{peft_io.KEY_PREFIX}attn.out_proj.lora_A.weight": torch.randn(4, 16),
        f"{peft_io.KEY_PREFIX}attn.out_proj.lora_B.weight": torch.randn(16, 4)}))
    return trained


@pytest.mark.parametrize("target_modules", [["out_proj", "fc"], "all-linear"])
def test_load_wraps_a_multihead_attention_out_proj_as_peft_with_a_warning(tmp_path, target_modules):
    """nn.MultiheadAttention reads out_proj.weight and never calls out_proj: the LoRA there changes no output and
    gets no gradient until merge_and_unload folds it in, in PEFT as here; load_peft_adapter wrapped it silently,
    while README lists it among what the utilities warn about (helper 287). It warns now. (Leaving it out instead
    refused PEFT files whose biases or heads it trained: review 291.)"""
    trained = _file_with_an_attention_out_proj(tmp_path, target_modules)
    x = torch.randn(2, 5, 16)
    expected = trained(x)
    torch.manual_seed(0)
    model = _AttentionThenLinear().eval()
    with pytest.warns(UserWarning, match=r"load_peft_adapter: 1 targeted layer\(s\) are the out_proj of an "
                                         r"nn.MultiheadAttention, .* \('attn.out_proj'\): their LoRA factors change "
                                         r"no output and get no gradient, as in PEFT, until merge_and_unload"):
        lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
    assert isinstance(model.attn.out_proj, LoRALinear) and isinstance(model.fc, LoRALinear)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_slots_load_a_file_that_targets_a_multihead_attention_out_proj(tmp_path):
    """prepare_multi_adapter leaves the out_proj out; the load into its slots refused the file as "not prepared"
    for that layer. Its factors are left out with a warning, as a single adapter's load leaves them."""
    trained = _file_with_an_attention_out_proj(tmp_path, "all-linear")
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\)"):
        model = lk.prepare_multi_adapter(_AttentionThenLinear().eval(), "all-linear", max_adapters=2, max_rank=4,
                                         backend=BACKEND)
    with pytest.warns(UserWarning, match=r"1 targeted layer\(s\) are the out_proj .* so they are left out of the "
                                         r"slots, unloaded"):
        lk.load_peft_adapter(model, tmp_path, adapter_name="a")
    with lk.set_batch_adapters(model, ["a", "a"]):
        torch.testing.assert_close(model(x), trained(x), rtol=1e-6, atol=1e-6)


def test_a_file_that_targets_only_a_multihead_attention_out_proj_is_refused_by_the_slots_untouched(tmp_path):
    _file_with_an_attention_out_proj(tmp_path, ["out_proj"])
    _edit_weights(tmp_path, lambda tensors: [tensors.pop(key) for key in list(tensors) if ".fc." in key])
    with pytest.warns(UserWarning, match=r"left out 1 matched layer\(s\)"):
        model = lk.prepare_multi_adapter(_AttentionThenLinear(), "all-linear", max_adapters=2, max_rank=4)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules \['out_proj'\] match only \['attn.out_proj'\], the out_proj "
                                         r"of an nn.MultiheadAttention, .*; the slots leave it out"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lk.load_peft_adapter(model, tmp_path, adapter_name="a")
    _assert_same(model, snapshot)


class _AttentionThenClassifier(_AttentionThenLinear):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(super().forward(x))


def _load_with_the_out_proj_warning(path, base_state):
    """A fresh _AttentionThenClassifier with base_state, and the PEFT file at path loaded into it, which warns about
    the attention's out_proj."""
    model = _AttentionThenClassifier().eval()
    model.load_state_dict(base_state)
    with pytest.warns(UserWarning, match=r"1 targeted layer\(s\) are the out_proj"):
        lk.load_peft_adapter(model, path, backend=BACKEND)
    return model


def test_a_peft_file_with_only_an_attention_out_proj_target_still_loads_its_trained_head(tmp_path):
    """PEFT with target_modules=["out_proj"] and a modules_to_save head: the head is what the file changes. A first
    version of the out_proj rule refused the file as "an adapter there changes no output" (review 290); it loads,
    as PEFT's, with the warning."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = _AttentionThenClassifier().eval()
    state = copy.deepcopy(base.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(target_modules=["out_proj"], modules_to_save=["classifier"],
                                                       r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 5, 16)
    model = _load_with_the_out_proj_warning(tmp_path, state)
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_peft_file_that_trains_an_attention_out_proj_bias_loads_as_peft(tmp_path, bias):
    """The attention reads out_proj's bias too, so a bias mode trains it: leaving the layer out had refused such
    files ("is missing 'base_model.model.attn.out_proj.bias'"; review 291). Wrapped as PEFT wraps it, it loads."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = _AttentionThenClassifier().eval()
    state = copy.deepcopy(base.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(target_modules=["out_proj"], bias=bias, r=4,
                                                       init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(0.5)
    theirs.save_pretrained(tmp_path)
    x = torch.randn(2, 5, 16)
    model = _load_with_the_out_proj_warning(tmp_path, state)
    untrained = _AttentionThenClassifier().eval()
    untrained.load_state_dict(state)
    assert (model(x) - untrained(x)).abs().max() > 0.1  # the trained biases count
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-6, atol=1e-6)


class _SharedProjection(nn.Module):
    """One nn.Linear under two attribute names (named_modules() lists it once, as `enc`)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_load_warns_of_a_target_reachable_under_two_names_as_inject_lora(tmp_path):
    """inject_lora warns that a forward through the second name computes without the adapter; the load, which
    replaces the layer the same way, was silent (helper 287)."""
    with pytest.warns(UserWarning, match=r"inject_lora: target 'enc' is the same module as \['dec'\]"):
        lk.save_peft_adapter(lk.inject_lora(_SharedProjection(), ["enc"], r=2, init_lora_weights=False), tmp_path)
    model = _SharedProjection()
    with pytest.warns(UserWarning) as caught:
        lk.load_peft_adapter(model, tmp_path, backend=BACKEND)
    assert [str(w.message) for w in caught] == [
        "load_peft_adapter: target 'enc' is the same module as ['dec']; it is replaced under 'enc' only, so a forward "
        "through 'dec' computes without the adapter (as in PEFT)"]
    assert isinstance(model.enc, LoRALinear) and type(model.dec) is nn.Linear
