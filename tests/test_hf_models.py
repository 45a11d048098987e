"""Parity with PEFT on Hugging Face models built from configs with random weights (no downloads): a small Llama
(nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out). Same adapter in PEFT and in lora_kernels -> same logits and same
LoRA gradients; files round-trip both ways; PEFT's mixed-batch `adapter_names=` against set_batch_adapters;
torch.compile(fullgraph=True) of an injected Llama training step, and of generate with a static KV cache."""

import contextlib
import copy
import json
import warnings

import pytest
import torch
from conftest import assert_close, installed_version, tiny_llama_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_kernels as lk  # noqa: E402
from lora_kernels import peft_io  # noqa: E402
from lora_kernels.modules import LoRALinear, MultiLoRALinear  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

F32 = torch.float32
VOCAB = 128
PEFT = installed_version("peft")
TRANSFORMERS = installed_version("transformers")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def llama_with_biases():
    """The Llama above with biases on the attention and MLP projections (Qwen2-like), for PEFT's bias modes."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, attention_bias=True, mlp_bias=True)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(batch=3, seq=7):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))


def _peft(base, **kwargs):
    """A PeftModel of a copy of base with random non-zero A and B (init_lora_weights=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notices
        return get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs)).eval()


def _loss_and_lora_grads(model, ids, strip_adapter_name=False, biases_train=False):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name or (biases_train and name.endswith(".bias")), f"{name} should be frozen"
            if strip_adapter_name:  # a LoRA layer's bias is PEFT's `<layer>.base_layer.bias`
                name = name.removeprefix("base_model.model.").replace(".default.", ".").replace(".base_layer.", ".")
            grads[name] = p.grad
    return out.logits.detach(), grads


def _assert_parity(ours, theirs, ids, biases_train=False):
    logits, grads = _loss_and_lora_grads(ours, ids, biases_train=biases_train)
    ref_logits, ref_grads = _loss_and_lora_grads(theirs, ids, strip_adapter_name=True, biases_train=biases_train)
    assert_close(logits, ref_logits, F32, "logits")
    assert sorted(grads) == sorted(ref_grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], F32, f"grad {name}")
    return logits


LLAMA_CONFIGS = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "regex-patterns-rslora": dict(r=4, lora_alpha=6, target_modules=r".*\.(k_proj|o_proj|down_proj|up_proj)",
                                  rank_pattern={"down_proj": 2, "model.layers.1.self_attn.o_proj": 6},
                                  alpha_pattern={"k_proj": 3}, use_rslora=True),
    "layers-exclude-dropout": dict(r=3, lora_alpha=5, target_modules=["q_proj", "gate_proj", "v_proj"],
                                   layers_to_transform=[1], layers_pattern="layers", lora_dropout=0.1,
                                   exclude_modules=["model.layers.1.self_attn.v_proj"]),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(
    "exclude_modules" in config and PEFT < (0, 14), reason="peft < 0.14's LoraConfig has no exclude_modules"))
    for name, config in LLAMA_CONFIGS.items()])
def test_llama_parity_and_round_trip_both_ways(llama, tmp_path, name):
    ids = _ids()
    theirs = _peft(llama, **LLAMA_CONFIGS[name])
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=(name != "list"))  # "list" writes a .bin
    ours = lk.load_peft_adapter(copy.deepcopy(llama), tmp_path / "peft", backend="torch").eval()
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                             if isinstance(m, peft.tuners.lora.LoraLayer))
    logits = _assert_parity(ours, theirs, ids)
    assert (logits - llama(ids).logits).abs().max() > 1e-3  # the adapter does something

    lk.save_peft_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours", is_trainable=True).eval()
    _assert_parity(ours, back, ids)


def _train_steps(model, ids, steps=3):
    """A few SGD steps on the trainable parameters; returns their values before."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return before


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bias_modes_match_peft_both_ways(arch, bias, llama_with_biases, gpt2, tmp_path):
    """PEFT's bias="all" / "lora_only": the same parameters train, and trained biases go through the files both
    ways (PEFT's `<layer>.base_layer.bias` is our `<layer>.bias`), logits and gradients equal."""
    base = llama_with_biases if arch == "llama" else gpt2
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn"]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, bias=bias, fan_in_fan_out=(arch == "gpt2"))
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lk.inject_lora(copy.deepcopy(base), backend="torch", init_lora_weights=False, **kwargs)
    theirs = _peft(base, **kwargs)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".default", "")
                         for n, p in theirs.named_parameters() if p.requires_grad}
    other_biases = [n for n in trainable if n.endswith(".bias") and n.split(".")[-2] not in targets]
    assert bool(other_biases) == (bias == "all")  # GPT-2's LayerNorm biases among them

    def biases_changed(model, before):
        biases = [n for n in before if n.endswith(".bias")]
        return biases and all(not torch.equal(model.get_parameter(n), before[n]) for n in biases)

    # trained with PEFT, saved with save_pretrained, loaded into a fresh base model
    assert biases_changed(theirs, _train_steps(theirs.train(), ids))
    theirs.eval().save_pretrained(tmp_path / "peft")
    if bias == "lora_only" and PEFT < (0, 21):
        # peft < 0.21 saves no bias with bias="lora_only": it looks for `<layer>.bias`, but a LoRA layer's bias is
        # `<layer>.base_layer.bias`, so the trained biases are lost. The file loads as into PEFT: base biases, which
        # train, with a warning.
        with pytest.warns(UserWarning, match=r"has bias='lora_only' but holds no bias of its LoRA layers"):
            loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch").eval()
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True).eval()
        _assert_parity(loaded, reloaded, ids, biases_train=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reloaded(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
    else:
        loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch").eval()
        _assert_parity(loaded, theirs, ids, biases_train=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, theirs(input_ids=ids).logits, rtol=1e-6, atol=1e-6)

    # trained here, loaded with PeftModel.from_pretrained
    assert biases_changed(ours, _train_steps(ours.train(), ids))
    lk.save_peft_adapter(ours.eval(), tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
    _assert_parity(ours, back, ids, biases_train=True)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(ids).logits, rtol=1e-6, atol=1e-6)


def test_llama_injected_with_auto_backend_matches_peft_after_loading(llama, tmp_path):
    """inject_lora with default settings, then the PEFT file loaded into its LoRALinear layers (same rank)."""
    theirs = _peft(llama, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    theirs.save_pretrained(tmp_path)
    ours = lk.inject_lora(copy.deepcopy(llama), ["q_proj", "k_proj", "v_proj", "o_proj"]).eval()
    lk.load_peft_adapter(ours, tmp_path)
    _assert_parity(ours, theirs, _ids())
    with pytest.raises(ValueError, match="pass the base model, not a PeftModel"):
        lk.load_peft_adapter(theirs, tmp_path)


def test_llama_built_on_meta_injected_base_assigned_then_adapter_loaded_matches_peft(llama, tmp_path):
    """The low-memory flow: a Llama built on the meta device, inject_lora, the base checkpoint loaded with
    load_state_dict(assign=True) (the LoRA tensors, missing from it, stay meta), then a PEFT file. load_peft_adapter
    copied the file into the meta factors and kept nothing; now the factors are made on the base weight's device:
    the same logits and LoRA gradients as PEFT's low_cpu_mem_usage load of the file, the base frozen."""
    theirs = _peft(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path)
    with torch.device("meta"):
        ours = transformers.LlamaForCausalLM(llama.config)
    # non-persistent buffers (the rotary frequencies) are in no checkpoint: accelerate's init_empty_weights keeps
    # buffers off the meta device, as this does
    ours.model.rotary_emb = copy.deepcopy(llama.model.rotary_emb)
    lk.inject_lora(ours, ["q_proj", "v_proj"], r=4, backend="torch")
    checkpoint = {key: tensor.clone() for key, tensor in llama.state_dict().items()}
    missing = ours.load_state_dict(checkpoint, assign=True, strict=False).missing_keys
    assert missing and all(".lora_" in key for key in missing)
    lk.load_peft_adapter(ours, tmp_path)
    assert not any(p.is_meta for p in ours.parameters())
    reference = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path, is_trainable=True, low_cpu_mem_usage=True)
    _assert_parity(ours.eval(), reference.eval(), _ids())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_selects_what_peft_selects(arch, llama, gpt2):
    base = llama if arch == "llama" else gpt2
    theirs = _peft(base, r=2, target_modules="all-linear", fan_in_fan_out=(arch == "gpt2"))
    expected = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lk.inject_lora(copy.deepcopy(base), "all-linear", r=2, fan_in_fan_out=(arch == "gpt2"))
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear)) == expected
    assert "lm_head" not in expected


def test_sequence_classification_head_in_modules_to_save_both_ways(tmp_path):
    """PEFT's task_type="SEQ_CLS" adds the classification head ("classifier", "score") to modules_to_save by
    itself: the head trains whole and is saved beside the adapter. Both ways, with the head's gradient."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, num_labels=3, pad_token_id=2)
    base = transformers.LlamaForSequenceClassification(config).eval()
    theirs = _peft(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.add_(1.0)  # as if trained
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]
    # "classifier" selects nothing in a Llama: fine, as in PEFT; PEFT 0.22 adds DistilBERT's "pre_classifier" too
    assert sorted(saved) == (["classifier", "pre_classifier", "score"] if PEFT >= (0, 22) else ["classifier", "score"])

    ours = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft", backend="torch").eval()
    ids, labels = _ids(), torch.tensor([0, 2, 1])

    def logits_and_grads(model, strip):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        grads = {name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                 .replace(".default", "") if strip else name: p.grad
                 for name, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    for reference in (theirs, None):
        if reference is None:  # and back: our file into PEFT
            lk.save_peft_adapter(ours, tmp_path / "ours", task_type="SEQ_CLS")
            reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
        logits, grads = logits_and_grads(ours, strip=False)
        ref_logits, ref_grads = logits_and_grads(reference, strip=True)
        assert_close(logits, ref_logits, F32, "logits")
        assert sorted(grads) == sorted(ref_grads) and "score.weight" in grads
        for name, grad in grads.items():
            assert_close(grad, ref_grads[name], F32, f"grad {name}")
    assert (logits - base(input_ids=ids).logits).abs().max() > 1e-2  # the head and the adapter do something


@pytest.mark.parametrize("task_type, model_class, head", [
    ("SEQ_CLS", "LlamaForSequenceClassification", "score"),
    ("TOKEN_CLS", "LlamaForTokenClassification", "score"),
    ("QUESTION_ANS", "LlamaForQuestionAnswering", "qa_outputs")])
def test_save_refuses_a_task_type_whose_head_the_file_would_leave_out(tmp_path, task_type, model_class, head):
    """PEFT's task classes add the task's head to modules_to_save when they load a file of that task type, then
    require its weights in the file: a file saved here with task_type="SEQ_CLS" and the head neither in
    modules_to_save nor anywhere failed in PeftModel.from_pretrained with a KeyError, and one with a LoRA on the head
    would load without that LoRA (PEFT targets no modules_to_save module). Both refused by name, nothing written;
    with the head in modules_to_save the file loads in PEFT and computes the same."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, num_labels=3, pad_token_id=0)
    base = getattr(transformers, model_class)(config).eval()
    left_out = lk.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, init_lora_weights="gaussian")
    with pytest.raises(ValueError, match=rf"save_peft_adapter: task_type='{task_type}' makes PEFT add .* the model's "
                                         rf"'{head}' whole and requires its weights in the file, .* "
                                         rf"modules_to_save=\['{head}'\]"):
        lk.save_peft_adapter(left_out, tmp_path / "refused", task_type=task_type)
    lora_on_head = lk.inject_lora(copy.deepcopy(base), ["q_proj", head], r=4)
    with pytest.raises(ValueError, match=rf"task_type='{task_type}' .* it holds the LoRA layer '{head}', which PEFT "
                                         r"would drop"):
        lk.save_peft_adapter(lora_on_head, tmp_path / "refused", task_type=task_type)
    assert not (tmp_path / "refused").exists()
    # the refusal is PEFT's: the first file, written without a task type and given it afterwards, does not load
    lk.save_peft_adapter(left_out, tmp_path / "edited")
    config_file = tmp_path / "edited" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": task_type}))
    with pytest.raises(KeyError, match=head):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "edited")
    # such a file loaded here (an older lora_kernels wrote them) gives its task type to the next save, which
    # task_type=None cannot undo (None takes the loaded one): written as null instead, with a warning
    loaded = lk.load_peft_adapter(copy.deepcopy(base), tmp_path / "edited")
    with pytest.warns(UserWarning, match=rf"the task type of the adapter file load_peft_adapter read is not written: "
                                         rf"task_type='{task_type}' makes PEFT .* the file's task_type is null"):
        lk.save_peft_adapter(loaded, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["task_type"] is None
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resaved")
    ours = lk.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, init_lora_weights="gaussian",
                          modules_to_save=[head])
    with torch.no_grad():
        getattr(ours, head).weight.add_(0.5)  # as if trained
    lk.save_peft_adapter(ours, tmp_path / "ours", task_type=task_type)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert type(theirs).__name__ != "PeftModel"  # the task's class
    ids = _ids()
    for name in ("logits", "start_logits"):
        ours_out, theirs_out = getattr(ours(input_ids=ids), name, None), getattr(theirs(input_ids=ids), name, None)
        if ours_out is not None:
            assert_close(ours_out.detach(), theirs_out.detach(), torch.float32, name)


def test_distilbert_pre_classifier_is_a_target_beside_the_classifier_head(tmp_path):
    """DistilBERT's pre_classifier ends with "classifier": modules_to_save=["classifier"] leaves it out (whole name
    components, PEFT >= 0.22's rule), so "all-linear" targets it, with a warning naming it; the same model as PEFT
    0.22's, both ways. PEFT 0.16 to 0.21 selected it by its suffix and refused it as a LoRA target (and refuse the
    file); inject_lora refused it too, before PEFT 0.22."""
    torch.manual_seed(0)
    base = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=VOCAB, num_labels=3)).eval()
    if (0, 16) <= PEFT < (0, 22):  # peft < 0.16 accepts it (checked: 0.13, 0.14, 0.15)
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
            _peft(base, target_modules="all-linear", modules_to_save=["classifier"])
    with pytest.warns(UserWarning, match=r"modules_to_save \['classifier'\] selects modules by whole name components "
                                         r".*\['pre_classifier'\] end with an entry but are not selected"):
        ours = lk.inject_lora(copy.deepcopy(base), "all-linear", modules_to_save=["classifier"],
                              init_lora_weights=False).eval()
    assert isinstance(ours.pre_classifier, LoRALinear) and ours.classifier.weight.requires_grad
    with torch.no_grad():
        ours.classifier.weight.add_(0.5)  # as if trained
    with pytest.warns(UserWarning, match=r"PEFT <= 0.21 cannot read this file: .* so also \['pre_classifier'\]"):
        lk.save_peft_adapter(ours, tmp_path)
    if (0, 16) <= PEFT < (0, 22):  # what the warning says
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
            PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert_close(lk.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()(input_ids=ids).logits, expected,
                     F32, "our file read by us")
        if PEFT >= (0, 22):
            theirs = _peft(base, target_modules="all-linear", modules_to_save=["classifier"])
            assert ({n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
                    == {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)})
            back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
            assert_close(back(input_ids=ids).logits, expected, F32, "our file read by PEFT")


def test_a_smaller_adapter_than_asked_for_gets_a_warning(llama):
    """transformers 5 fuses Mixtral's experts into 3-D Parameters: PEFT adapts them (target_parameters) under
    "all-linear" and for the transformers-4 names ("w2"), lora_kernels cannot. Both warn, naming what is left out;
    ordinary targets do not warn. Under transformers 4 the experts are nn.Linear modules (w1/w2/w3): wrapped, no
    warning."""
    torch.manual_seed(0)
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2))
    if TRANSFORMERS >= (5, 0):
        with pytest.warns(UserWarning, match=r"'all-linear' adapts nn.Linear/Conv1D layers only; the model's fused "
                                             r"expert weights \(\['model.layers.0.mlp.experts.gate_up_proj'.*"
                                             r"target_parameters"):
            lk.inject_lora(copy.deepcopy(mixtral), "all-linear")
        with pytest.warns(UserWarning, match=r"target_modules entries \['w2', 'w1'\] match no module of the model "
                                             r"\(the others do\).*experts are fused 3-D Parameters"):
            model = lk.inject_lora(copy.deepcopy(mixtral), ["q_proj", "w2", "w1"])
        assert {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, LoRALinear)} == {"q_proj"}
    else:  # transformers 4: block_sparse_moe.experts.<i>.w1/w2/w3 are nn.Linear
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = lk.inject_lora(copy.deepcopy(mixtral), ["q_proj", "w2", "w1"])
            lk.inject_lora(copy.deepcopy(mixtral), "all-linear")
        wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        assert {n.rpartition(".")[2] for n in wrapped} == {"q_proj", "w1", "w2"}
        assert sum(n.endswith(".w2") for n in wrapped) == 2 * 4  # every expert of both layers
    with pytest.warns(UserWarning, match=r"prepare_multi_adapter: target_modules entries \['nope'\]"):
        lk.prepare_multi_adapter(copy.deepcopy(llama), ["q_proj", "nope"], max_adapters=2, max_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.inject_lora(copy.deepcopy(mixtral), ["q_proj", "v_proj"])
        lk.inject_lora(copy.deepcopy(llama), "all-linear")
        lk.inject_lora(copy.deepcopy(llama), ["q_proj", "v_proj", "gate_proj"])


@pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="transformers 4 keeps the experts as nn.Linear modules")
def test_saving_a_moe_model_s_dense_down_proj_warns_that_peft_reads_it_as_the_experts(tmp_path):
    """Qwen3-MoE with a dense layer (mlp_only_layers) keeps nn.Linear down_proj layers beside the fused experts. PEFT
    0.21 with transformers 5 rewrites a target_modules "down_proj" of such a model type into target_parameters on
    the experts: PeftModel.from_pretrained of our file put new LoRAs there and dropped the factors, with only a
    missing-keys warning (helper 260). save_peft_adapter warns; load_peft_adapter and PEFT 0.22 read the file as
    written. Qwen2-MoE itself, which PEFT reads as written, gets no warning."""
    def qwen3_moe():
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=48, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
            vocab_size=VOCAB)).eval()  # float32: the fused experts' grouped_mm takes no float64

    ours = lk.inject_lora(qwen3_moe(), ["q_proj", "down_proj"], r=2, init_lora_weights=False).eval()
    assert [n for n, m in ours.named_modules() if isinstance(m, LoRALinear) and n.endswith("down_proj")] == [
        "model.layers.0.mlp.down_proj"]
    with pytest.warns(UserWarning, match=r"^save_peft_adapter: target_modules names \['down_proj'\], which PEFT "
                                         r"\(0\.21, with transformers 5\) reads as this qwen3_moe model's fused "
                                         r"experts"):
        lk.save_peft_adapter(ours, tmp_path)
    # a regex target_modules (written where names would select other modules too) is read by the modules it selects
    with pytest.warns(UserWarning, match=r"target_modules names \['down_proj'\], which PEFT"):
        peft_io._warn_if_peft_reads_targets_as_experts("save_peft_adapter", ours, r"model\.layers\.0\.mlp\.down_proj")
    ids = _ids()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(lk.load_peft_adapter(qwen3_moe(), tmp_path).eval()(input_ids=ids).logits, expected)
        if PEFT >= (0, 21):  # what the warning says
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = PeftModel.from_pretrained(qwen3_moe(), tmp_path).eval()
            if PEFT >= (0, 22):
                torch.testing.assert_close(theirs(input_ids=ids).logits, expected)
            else:
                assert (theirs(input_ids=ids).logits - expected).abs().max() > 1e-3
    torch.manual_seed(0)
    qwen2_moe = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        vocab_size=VOCAB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.save_peft_adapter(lk.inject_lora(qwen2_moe, ["q_proj", "down_proj"], r=2), tmp_path / "qwen2_moe")


def test_gpt2_conv1d_parity_and_round_trip_both_ways(gpt2, tmp_path):
    ids = _ids()
    theirs = _peft(gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_peft_adapter(copy.deepcopy(gpt2), tmp_path / "peft", backend="torch").eval()
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out and tuple(layer.weight.shape) == (64, 192)
    assert isinstance(ours.transformer.h[1].mlp.c_proj, LoRALinear)  # "c_proj" selects attn.c_proj and mlp.c_proj
    logits = _assert_parity(ours, theirs, ids)
    assert (logits - gpt2(ids).logits).abs().max() > 1e-3

    lk.save_peft_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    back = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours", is_trainable=True).eval()
    _assert_parity(ours, back, ids)


def test_gpt2_conv1d_injection_keeps_the_base_state_dict(gpt2):
    model = copy.deepcopy(gpt2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # without fan_in_fan_out a Conv1D is still wrapped as one, with PEFT's warning (load_peft_adapter does the same)
    # one warning for every layer, as PEFT's
    with pytest.warns(UserWarning, match="^inject_lora: 'transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn' "
                                         "are transformers Conv1D .* wrapping them with fan_in_fan_out=True") as caught:
        switched = lk.inject_lora(copy.deepcopy(gpt2), ["c_attn"])
    assert len([w for w in caught if "Conv1D" in str(w.message)]) == 1
    assert switched.transformer.h[0].attn.c_attn.fan_in_fan_out
    ids = _ids()
    ref = gpt2(ids).logits
    lk.inject_lora(model, ["c_attn", "c_fc"], r=4, fan_in_fan_out=True)
    state = model.state_dict()
    for key, value in before.items():  # same keys, shapes and values: a GPT-2 checkpoint still loads
        assert torch.equal(state[key], value), key
    assert_close(model(ids).logits, ref, F32, "fresh adapter is the identity")
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters(False)
    with torch.no_grad():
        unmerged = model(ids).logits
        model.transformer.h[0].attn.c_attn.merge()
        assert_close(model(ids).logits, unmerged, F32, "merged")
        model.transformer.h[0].attn.c_attn.unmerge()
        lk.merge_and_unload(model)
        assert type(model.transformer.h[0].attn.c_attn) is Conv1D
        assert_close(model(ids).logits, unmerged, F32, "merge_and_unload")
    with pytest.warns(UserWarning) as caught:  # GPT-2's lm_head is tied to the token embedding
        lk.inject_lora(copy.deepcopy(gpt2), ["c_attn", "lm_head"], fan_in_fan_out=True)
    messages = [str(w.message) for w in caught]
    assert any("'lm_head' is an nn.Linear" in m for m in messages), messages
    assert any("target 'lm_head' is tied to 'transformer.wte.weight'" in m for m in messages), messages
    assert not any("Conv1D" in m for m in messages), messages  # c_attn agrees with fan_in_fan_out=True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft_adapter_names(arch, llama, gpt2, tmp_path):
    base = llama if arch == "llama" else gpt2
    if arch == "llama":
        configs = {"fr": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                   "de": dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True)}
        union = ["q_proj", "v_proj", "o_proj", "down_proj"]
    else:
        configs = {"fr": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                   "de": dict(r=6, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
        union = ["c_attn", "c_fc"]
    for name, config in configs.items():
        _peft(base, **config).save_pretrained(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fr", adapter_name="fr")
        theirs.load_adapter(tmp_path / "de", adapter_name="de")
    theirs.eval()
    ours = lk.prepare_multi_adapter(copy.deepcopy(base), union, max_adapters=4, max_rank=8, backend="torch").eval()
    for name in configs:
        lk.load_peft_adapter(ours, tmp_path / name, adapter_name=name)
    assert ours.lora_adapter_slots == {"fr": 0, "de": 1}
    assert sum(isinstance(m, MultiLoRALinear) for m in ours.modules()) == 2 * len(union)

    ids = _ids(batch=5)
    names = ["de", "__base__", "fr", "fr", "de"]
    with torch.no_grad():
        ref = theirs(input_ids=ids, adapter_names=names).logits
        with lk.set_batch_adapters(ours, names):
            mixed = ours(input_ids=ids).logits
    assert_close(mixed, ref, F32, "mixed-batch logits")
    assert_close(mixed[1], base(ids[1:2]).logits[0], F32, "__base__ row")
    assert (mixed[0] - mixed[2]).abs().max() > 0 and (ref[2] - base(ids[2:3]).logits[0]).abs().max() > 1e-3


def test_torch_compile_fullgraph_training_step_of_an_injected_llama(llama):
    """The whole HF Llama forward (attention, RoPE, loss) with our layers compiles as ONE graph (fullgraph=True
    raises on any graph break, ours or HF's); backward runs the compiled graph. Checked: loss and LoRA gradients
    equal eager's, and an optimizer step changes the LoRA weights only. backend="auto" is the inject_lora default
    (the C++ CPU kernels when built, else torch ops); aot_eager keeps the compile fast."""
    torch._dynamo.reset()
    model = lk.inject_lora(copy.deepcopy(llama), ["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights=False)
    model.train()
    ids = _ids(batch=2, seq=6)
    eager_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert_close(loss, eager_loss, F32, "compiled loss")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, eager_grads[name], F32, f"compiled grad {name}")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["inject", "load"])
@pytest.mark.filterwarnings("ignore:.*target_modules entries .* match no module:UserWarning")  # both versions' names
def test_reentrant_checkpointing_enabled_before_wrapping_trains_the_adapter(how, tmp_path):
    """PEFT's recipe `model.gradient_checkpointing_enable(); get_peft_model(model, ...)` on a model whose
    checkpointing does not mark its inputs as requiring grad (ViT): with the embeddings frozen, reentrant
    checkpointing back-propagates through no segment and every LoRA gradient was zero. Like PEFT, wrapping a model
    with checkpointing on now enables its input gradients."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=16, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config)
    targets = ["query", "value", "q_proj", "v_proj"]  # transformers 4 / 5 names
    if how == "load":
        lk.save_peft_adapter(lk.inject_lora(copy.deepcopy(model), targets, r=4, init_lora_weights=False), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the flag is read under its transformers 5 name
        if how == "inject":
            lk.inject_lora(model, targets, r=4, init_lora_weights=False)
        else:
            lk.load_peft_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
    hooks = model.get_input_embeddings()._forward_hooks  # transformers 4 keeps no list of its hooks
    before = len(hooks)
    lk.inject_lora(model, ["key", "k_proj"], r=4)  # a second wrap does not register a second hook
    assert len(hooks) == before == 1
    plain = transformers.ViTForImageClassification(config)
    lk.inject_lora(plain, targets, r=4)  # without checkpointing, as PEFT: no hook
    assert not plain.get_input_embeddings()._forward_hooks


def test_falcon_linear_layers_are_wrapped_like_nn_linear(tmp_path):
    """transformers' FalconLinear (every Falcon projection) is an nn.Linear subclass whose own forward computes
    F.linear: loaded from a PEFT file with Falcon's default target (query_key_value) and injected, it matches PEFT."""
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=False, multi_query=True)
    torch.manual_seed(0)
    falcon = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = _ids()
    theirs = _peft(falcon, r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"])
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_peft_adapter(copy.deepcopy(falcon), tmp_path / "peft", backend="torch").eval()
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 4
    _assert_parity(ours, theirs, ids)
    injected = lk.inject_lora(copy.deepcopy(falcon), ["query_key_value"], r=4)
    assert sum(isinstance(m, LoRALinear) for m in injected.modules()) == 2
    assert_close(injected(ids).logits, falcon(ids).logits, F32, "a fresh adapter is the identity")


# ------------------------------------------------------------------ README claims, checked as written (helper79)

def test_auto_peft_model_loads_a_file_saved_with_or_loaded_with_task_type_causal_lm(llama, tmp_path):
    """README: for AutoPeftModelForCausalLM pass task_type="CAUSAL_LM" to save_peft_adapter, which a loaded file's
    task type also sets. AutoPeftModelForCausalLM then loads the base model the file names (the model's own
    name_or_path) with the adapter, computing our logits; a file saved without a task type it refuses."""
    from peft import AutoPeftModelForCausalLM
    llama.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices while saving and loading
        model = lk.inject_lora(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), ["q_proj", "v_proj"],
                               r=4, init_lora_weights=False).eval()
        lk.save_peft_adapter(model, tmp_path / "untyped")
        with pytest.raises(ValueError, match="Cannot infer the auto class from the config"):
            AutoPeftModelForCausalLM.from_pretrained(tmp_path / "untyped")
        lk.save_peft_adapter(model, tmp_path / "causal", task_type="CAUSAL_LM")
        reloaded = lk.load_peft_adapter(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "causal")
        lk.save_peft_adapter(reloaded, tmp_path / "again")  # no task_type passed: the loaded file's
        ids = _ids()
        for saved in ("causal", "again"):
            theirs = AutoPeftModelForCausalLM.from_pretrained(tmp_path / saved).eval()
            assert type(theirs).__name__ == "PeftModelForCausalLM"
            assert_close(theirs(ids).logits, model(ids).logits, F32, saved)


@pytest.mark.slow
def test_generate_with_a_static_cache_and_a_compiled_forward(llama, tmp_path):
    """transformers' fast decode: cache_implementation="static" and model.forward = torch.compile(model.forward,
    fullgraph=True), greedy, for prompts of three lengths. One adapter (made with inject_lora, B non-zero, loaded as
    LoRALinear layers) and two adapters in a mixed batch (set_batch_adapters, "__base__" rows, a new mix every call)
    generate PEFT's tokens, with no graph break and as many graphs as the merged plain model compiles (the prefill at
    the first length, the decode step, a prefill dynamic in the length): none per token, none per new mix of as many
    names (each new mix compiled its prefill and decode again, reaching dynamo's recompile limit of 8 by the 4th mix,
    past which fullgraph=True raises FailOnRecompileLimitHit). aot_eager: the graph count is dynamo's; Inductor
    checked by hand."""
    options = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", pad_token_id=1)
    prompts = [torch.randint(2, VOCAB, (3, length), generator=torch.Generator().manual_seed(length))
               for length in (5, 9, 7)]
    configs = {"fr": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "de": dict(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True)}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        adapter = lk.inject_lora(copy.deepcopy(llama), init_lora_weights=False, **config)
        for module in adapter.modules():
            if isinstance(module, LoRALinear):  # large enough to change the greedy tokens
                module.lora_B.weight.data.mul_(20)
        lk.save_peft_adapter(adapter, tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "fr", adapter_name="fr")
        theirs.load_adapter(tmp_path / "de", adapter_name="de")
    theirs.eval()
    base = copy.deepcopy(llama)  # generate may keep its static cache on the model: not on the shared fixture
    base_ids = [base.generate(prompt, **options) for prompt in prompts]

    def compiled_generate(model, runs):
        """runs: [(prompt, mix or None, expected ids)]; the number of graphs compiled."""
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        for prompt, mix, expected in runs:
            with lk.set_batch_adapters(model, mix) if mix else contextlib.nullcontext():
                assert torch.equal(model.generate(prompt, **options), expected), (prompt.shape, mix)
        assert not torch._dynamo.utils.counters["graph_break"]
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    with torch.no_grad():
        theirs.set_adapter("fr")
        single_ids = [theirs.generate(input_ids=prompt, **options) for prompt in prompts]
        assert all(not torch.equal(ids, plain) for ids, plain in zip(single_ids, base_ids))
        merged = lk.merge_and_unload(lk.load_peft_adapter(copy.deepcopy(llama), tmp_path / "fr"))
        plain_graphs = compiled_generate(merged, list(zip(prompts, [None] * 3, single_ids)))
        single = lk.load_peft_adapter(copy.deepcopy(llama), tmp_path / "fr").eval()
        assert compiled_generate(single, list(zip(prompts, [None] * 3, single_ids))) == plain_graphs

        multi = lk.prepare_multi_adapter(copy.deepcopy(llama), ["q_proj", "v_proj", "o_proj", "down_proj"],
                                         max_adapters=3, max_rank=8).eval()
        for name in configs:
            lk.load_peft_adapter(multi, tmp_path / name, adapter_name=name)
        runs = []
        for mix, prompt in zip([["de", "__base__", "fr"], ["fr", "fr", "de"], ["__base__", "de", "fr"],
                                ["de", "de", "__base__"]], prompts + prompts[:1]):
            runs.append((prompt, mix, theirs.generate(input_ids=prompt, adapter_names=mix, **options)))
        assert compiled_generate(multi, runs) == plain_graphs
    torch._dynamo.reset()
