"""Differential fuzzing of the PEFT interop against PEFT itself: random LoraConfigs (targets as names, suffixes,
regexes or "all-linear"; r, alpha, rsLoRA, rank/alpha patterns, layers_to_transform, exclude_modules, bias modes,
modules_to_save, fan_in_fan_out) on a small torch model and tiny Hugging Face models (Llama; GPT-2's Conv1D), in
float64. Each config goes both ways through the adapter files (and into MultiLoRALinear slots by name) and is compared
by outputs, by which modules carry a LoRA with what r, scaling and dropout, by what trains, and after
merge_and_unload. A config one side refuses is compared by refusal: ours must be a ValueError/TypeError, and one that
PEFT accepts must be a refusal README lists, for its file as well. Where PEFT disagrees with itself (its file read
back, its merge of a tied weight) its file, the format, decides."""

import copy
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_kernels as lk  # noqa: E402
from conftest import installed_version, tiny_llama_config  # noqa: E402
from lora_kernels.modules import LoRALinear, suffix_only_modules_to_save  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

PEFT = installed_version("peft")
pytestmark = pytest.mark.skipif(PEFT < (0, 21), reason="the fuzzer's expectations follow peft >= 0.21's rules")
DTYPE = torch.float64
# float64 on both sides: the only differences left are the order of a few float64 sums
RTOL = 1e-9
VOCAB = 64


# ------------------------------------------------------------------------------------------------------- models

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 12)
        self.k_proj = nn.Linear(12, 6, bias=False)
        self.v_proj = nn.Linear(12, 6)
        self.o_proj = nn.Linear(6, 12, bias=False)

    def forward(self, x):
        return self.o_proj(self.v_proj(x) * torch.sigmoid(self.k_proj(x))) + self.q_proj(x)


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(12, 20, bias=False)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.proj = nn.Linear(20, 12)  # "proj": a suffix of o_proj's name as a string, not as a name component
        # a second layer index in the names (model.layers.0.mlp.experts.1.w1): PEFT's layers_to_transform takes the
        # first one
        self.experts = nn.ModuleList([Expert(), Expert()])

    def forward(self, x):
        hidden = self.up(x) + sum(expert.w1(x) for expert in self.experts)
        return self.proj(torch.tanh(hidden))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.mlp = Mlp()
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(7, 12, bias=False)
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Net(nn.Module):
    """Nested layers (model.layers.<i>.attn.q_proj, PEFT's default layer pattern needs the "model." in front),
    Linear layers of unequal in/out sizes with and without bias, LayerNorms, a head."""

    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.model(x))


def _randomise(module, seed):
    """Every parameter random (LayerNorm weights and biases included), so no bias or norm is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


_BASES = {}


def base_model(arch):
    """A fresh copy of the arch's base model (float64, eval mode), built once per process."""
    if arch not in _BASES:
        torch.manual_seed(0)
        if arch == "net":
            model = Net()
        elif arch == "llama":
            model = transformers.LlamaForCausalLM(tiny_llama_config(
                vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                attention_bias=True, mlp_bias=False, attn_implementation="eager"))
        else:
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=1,
                attn_implementation="eager"))
        _BASES[arch] = _randomise(model, 1).to(DTYPE).eval()
    return copy.deepcopy(_BASES[arch])


def model_input(arch):
    g = torch.Generator().manual_seed(3)
    if arch == "net":
        return {"x": torch.randn(2, 4, 7, generator=g, dtype=DTYPE)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 5), generator=g)}


def output(model, arch):
    with torch.no_grad():
        out = model(**model_input(arch))
    return out if arch == "net" else out.logits


# ARCH: (leaf names of the linear layers, name components a target or a pattern key may end with, layer lists,
# modules_to_save candidates). Conv1D layers (GPT-2) are linear targets too.
ARCH = {
    "net": dict(leaves=["q_proj", "k_proj", "v_proj", "o_proj", "up", "proj", "w1", "proj_in", "head"],
                suffixes=["attn.q_proj", "mlp.proj", "model.proj_in", "layers.1.attn.v_proj", "mlp.up", "experts.1.w1"],
                layer_names=["layers"], num_layers=3,
                heads=[["head"], ["norm"], ["mlp"], ["model.layers.2.attn"], ["proj"]], others=["norm", "attn"]),
    "llama": dict(leaves=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
                  suffixes=["self_attn.q_proj", "mlp.down_proj", "layers.0.mlp.up_proj"],
                  layer_names=["layers"], num_layers=2,
                  heads=[["lm_head"], ["input_layernorm"], ["mlp"], ["embed_tokens"], ["embed_tokens", "lm_head"]],
                  others=["embed_tokens", "post_attention_layernorm", "rotary_emb"]),
    "gpt2": dict(leaves=["c_attn", "c_proj", "c_fc", "lm_head"], suffixes=["attn.c_proj", "mlp.c_proj", "h.1.mlp.c_fc"],
                 layer_names=["h"], num_layers=2, heads=[["ln_f"], ["mlp"], ["ln_1"], ["wte"], ["lm_head"]],
                 others=["wte", "ln_2", "attn"]),
}


# ------------------------------------------------------------------------------------------------------ configs

class Chooser:
    """The random draws of one config, from a seeded random.Random: a failing seed reproduces its config exactly."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def integer(self, low, high):
        return self.rng.randint(low, high)

    def boolean(self, p=0.5):
        return self.rng.random() < p

    def subset(self, options, min_size=1):
        return self.rng.sample(list(options), self.rng.randint(min_size, len(options)))


def _regex(ch, spec):
    leaves = ch.subset(spec["leaves"][:4], 1)
    layer = spec["layer_names"][0]
    return ch.choice([
        rf".*\.({'|'.join(leaves)})",
        rf".*{layer}\.{ch.integer(0, spec['num_layers'] - 1)}\..*({'|'.join(leaves)})",
        rf".*\.{leaves[0]}",
        r".*_proj" if spec is ARCH["net"] or spec is ARCH["llama"] else r".*c_.*",
    ])


def _pattern_key(ch, spec):
    """A rank_pattern / alpha_pattern key: a plain leaf name, a dotted suffix, a full-ish name, or a regex."""
    layer = spec["layer_names"][0]
    index = ch.integer(0, spec["num_layers"] - 1)
    leaf = ch.choice(spec["leaves"])
    return ch.choice([leaf, ch.choice(spec["suffixes"]), rf"{layer}\.{index}\..*", rf".*{leaf[-4:]}",
                      f"{layer}.{index}.*{leaf}", "proj", r"(q|v)_proj"])


def draw_config(ch, arch):
    """LoraConfig keyword arguments (PEFT's names), each field only where PEFT supports it."""
    spec = ARCH[arch]
    kind = ch.choice(["list", "list", "suffix", "regex", "all-linear"])
    if kind == "list":
        targets = ch.subset(spec["leaves"], 1)
    elif kind == "suffix":
        targets = ch.subset(spec["suffixes"] + spec["leaves"], 1)
    elif kind == "regex":
        targets = _regex(ch, spec)
    else:
        targets = "all-linear"
    config = dict(target_modules=targets, r=ch.integer(1, 6), lora_alpha=ch.choice([1, 4, 7, 16, 2.5]),
                  use_rslora=ch.boolean(), bias=ch.choice(["none", "none", "all", "lora_only"]),
                  lora_dropout=ch.choice([0.0, 0.0, 0.1]))
    if ch.boolean():
        config["rank_pattern"] = {_pattern_key(ch, spec): ch.integer(1, 5) for _ in range(ch.integer(1, 3))}
    if ch.boolean():
        config["alpha_pattern"] = {_pattern_key(ch, spec): ch.choice([2, 3, 8, 0.5]) for _ in range(ch.integer(1, 3))}
    if isinstance(targets, list) and ch.boolean(0.1):
        targets.append(ch.choice(spec["others"]))  # a layer that is not linear: refused by both
    if (isinstance(targets, list) or ch.boolean(0.1)) and ch.boolean(0.4):  # with a regex: refused by both
        indices = ch.subset(range(spec["num_layers"] + 1), 1)  # one past the last: selects nothing
        config["layers_to_transform"] = indices if ch.boolean() else indices[0]
        pattern = ch.choice([None, spec["layer_names"][0], [spec["layer_names"][0], "blocks"]])
        if pattern is not None:
            config["layers_pattern"] = pattern
    elif ch.boolean(0.05):  # without layers_to_transform: refused by both
        config["layers_pattern"] = spec["layer_names"][0]
    if ch.boolean(0.4):
        excluded = ch.subset(spec["leaves"] + spec["suffixes"], 1)[:2]
        config["exclude_modules"] = ch.choice([excluded, rf".*{spec['layer_names'][0]}\.0\..*"])
    if ch.boolean(0.3):
        config["modules_to_save"] = ch.choice(spec["heads"])
    if arch == "gpt2":
        config["fan_in_fan_out"] = ch.boolean(0.7)
    if arch != "net" and ch.boolean(0.3):
        config["task_type"] = "CAUSAL_LM"  # a PeftModelForCausalLM, and the task type kept in our file
    return config


def inject_kwargs(config):
    """inject_lora's arguments for a LoraConfig's (the same names but target_modules)."""
    kwargs = {k: v for k, v in config.items() if k not in ("target_modules", "task_type")}
    return dict(target_modules=copy.deepcopy(config["target_modules"]), init_lora_weights=False, backend="auto",
                **copy.deepcopy(kwargs))


# ------------------------------------------------------------------------------------------------------- checks

def _peft_layers(model):
    """{module name: (r, scaling, dropout probability)} of a PeftModel's LoRA layers."""
    return {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"],
                                                     getattr(m.lora_dropout["default"], "p", 0.0))
            for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _our_layers(model):
    return {name: (m.r, m.scaling, m.lora_dropout) for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _peft_trainable(model):
    """The names of a PeftModel's trainable parameters in the base model's naming (PEFT's own copies named as the
    modules they replace; the originals it keeps beside a modules_to_save copy left out)."""
    names = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or ".original_module." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        names.add(name.replace(".default.", ".").replace(".base_layer.", "."))
    return names


def _our_trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _perturb_trainable(model, seed):
    """Moves every trainable parameter (LoRA factors, trained biases, modules_to_save), as training would, so the
    files carry values that differ from the base model's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _close(actual, expected, what, rtol=RTOL):
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error <= rtol, f"{what}: relative error {error:.3g}"


def _same_layers(ours, theirs, what):
    assert set(ours) == set(theirs), (f"{what}: LoRA layers differ: only ours {sorted(set(ours) - set(theirs))}, "
                                      f"only PEFT's {sorted(set(theirs) - set(ours))}")
    for name, (r, scaling, dropout) in ours.items():
        their_r, their_scaling, their_dropout = theirs[name]
        assert (r, dropout) == (their_r, their_dropout) and abs(scaling - their_scaling) <= 1e-12 * abs(scaling), (
            f"{what}: {name}: ours r={r} scaling={scaling} dropout={dropout}, PEFT's r={their_r} "
            f"scaling={their_scaling} dropout={their_dropout}")


# Refusals of ours for configs PEFT accepts, each one README lists: (what, our message regex, README's words).
DOCUMENTED_REFUSALS = [
    ("a target that modules_to_save also selects", r"is a LoRA target and (is|lies inside) the modules_to_save",
     "whose whole state it holds because `modules_to_save`"),
    ("LoRA on an embedding layer", r"a Embedding; .*PEFT's LoRA on convolution and embedding layers is not "
                                   r"supported here",
     "Targets that are neither `nn.Linear` nor transformers' `Conv1D`: PEFT's LoRA on `nn.Embedding`"),
    ("a tied modules_to_save module", r"modules_to_save selects module '[^']+', whose parameter is tied to",
     "A `modules_to_save` module whose weights are tied to another module's"),
]


def test_the_documented_refusals_are_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for what, _, phrase in DOCUMENTED_REFUSALS:
        assert phrase in " ".join(readme.split()), what


def _documented(error):
    documented = [what for what, pattern, _ in DOCUMENTED_REFUSALS if re.search(pattern, str(error))]
    assert documented, f"we refuse what PEFT accepts, undocumented: {type(error).__name__}: {error}"


def _peft_model(arch, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base_model(arch), LoraConfig(init_lora_weights=False, **copy.deepcopy(config)))
    return model.eval()


def _inject(arch, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lk.inject_lora(base_model(arch), **inject_kwargs(config)).eval()


def _save_quietly(peft_model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True" for a targeted lm_head
        peft_model.save_pretrained(path)


def _attempt(make, errors=(ValueError, TypeError)):
    try:
        return make(), None
    except errors as exc:
        return None, exc


# PEFT <= 0.21 selected modules_to_save by a plain name suffix ("proj" selected "q_proj"), PEFT >= 0.22 and we by
# whole name components: where the two rules select differently, that PEFT is not the reference
SUFFIX_RULE = "not compared: PEFT < 0.22 selects modules_to_save by a plain suffix"


def check_config(arch, config, tmp, seed=0):
    """Runs every direction for one config; AssertionError naming what differs."""
    if PEFT < (0, 22) and suffix_only_modules_to_save(base_model(arch), config.get("modules_to_save") or []):
        return SUFFIX_RULE
    base_out = output(base_model(arch), arch)
    theirs, peft_error = _attempt(lambda: _peft_model(arch, config))
    ours, our_error = _attempt(lambda: _inject(arch, config))
    if our_error is not None:
        assert str(our_error), "an empty error message"
        if peft_error is not None:
            return "refused"
        _documented(our_error)
        # PEFT's file of that config: refused by our loader too, for a documented reason, before any change
        path = os.path.join(tmp, "peft")
        _save_quietly(theirs, path)
        model = base_model(arch)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((ValueError, TypeError)) as refused:
            lk.load_peft_adapter(model, path)
        _documented(refused.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and len(before) == len(
            model.state_dict()), "a refused load changed the model"
        return "refused by us only"
    if peft_error is not None:
        # PEFT refuses and we accept: the file we save must still be one PEFT reads as we meant it (checked below
        # with a PeftModel that loads our file); a refusal of the config itself is PEFT's choice
        theirs = None

    # (c) the same modules get a LoRA, with the same r and scaling; the same parameters train
    our_layers = _our_layers(ours)
    if theirs is not None:
        _same_layers(our_layers, _peft_layers(theirs), "inject_lora vs get_peft_model")
        their_trainable = _peft_trainable(theirs)
        assert _our_trainable(ours) == their_trainable, (
            f"trainable parameters differ: only ours {sorted(_our_trainable(ours) - their_trainable)}, only "
            f"PEFT's {sorted(their_trainable - _our_trainable(ours))}")

    # (b) ours -> file -> PeftModel.from_pretrained on a fresh base: same outputs as ours
    _perturb_trainable(ours, seed)
    our_out = output(ours, arch)
    assert (our_out - base_out).abs().max() > 1e-6, "the adapter changes nothing: the test would prove nothing"
    path = os.path.join(tmp, "ours")
    lk.save_peft_adapter(ours, path, task_type=config.get("task_type"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(base_model(arch), path).eval()
    _same_layers(our_layers, _peft_layers(back), "our file read by PEFT")
    _close(output(back, arch), our_out, "our file read by PEFT")

    if theirs is None:
        return "refused by PEFT only"
    # (a) PEFT -> file -> load_peft_adapter on a fresh base: what PEFT reads from its own file. That is its
    # in-memory model, except where PEFT does not read its own file back as it was (it writes rank_pattern and
    # alpha_pattern with sorted keys, but looks them up in their order: {"layers.1.attn.v_proj": 8, ".*proj": 3}
    # gives that layer 8 in memory and 3 from the file); the file is the format, so ours must read it as PEFT does
    _perturb_trainable(theirs, seed + 1)
    their_out = output(theirs, arch)
    path = os.path.join(tmp, "peft")
    _save_quietly(theirs, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reread, reread_error = _attempt(lambda: PeftModel.from_pretrained(base_model(arch), path).eval(),
                                        (ValueError, TypeError, RuntimeError))
        loaded, load_error = _attempt(lambda: lk.load_peft_adapter(base_model(arch), path).eval())
    if reread_error is not None:  # PEFT cannot read its own file (shapes of the sorted rank_pattern): nor can we
        assert load_error is not None, f"PEFT cannot read its own file ({reread_error}), but we read it"
        return "PEFT cannot read its own file"
    assert load_error is None, f"we cannot read PEFT's file: {type(load_error).__name__}: {load_error}"
    reread_layers = _peft_layers(reread)
    round_trips = reread_layers == _peft_layers(theirs)
    if round_trips:
        _close(output(reread, arch), their_out, "PEFT's own round trip")
    else:
        their_out = output(reread, arch)
        theirs = reread
    _same_layers(_our_layers(loaded), reread_layers, "PEFT's file read by us")
    _close(output(loaded, arch), their_out, "PEFT's file read by us")
    if round_trips:  # into a model injected with the same config too (else its ranks are the in-memory ones)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            into_injected = lk.load_peft_adapter(_inject(arch, config), path).eval()
        _close(output(into_injected, arch), their_out, "PEFT's file read into an injected model")
    assert _our_trainable(loaded) == their_trainable, "trainable parameters after loading PEFT's file"

    # (d) merge_and_unload both ways: plain models with the same outputs as before merging. Except PEFT's where a
    # target's weight is tied to another module's (GPT-2's lm_head and wte): PEFT merges into the shared weight,
    # so its merged model's embedding changes too and computes something else (it warns); ours unties them
    tied = _tied_targets(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
        merged_ours = lk.merge_and_unload(loaded)
    assert not any(isinstance(m, LoRALinear) for m in merged_ours.modules())
    _close(output(merged_ours, arch), their_out, "our merge_and_unload")
    if not tied:
        _close(output(merged_theirs, arch), their_out, "PEFT's merge_and_unload")

    # (e) PEFT's file as a named adapter in MultiLoRALinear slots (LoRA factors only: no biases, no heads), and
    # saved from the slots for PEFT again
    if config["bias"] == "none" and not config.get("modules_to_save"):
        multi = lk.prepare_multi_adapter(base_model(arch), sorted(reread_layers), max_adapters=2,
                                         max_rank=max(r for r, *_ in reread_layers.values())).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lora_dropout is not applied by slots
            lk.load_peft_adapter(multi, path, adapter_name="a")
        with lk.set_batch_adapters(multi, "a"):
            _close(output(multi, arch), their_out, "PEFT's file in MultiLoRALinear slots", RTOL)
        lk.save_peft_adapter(multi, os.path.join(tmp, "slots"), adapter_name="a")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = PeftModel.from_pretrained(base_model(arch), os.path.join(tmp, "slots")).eval()
        _close(output(back, arch), their_out, "a named adapter saved from slots, read by PEFT", RTOL)
    return "compared" if round_trips else "compared with PEFT's reading of its own file"


def _tied_targets(peft_model):
    """The LoRA layers of a PeftModel whose base weight another module of the model shares."""
    owners = {}
    for name, p in peft_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return [name for name, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
            and len(owners.get(id(m.get_base_layer().weight), [])) > 1]


# -------------------------------------------------------------------------------------------------------- tests

ARCHS = ["net", "llama", "gpt2"]
# 61 seeds take ~10 s on 2 CPU cores. As the generator draws them now, 15 of their configs are "all-linear", 12 use
# regex targets, 16 list lm_head, 26 train a bias mode and 18 have modules_to_save. With PEFT 0.22.0, 51 are compared
# both ways and merged, 3 are refused by us and accepted by PEFT (documented refusals) and 7 are refused by both; seeds
# 100-1599 (the __main__ below) found no divergence. With PEFT 0.21.2, 46 are compared, 3 are not (seeds 12, 36 and
# 42: SUFFIX_RULE), and 2 are configs it does not read back from its own file as it had them (seed 81, compared with
# its reading of the file: alpha_pattern {"layers\\.2\\..*": 8, "experts.1.w1": 2}, whose file order is the
# opposite; seed 48 it cannot read at all); seeds 100-3099 found no divergence beyond those fixed or listed in README.
SEEDS = [*range(60), 81]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_lora_configs_agree_with_peft_both_ways(seed, tmp_path):
    if _check_seed(seed, str(tmp_path)) == [SUFFIX_RULE]:
        pytest.skip(SUFFIX_RULE)


def sweep_seeds(first, count, check):
    """A longer run than the tests' seeds (the fuzzers' __main__): check(seed, tmp) returns the outcomes of a seed,
    a list of names to count; an AssertionError is printed and counted as FAILED."""
    import collections
    import tempfile

    outcomes = collections.Counter()
    for seed in range(first, first + count):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                outcomes.update(check(seed, tmp))
            except AssertionError as exc:
                outcomes["FAILED"] += 1
                print(f"seed {seed}: {exc}")
    print(dict(outcomes))


def _check_seed(seed, tmp):
    arch = ARCHS[seed % len(ARCHS)]
    config = draw_config(Chooser(seed), arch)
    try:
        return [check_config(arch, config, tmp, seed)]
    except AssertionError as exc:
        raise AssertionError(f"{arch} with LoraConfig(**{config!r}): {exc}") from exc


# A longer run, from the repository root: PYTHONPATH=.:tests python tests/test_peft_fuzz.py FIRST_SEED COUNT
if __name__ == "__main__":
    import sys

    sweep_seeds(*(int(a) for a in sys.argv[1:3]), _check_seed)
