"""README "With transformers' Trainer", checked with transformers' Trainer itself on CPU (a tiny random Llama, an
in-memory dataset, no downloads): an injected model trains as is (only the adapter changes, the same losses as PEFT
step by step), with gradient checkpointing (reentrant or not), its checkpoints hold the whole model with the
lora_A/lora_B keys and resume_from_checkpoint continues exactly, from_pretrained drops the adapter keys (listed as
unexpected) and gives the base model, and save_peft_adapter(trainer.model, ...) gives PEFT's adapter."""

import copy
import dataclasses
import logging
import os
import pickle
import sys
import traceback
import warnings

import pytest
import torch
from conftest import assert_close, tiny_llama_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")  # Trainer's requirement

import lora_kernels as lk  # noqa: E402
from lora_kernels.backends import available_backends, resolve_backend  # noqa: E402
from lora_kernels.modules import LoRALinear  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

F32 = torch.float32
VOCAB = 128
TARGETS = ["q_proj", "v_proj"]
LORA = dict(r=4, lora_alpha=8)
STEPS = 6
PROBE = "model.layers.0.self_attn.q_proj"  # a LoRA layer whose forward calls are counted


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=32, intermediate_size=48, vocab_size=VOCAB,
                               initializer_range=0.1)  # weights large enough for q/v adapters to matter
    return transformers.LlamaForCausalLM(config).eval()


def _data():
    """8 sequences of 8 tokens: 2 batches of 4 per epoch, so 6 steps see each sequence 3 times (a loss that falls)."""
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def _inject(base, backend="auto", seed=1, checkpointing_before=None):
    """A copy of base injected with random non-zero A and B (init_lora_weights=False), drawn from `seed`;
    checkpointing_before: the use_reentrant of activation checkpointing switched on before injecting."""
    model = copy.deepcopy(base)
    if checkpointing_before is not None:
        _enable_checkpointing(model, checkpointing_before)
    torch.manual_seed(seed)
    return lk.inject_lora(model, TARGETS, init_lora_weights=False, backend=backend, **LORA)


def _enable_checkpointing(model, use_reentrant):
    """model.gradient_checkpointing_enable, which transformers 5 renamed activation_checkpointing_enable."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _marks_input_grads_itself(base):
    """Whether transformers' own checkpointing switch marks a text model's input embeddings as requiring grad
    (transformers 5 does; 4.45 did so only for its own PEFT integration): the forward hooks it leaves on them."""
    model = copy.deepcopy(base)
    embeddings = model.get_input_embeddings()
    hooks = len(embeddings._forward_hooks)
    _enable_checkpointing(model, True)
    return len(embeddings._forward_hooks) > hooks


def _peft_like(base, ours):
    """PEFT's model of the same base with the same LoraConfig and ours' A and B."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT reads the deprecated is_gradient_checkpointing
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, init_lora_weights=False,
                                                                **LORA))
    copied = 0
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.copy_(ours.get_parameter(_our_name(name)))
                copied += 1
    assert copied == 4 * len(TARGETS)  # 2 layers x targets x (A, B)
    return theirs


def _our_name(peft_name):
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def _checkpointing(use_reentrant):
    """TrainingArguments turning checkpointing on: transformers 5 renamed gradient_checkpointing(_kwargs) to
    activation_checkpointing(_kwargs), keeping the old names as deprecated aliases."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": use_reentrant}}


class _Recorder(TrainerCallback):
    """Per optimizer step: the gradients of the trainable parameters just before the step, how many times the probe
    layer ran forward (2 under checkpointing: the recomputation) and, after the step, the trainable values."""

    def __init__(self, model):
        self.grads, self.forwards, self.values = [], [], {}
        self._calls = 0
        probe = next(module for name, module in model.named_modules() if name.endswith(PROBE))  # PEFT's too
        probe.register_forward_hook(self._count)
        self._model = model

    def _count(self, *_):
        self._calls += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({name: None if p.grad is None else p.grad.detach().clone()
                           for name, p in self._model.named_parameters() if p.requires_grad})
        self.forwards.append(self._calls)
        self._calls = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.values[state.global_step] = {name: p.detach().clone() for name, p in self._model.named_parameters()
                                          if p.requires_grad}


def _train(model, out, resume=None, **overrides):
    """Trainer's defaults (AdamW, linear decay, clipping at 1.0) for STEPS steps of batch 4, a loss logged per step;
    returns the trainer and its recorder."""
    settings = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=STEPS,
                    learning_rate=5e-2, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    settings.update(overrides)
    recorder = _Recorder(model)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=_data(), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def _losses(trainer):
    """{step: logged training loss}."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def _dataset_loss(model):
    was_training = model.training
    model.eval()
    ids = torch.stack([row["input_ids"] for row in _data()])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def _logits(model):
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture
def lk_warnings(monkeypatch):
    """The warnings that lora_kernels' own code issues (found by the calling module, as their stacklevel points
    elsewhere); each test asserts there are none."""
    caught = []
    warn = warnings.warn

    def recording_warn(message, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("lora_kernels"):
            caught.append(str(message))
        return warn(message, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", recording_warn)
    return caught


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_trainer_trains_only_the_adapter_and_matches_peft_step_by_step(base, tmp_path, backend, lk_warnings):
    if backend == "auto" and "cpu" in available_backends("cpu"):
        assert resolve_backend("auto", torch.device("cpu"), "lora_linear") == "cpu"  # the C++ kernels run here
    ours = _inject(base, backend)
    theirs = _peft_like(base, ours)
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    loss_before = _dataset_loss(ours)

    trainer, recorder = _train(ours, tmp_path / "ours")
    assert trainer.model is ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference, _ = _train(theirs, tmp_path / "peft")

    # only the adapter trained: every base weight bit-identical, every factor changed
    after = ours.state_dict()
    assert sorted(after) == sorted(before)
    lora_keys = sorted(name for name in after if ".lora_A." in name or ".lora_B." in name)
    assert len(lora_keys) == 4 * len(TARGETS)
    assert sorted(name for name, p in ours.named_parameters() if p.requires_grad) == lora_keys
    for name, tensor in after.items():
        if name in lora_keys:
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"base weight {name} changed"
    # the loss fell, logged per step and over the whole dataset
    losses = _losses(trainer)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.2
    assert _dataset_loss(ours) < loss_before - 0.2

    # PEFT: the same losses at every step and the same trained factors
    reference_losses = _losses(reference)
    assert sorted(reference_losses) == sorted(losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-6, abs=0), f"step {step}"
    trained = dict(theirs.named_parameters())
    for name, parameter in trained.items():
        if "lora_" in name:
            assert_close(after[_our_name(name)], parameter, F32, name)
    assert not lk_warnings


@pytest.mark.parametrize("before", [False, True], ids=["switched-on-by-trainer", "switched-on-before-inject"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_trains_the_adapter_with_the_same_losses(base, tmp_path, use_reentrant, before,
                                                                        lk_warnings):
    """Trainer switches checkpointing on when training starts, after the injection. Reentrant checkpointing needs
    an input that requires grad; transformers 5 marks a text model's input embeddings itself, transformers 4 did
    not, and there reentrant checkpointing switched on by Trainer trains no adapter, as with PEFT. Switching it on
    before inject_lora (PEFT's recipe: then inject_lora marks them, as get_peft_model does) works on both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: the deprecated gradient_checkpointing names
        model = _inject(base, checkpointing_before=use_reentrant if before else None)
        if use_reentrant and not before and not _marks_input_grads_itself(base):
            with pytest.raises(RuntimeError, match="does not require grad"):
                _train(model, tmp_path / "checkpointed", **_checkpointing(use_reentrant))
            with pytest.raises(RuntimeError, match="does not require grad"):  # PEFT alike
                _train(_peft_like(base, _inject(base)), tmp_path / "peft", **_checkpointing(use_reentrant))
            assert not lk_warnings
            return
        checkpointed, record = _train(model, tmp_path / "checkpointed", **_checkpointing(use_reentrant))
    plain, plain_record = _train(_inject(base), tmp_path / "plain")

    assert plain_record.forwards == [1] * STEPS
    assert record.forwards == [2] * STEPS  # checkpointing was on: each LoRA layer ran again in backward
    for step, grads in enumerate(record.grads, 1):
        assert sorted(grads) == sorted(plain_record.grads[step - 1])
        for name, grad in grads.items():
            assert grad is not None and grad.abs().max() > 0, f"step {step}: no gradient for {name}"
            assert_close(grad, plain_record.grads[step - 1][name], F32, f"step {step}: grad {name}")
    losses, plain_losses = _losses(checkpointed), _losses(plain)
    assert sorted(losses) == sorted(plain_losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(plain_losses[step], rel=1e-6, abs=0), f"step {step}"
    for name, value in record.values[STEPS].items():
        assert_close(value, plain_record.values[STEPS][name], F32, name)
    assert not lk_warnings


@pytest.fixture(scope="module")
def checkpointed_run(base, tmp_path_factory):
    """STEPS steps of an injected model (the default backend) saving a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("run")
    model = _inject(base)
    trainer, recorder = _train(model, out, save_strategy="steps", save_steps=3)
    return out, trainer, recorder


def test_checkpoints_hold_the_adapter_and_resume_where_the_run_left_off(base, checkpointed_run, tmp_path,
                                                                        lk_warnings):
    out, trainer, recorder = checkpointed_run
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")) == ["checkpoint-3",
                                                                                          "checkpoint-6"]
    from safetensors.torch import load_file
    saved = load_file(out / "checkpoint-3" / "model.safetensors")
    state = trainer.model.state_dict()
    assert sorted(saved) == sorted(state)  # the whole model, the adapter included
    lora_keys = sorted(name for name in saved if ".lora_A." in name or ".lora_B." in name)
    assert lora_keys == sorted(recorder.values[3])  # exactly the trained factors
    for name in lora_keys:
        assert torch.equal(saved[name], recorder.values[3][name]), name  # as they were after step 3
    base_state = base.state_dict()
    for name, tensor in saved.items():
        if name not in lora_keys:
            assert torch.equal(tensor, base_state[name]), name

    fresh = _inject(base, seed=2)  # other random factors: only the checkpoint can bring the run's back
    assert not torch.equal(fresh.get_parameter(lora_keys[0]), saved[lora_keys[0]])
    try:
        resumed, _ = _train(fresh, tmp_path / "resumed", resume=str(out / "checkpoint-3"))
    except pickle.UnpicklingError as exc:  # transformers 4.45's Trainer, any model: torch >= 2.6's torch.load
        if "_load_rng_state" not in [frame.name for frame in traceback.extract_tb(exc.__traceback__)]:
            raise
        pytest.skip(f"transformers {transformers.__version__}'s Trainer cannot read its own rng_state.pth under "
                    f"torch {torch.__version__} (torch.load's weights_only default): {exc}".splitlines()[0])
    assert resumed.state.global_step == STEPS
    finished = fresh.state_dict()
    assert sorted(finished) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(finished[name], tensor), f"{name} differs from the uninterrupted run"
    losses, uninterrupted = _losses(resumed), _losses(trainer)
    for step in range(4, STEPS + 1):
        assert losses[step] == uninterrupted[step], f"step {step}"
    assert not lk_warnings


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_from_pretrained_on_a_checkpoint_drops_the_adapter_keys_and_gives_the_base_model(base, checkpointed_run):
    out, trainer, _ = checkpointed_run
    lora_keys = sorted(name for name in trainer.model.state_dict() if ".lora_A." in name or ".lora_B." in name)
    handler = _Collect()
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        loaded, info = transformers.LlamaForCausalLM.from_pretrained(out / "checkpoint-3", output_loading_info=True)
    finally:
        library_logger.removeHandler(handler)

    assert type(loaded) is transformers.LlamaForCausalLM
    assert not any(isinstance(module, LoRALinear) for module in loaded.modules())
    assert sorted(info["unexpected_keys"]) == lora_keys  # dropped, listed as unexpected
    assert not info["missing_keys"] and not info["mismatched_keys"]
    reported = "\n".join(handler.messages)  # and the load's warning names them
    assert "lora_A" in reported and "lora_B" in reported
    assert sorted(loaded.state_dict()) == sorted(base.state_dict())
    for name, tensor in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    logits = _logits(loaded)
    assert torch.equal(logits, _logits(base))  # the base model
    assert (logits - _logits(copy.deepcopy(trainer.model))).abs().max() > 1e-3  # not the trained one


def test_save_peft_adapter_of_the_trained_model_loads_into_peft(base, checkpointed_run, tmp_path, lk_warnings):
    _, trainer, _ = checkpointed_run
    trained = copy.deepcopy(trainer.model)
    lk.save_peft_adapter(trainer.model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    logits = _logits(trained)
    assert_close(_logits(theirs), logits, F32, "logits")
    assert (logits - _logits(base)).abs().max() > 1e-3  # the trained adapter does something
    assert not lk_warnings
