"""Parity with PEFT on more Hugging Face architectures, built from tiny configs with random weights (no downloads):
Qwen2 (biases on q/k/v), Phi-3 (fused qkv_proj and gate_up_proj), Gemma 2 and 3, T5 and BART (encoder-decoder;
T5's linears have no bias), BERT and RoBERTa for sequence classification (a classifier head in modules_to_save;
RoBERTa's head is a module holding two linears), Whisper (Conv1d layers beside the linears).

Per architecture: inject_lora selects the modules and trains the parameters get_peft_model does (listed targets and
"all-linear"); with the same A/B the logits and gradients match (torch backend to float rounding, the default
backend within the fp32 tolerance); adapter files go both ways; merge_and_unload keeps the logits; a mixed batch
over two adapters matches PEFT's adapter_names and each adapter alone (decoder-only and encoder-decoder models, and
T5's beam search); PEFT's SEQ_CLS "all-linear" files; Whisper's Conv1d targets are refused before any change."""

import copy
import warnings

import pytest
import torch
from conftest import TOLERANCE, assert_close, installed_version, rel_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_kernels as lk  # noqa: E402
from lora_kernels import _ext  # noqa: E402
from lora_kernels.backends import resolve_backend  # noqa: E402
from lora_kernels.modules import LoRALinear, MultiLoRALinear  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT

F32 = torch.float32
VOCAB = 128
BATCH, SEQ = 3, 7
PEFT = installed_version("peft")
# Where the test extra's older PEFT versions (>= 0.13) differ (checked with 0.13, 0.14, 0.15, 0.16 on transformers
# 4.45): before 0.16 PEFT puts a LoRA inside a modules_to_save head under "all-linear" (0.13 fails there); before
# 0.15 it takes no LoRA on a torch Conv1d and no adapter_names with beam search.
PEFT_KEEPS_LORA_OUT_OF_HEADS = pytest.mark.skipif(
    PEFT < (0, 16), reason="peft < 0.16 puts a LoRA inside a modules_to_save head or fails")
PEFT_0_15 = pytest.mark.skipif(PEFT < (0, 15), reason="peft < 0.15 has no LoRA on Conv1d, no adapter_names with beams")


def _config(name, **kwargs):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls(**kwargs)


def _qwen2():
    return transformers.Qwen2ForCausalLM(_config(
        "Qwen2Config", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64))


def _phi3():
    return transformers.Phi3ForCausalLM(_config(
        "Phi3Config", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))


def _gemma2():
    return transformers.Gemma2ForCausalLM(_config(
        "Gemma2Config", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4))


def _gemma3():
    config = _config(  # first: it skips where transformers has no Gemma 3 (before 4.50)
        "Gemma3TextConfig", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4)
    return transformers.Gemma3ForCausalLM(config)


def _t5():
    return transformers.T5ForConditionalGeneration(_config(
        "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0))


def _bart():
    return transformers.BartForConditionalGeneration(_config(
        "BartConfig", vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def _bert():
    return transformers.BertForSequenceClassification(_config(
        "BertConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3))


def _roberta():
    return transformers.RobertaForSequenceClassification(_config(
        "RobertaConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=1))


def _whisper():
    return transformers.WhisperForConditionalGeneration(_config(
        "WhisperConfig", vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))


def _ids(batch=BATCH, seq=SEQ, seed=7):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lm_inputs(batch=BATCH):
    ids = _ids(batch)
    return dict(input_ids=ids, labels=ids)


def _seq2seq_inputs(batch=BATCH):
    return dict(input_ids=_ids(batch), labels=_ids(batch, seq=5, seed=8))


def _cls_inputs(batch=BATCH):
    return dict(input_ids=_ids(batch), labels=torch.arange(batch) % 3)


def _speech_inputs(batch=BATCH):
    features = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(9))  # 2 * max_source_positions
    return dict(input_features=features, labels=_ids(batch, seq=5, seed=8))


# name: (builder, inputs, listed targets, other LoraConfig options, PEFT task_type, decoder-only)
ARCHS = {
    "qwen2": (_qwen2, _lm_inputs, ["q_proj", "k_proj", "v_proj", "down_proj"], {}, "CAUSAL_LM", True),
    "phi3": (_phi3, _lm_inputs, ["qkv_proj", "gate_up_proj", "o_proj"], {}, "CAUSAL_LM", True),
    "gemma2": (_gemma2, _lm_inputs, ["q_proj", "v_proj", "up_proj"], {}, "CAUSAL_LM", True),
    "gemma3": (_gemma3, _lm_inputs, ["q_proj", "v_proj", "up_proj"], {}, "CAUSAL_LM", True),
    "t5": (_t5, _seq2seq_inputs, ["q", "v"], {}, "SEQ_2_SEQ_LM", False),
    "bart": (_bart, _seq2seq_inputs, ["q_proj", "v_proj", "fc1"], {}, "SEQ_2_SEQ_LM", False),
    "bert": (_bert, _cls_inputs, ["query", "value"], dict(modules_to_save=["classifier"]), "SEQ_CLS", False),
    "roberta": (_roberta, _cls_inputs, ["query", "value"], dict(modules_to_save=["classifier"]), "SEQ_CLS", False),
    "whisper": (_whisper, _speech_inputs, ["q_proj", "v_proj", "fc2"], {}, None, False),
}
DECODERS = [name for name, spec in ARCHS.items() if spec[5]]
_BASES = {}


def _base(arch):
    if arch not in _BASES:
        torch.manual_seed(0)
        _BASES[arch] = ARCHS[arch][0]().eval()
    return _BASES[arch]


def _lora_kwargs(arch, targets="listed", **extra):
    _, _, listed, options, _, _ = ARCHS[arch]
    return dict(r=4, lora_alpha=8, target_modules=listed if targets == "listed" else targets, **options, **extra)


def _peft(arch, base=None, **kwargs):
    """A PeftModel of a copy of the architecture's base model with random non-zero A and B."""
    task_type = ARCHS[arch][4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' is_gradient_checkpointing deprecation, seen through PEFT
        return get_peft_model(copy.deepcopy(base or _base(arch)),
                              LoraConfig(init_lora_weights=False, task_type=task_type, **kwargs)).eval()


def _strip(name):
    """PEFT's parameter name as lora_kernels names it."""
    for part in (".modules_to_save.default", ".default", ".base_layer", ".original_module"):
        name = name.replace(part, "")
    return name.removeprefix("base_model.model.")


def _peft_lora_layers(model):
    return sorted(_strip(n) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def _our_lora_layers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _trainable(model):
    return sorted(_strip(n) for n, p in model.named_parameters() if p.requires_grad)


def _logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {_strip(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    return out.logits.detach(), grads


def _assert_parity(ours, theirs, inputs, exact):
    """Same logits and same gradients of every trained parameter. exact: the torch backend runs PEFT's operations
    in PEFT's order, so the logits are equal bit for bit and the gradients equal to float rounding."""
    logits, grads = _logits_and_grads(ours, inputs)
    ref_logits, ref_grads = _logits_and_grads(theirs, inputs)
    assert sorted(grads) == sorted(ref_grads)
    if exact:  # the forward is PEFT's to the bit; backward sums may round differently (seen: up to 5e-7)
        assert torch.equal(logits, ref_logits), f"logits differ by {(logits - ref_logits).abs().max():.3e}"
    else:
        assert_close(logits, ref_logits, F32, "logits")
    for name, grad in grads.items():
        error = rel_error(grad, ref_grads[name])
        assert error <= (1e-5 if exact else TOLERANCE[F32]), f"grad {name}: relative error {error:.3e}"
    return logits


@pytest.mark.parametrize("targets", ["listed", "all-linear"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_modules_and_parameters_as_peft(arch, targets):
    kwargs = _lora_kwargs(arch, targets)
    if targets == "all-linear" and arch == "roberta" and PEFT < (0, 16):
        pytest.skip("peft < 0.16 puts a LoRA inside a modules_to_save head holding linears (RoBERTa's) or fails")
    theirs = _peft(arch, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here deserves a warning
        ours = lk.inject_lora(copy.deepcopy(_base(arch)), init_lora_weights=False, **kwargs)
    assert _our_lora_layers(ours) == _peft_lora_layers(theirs)
    assert _trainable(ours) == _trainable(theirs)
    if targets == "all-linear":
        output = _base(arch).get_output_embeddings()
        if output is not None:  # PEFT leaves the output head out
            assert not any(ours.get_submodule(n) is output for n in _our_lora_layers(ours))
        assert len(_our_lora_layers(ours)) > len(_lora_kwargs(arch)["target_modules"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_and_files_both_ways(arch, tmp_path):
    """PEFT's file into a fresh base model (torch backend), our file into PeftModel.from_pretrained, and an adapter
    injected with the default backend whose A/B are copied into PEFT's layers."""
    base, inputs = _base(arch), ARCHS[arch][1]()
    kwargs = _lora_kwargs(arch)
    theirs = _peft(arch, **kwargs)
    if "modules_to_save" in kwargs:  # as if trained: the saved head differs from the base model's
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if ".modules_to_save.default." in name:
                    p.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch").eval()
    assert _our_lora_layers(ours) == _peft_lora_layers(theirs)
    logits = _assert_parity(ours, theirs, inputs, exact=True)
    with torch.no_grad():
        assert rel_error(logits, base(**inputs).logits) > 1e-2  # the adapter does something

    lk.save_peft_adapter(ours, tmp_path / "ours", task_type=ARCHS[arch][4])
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
    assert _peft_lora_layers(back) == _our_lora_layers(ours)
    _assert_parity(ours, back, inputs, exact=True)

    # default backend (the C++ CPU kernels when the extension is built), A/B (and head) copied from ours into PEFT
    if _ext.HAS_EXTENSION:
        assert resolve_backend("auto", torch.device("cpu"), "lora_linear", F32) == "cpu"
    injected = lk.inject_lora(copy.deepcopy(base), init_lora_weights=False, **kwargs).eval()
    fresh = _peft(arch, **kwargs)
    ours_state = dict(injected.named_parameters())
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if p.requires_grad:
                p.copy_(ours_state[_strip(name)])
    _assert_parity(injected, fresh, inputs, exact=False)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_and_unload_keeps_the_logits(arch, backend):
    base, inputs = _base(arch), ARCHS[arch][1]()
    kwargs = _lora_kwargs(arch)
    model = lk.inject_lora(copy.deepcopy(base), init_lora_weights=False, backend=backend, **kwargs).eval()
    theirs = _peft(arch, **kwargs)
    with torch.no_grad():
        state = dict(model.named_parameters())
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(state[_strip(name)])
        unmerged = model(**inputs).logits
        assert rel_error(unmerged, base(**inputs).logits) > 1e-2
        lk.merge_and_unload(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert sorted(model.state_dict()) == sorted(base.state_dict())
        merged = model(**inputs).logits
        assert_close(merged, unmerged, F32, "merged logits")
        assert_close(merged, theirs.merge_and_unload()(**inputs).logits, F32, "PEFT's merged logits")


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("arch", DECODERS + ["t5", "bart", "whisper"])
def test_mixed_batch_matches_each_adapter_alone_and_peft(arch, backend, tmp_path):
    """Two adapters (different targets, ranks, rsLoRA) in one prepared model, rows ["a", "b", "__base__", "b"]:
    PEFT's adapter_names= on the same files, and each adapter alone in a fresh base model. Encoder-decoder models
    too: their encoder and decoder see the same rows."""
    base, inputs = _base(arch), ARCHS[arch][1](batch=4)
    if not ARCHS[arch][5]:
        inputs["decoder_input_ids"] = inputs["labels"]
    inputs.pop("labels")
    listed = _lora_kwargs(arch)["target_modules"]
    configs = {"a": dict(r=4, lora_alpha=8, target_modules=listed[:2]),
               "b": dict(r=6, lora_alpha=3, target_modules=listed[1:], use_rslora=True)}
    for name, config in configs.items():
        _peft(arch, **config).save_pretrained(tmp_path / name)
    ours = lk.prepare_multi_adapter(copy.deepcopy(base), listed, max_adapters=3, max_rank=8, backend=backend).eval()
    for name in configs:
        lk.load_peft_adapter(ours, tmp_path / name, adapter_name=name)
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, MultiLoRALinear)) == _peft_lora_layers(
        _peft(arch, r=2, target_modules=listed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()

    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        with lk.set_batch_adapters(ours, names):
            mixed = ours(**inputs).logits
        ref = theirs(**inputs, adapter_names=names).logits
        assert_close(mixed, ref, F32, "mixed batch against PEFT's adapter_names")
        for name in configs:  # each adapter alone, loaded into a fresh base model
            alone = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / name, backend="torch").eval()
            rows = [i for i, n in enumerate(names) if n == name]
            part = {k: v[rows] for k, v in inputs.items()}
            expected = alone(**part).logits
            assert_close(mixed[rows], expected, F32, f"rows of adapter {name}")
            assert rel_error(expected, base(**part).logits) > 1e-2
        assert_close(mixed[2:3], base(**{k: v[2:3] for k, v in inputs.items()}).logits, F32, "__base__ row")


@PEFT_0_15
def test_encoder_decoder_beam_search_over_a_mixed_batch(tmp_path):
    """generate(num_beams=2) on T5: the encoder runs the 3 rows, the decoder 6 (each row's beams side by side), so
    each name covers one encoder row and two decoder rows. Each row generates what its adapter generates alone, and
    what PEFT's generate(adapter_names=) does."""
    base, inputs = _base("t5"), {"input_ids": _ids()}
    configs = {"a": dict(r=4, lora_alpha=64, target_modules=["q", "v"]),
               "b": dict(r=4, lora_alpha=64, target_modules=["v"])}
    for name, config in configs.items():
        _peft("t5", **config).save_pretrained(tmp_path / name)
    ours = lk.prepare_multi_adapter(copy.deepcopy(base), ["q", "v"], max_adapters=2, max_rank=4).eval()
    for name in configs:
        lk.load_peft_adapter(ours, tmp_path / name, adapter_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    options = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        with lk.set_batch_adapters(ours, names):
            mixed = ours.generate(**inputs, **options)
        assert torch.equal(mixed, theirs.generate(**inputs, adapter_names=names, **options))
        alone = {"__base__": base}
        alone.update({name: lk.load_peft_adapter(copy.deepcopy(base), tmp_path / name).eval() for name in configs})
        for row, name in enumerate(names):
            assert torch.equal(mixed[row:row + 1], alone[name].generate(input_ids=inputs["input_ids"][row:row + 1],
                                                                        **options)), name
        outputs = {name: model.generate(**inputs, **options) for name, model in alone.items()}
    assert not any(torch.equal(outputs[x], outputs[y]) for x, y in (("a", "b"), ("a", "__base__"), ("b", "__base__")))


def test_t5_feed_forward_output_in_a_prepared_model(tmp_path):
    """T5's feed-forward casts to `wo.weight.dtype` before calling wo: a prepared wo (MultiLoRALinear) had no
    `.weight` and the forward failed with an AttributeError (inject_lora's LoRALinear, and PEFT's layers, have one).
    With wo prepared, "__base__" rows give the base logits and an adapter's rows its own."""
    base, inputs = _base("t5"), ARCHS["t5"][1](batch=2)
    _peft("t5", r=4, lora_alpha=8, target_modules=["wo"]).save_pretrained(tmp_path / "a")
    ours = lk.prepare_multi_adapter(copy.deepcopy(base), ["wo"], max_adapters=1, max_rank=4).eval()
    lk.load_peft_adapter(ours, tmp_path / "a", adapter_name="a")
    alone = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad(), lk.set_batch_adapters(ours, ["__base__", "a"]):
        mixed = ours(**inputs).logits
        assert_close(mixed[:1], base(**{k: v[:1] for k, v in inputs.items()}).logits, F32, "__base__ row")
        assert_close(mixed[1:], alone(**{k: v[1:] for k, v in inputs.items()}).logits, F32, "adapter row")


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj"], "all-linear"], ids=str)
def test_a_peft_model_is_named_as_one_by_inject_lora_and_prepare_multi_adapter(tmp_path, targets):
    """inject_lora / prepare_multi_adapter on a PeftModel said its PEFT layer "matches target_modules but is a
    Linear; only nn.Linear ... can be wrapped"; now they say what load_peft_adapter says, also where the targets
    miss PEFT's layers (["v_proj"]: PEFT's adapter was frozen with the rest of the model) or reach inside them
    ("all-linear": LoRALinears on PEFT's base_layer, lora_A and lora_B), silently before (helper 118). A model
    holding a PeftModel as a submodule likewise, and our merge_and_unload of one (which returned it unchanged, as
    if merged); nothing is changed."""
    base = _base("qwen2")
    _peft("qwen2", r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    before = {name: (p.requires_grad, type(module)) for name, p in theirs.named_parameters()
              for module in [theirs.get_submodule(name.rpartition(".")[0])]}
    for wrap in (lambda m: lk.inject_lora(m, targets, r=2),
                 lambda m: lk.prepare_multi_adapter(m, targets, max_adapters=2, max_rank=4),
                 lk.merge_and_unload):  # returned a PeftModel unchanged, as if merged
        with pytest.raises(TypeError, match=r"^(inject_lora|prepare_multi_adapter|merge_and_unload): the model is a "
                                            r"PEFT module "
                                            r"\(PeftModelForCausalLM\); pass the base model, not a PeftModel"):
            wrap(theirs)
        holder = torch.nn.ModuleDict({"peft": theirs})
        with pytest.raises(TypeError, match=r"module 'peft' is a PEFT module \(PeftModelForCausalLM\)"):
            wrap(holder)
    assert before == {name: (p.requires_grad, type(module)) for name, p in theirs.named_parameters()
                      for module in [theirs.get_submodule(name.rpartition(".")[0])]}


@PEFT_KEEPS_LORA_OUT_OF_HEADS
def test_seq_cls_all_linear_file_from_peft_task_type(tmp_path):
    """PEFT's task_type="SEQ_CLS" with "all-linear" and no modules_to_save leaves the head out of the LoRA targets
    and trains it whole (modules_to_save ["classifier", "score"] in the file; RoBERTa's head holds two linears).
    The file loads here as inject_lora("all-linear", modules_to_save=["classifier"]) builds the model, same logits
    and gradients as PEFT's."""
    for arch in ("bert", "roberta"):
        base, inputs = _base(arch), ARCHS[arch][1]()
        theirs = _peft(arch, r=4, lora_alpha=8, target_modules="all-linear")
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if ".modules_to_save.default." in name:
                    p.add_(0.5)
        theirs.save_pretrained(tmp_path / arch)
        loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / arch, backend="torch").eval()
        injected = lk.inject_lora(copy.deepcopy(base), "all-linear", r=4, modules_to_save=["classifier"])
        assert _our_lora_layers(loaded) == _our_lora_layers(injected) == _peft_lora_layers(theirs)
        assert _trainable(loaded) == _trainable(injected) == _trainable(theirs)
        assert not any(name.startswith("classifier") for name in _our_lora_layers(loaded))
        _assert_parity(loaded, theirs, inputs, exact=True)


@PEFT_0_15
def test_whisper_conv_targets_are_refused_by_name_before_any_change(tmp_path):
    """PEFT puts a LoRA on Whisper's encoder Conv1d layers when named ("conv1"); a LoRALinear cannot stand in for a
    convolution. inject_lora and load_peft_adapter (of PEFT's file) refuse it naming the module and its class (the
    loader refused by the shape of the Conv factor, "expected 2 dimensions, got shape (4, 8, 3)", before), and the
    model is left as it was. "all-linear" leaves the convolutions out, as PEFT's does (test above)."""
    base = _base("whisper")
    theirs = _peft("whisper", r=4, target_modules=["conv1", "q_proj"])
    assert isinstance(theirs.base_model.model.model.encoder.conv1, peft.tuners.lora.LoraLayer)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    message = (r"module 'model.encoder.conv1'.* Conv1d; only nn.Linear and transformers' "
               r"Conv1D \(GPT-2's linear layer\) .*\(PEFT's LoRA on convolution and embedding layers is not supported")
    with pytest.raises(TypeError, match="inject_lora: " + message):
        lk.inject_lora(model, ["conv1", "q_proj"], r=4)
    with pytest.raises(ValueError, match="load_peft_adapter: the adapter targets " + message):
        lk.load_peft_adapter(model, tmp_path)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
