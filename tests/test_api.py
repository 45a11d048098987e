"""The public API that design.md §5 promises (code outside this repository is written against it): every name there
exists, and its promised parameters keep their names, order, kinds and defaults. Parameters added since must not
break a call written against the promise: they come after the promised ones, keyword-only or with a default."""

import inspect

import pytest

import lora_kernels as lk

_ = inspect.Parameter.empty
POSITIONAL, KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# (what, callable, [(name, kind, default)]) as design.md §5 writes them.
PROMISED = [
    ("lk.lora_linear", lambda: lk.lora_linear,
     [("x", POSITIONAL, _), ("weight", POSITIONAL, _), ("lora_a", POSITIONAL, _), ("lora_b", POSITIONAL, _),
      ("scaling", POSITIONAL, 1.0), ("bias", POSITIONAL, None), ("dropout_p", KEYWORD, 0.0),
      ("backend", KEYWORD, "auto")]),
    ("lk.LoRALinear", lambda: lk.LoRALinear,
     [("in_features", POSITIONAL, _), ("out_features", POSITIONAL, _), ("r", POSITIONAL, 8),
      ("lora_alpha", POSITIONAL, 8), ("lora_dropout", POSITIONAL, 0.0), ("bias", POSITIONAL, True),
      ("use_rslora", POSITIONAL, False), ("device", POSITIONAL, None), ("dtype", POSITIONAL, None)]),
    ("lk.LoRALinear.from_linear", lambda: lk.LoRALinear.from_linear,
     [("linear", POSITIONAL, _), ("r", POSITIONAL, 8), ("lora_alpha", POSITIONAL, 8),
      ("lora_dropout", POSITIONAL, 0.0), ("use_rslora", POSITIONAL, False)]),
    ("LoRALinear.merge", lambda: lk.LoRALinear.merge, [("self", POSITIONAL, _), ("safe_merge", POSITIONAL, False)]),
    ("LoRALinear.unmerge", lambda: lk.LoRALinear.unmerge, [("self", POSITIONAL, _)]),
    ("lk.inject_lora", lambda: lk.inject_lora,
     [("model", POSITIONAL, _), ("target_modules", POSITIONAL, _), ("r", POSITIONAL, 8),
      ("lora_alpha", POSITIONAL, 8), ("lora_dropout", POSITIONAL, 0.0), ("use_rslora", POSITIONAL, False)]),
    ("lk.save_peft_adapter", lambda: lk.save_peft_adapter, [("model", POSITIONAL, _), ("path", POSITIONAL, _)]),
    ("lk.load_peft_adapter", lambda: lk.load_peft_adapter, [("model", POSITIONAL, _), ("path", POSITIONAL, _)]),
    ("lk.multi_lora_linear", lambda: lk.multi_lora_linear,
     [("x", POSITIONAL, _), ("weight", POSITIONAL, _), ("lora_a", POSITIONAL, _), ("lora_b", POSITIONAL, _),
      ("adapter_ids", POSITIONAL, _), ("scalings", POSITIONAL, _), ("bias", POSITIONAL, None),
      ("ranks", KEYWORD, None), ("backend", KEYWORD, "auto")]),
    ("lk.MultiLoRALinear", lambda: lk.MultiLoRALinear,
     [("base_linear", POSITIONAL, _), ("max_adapters", POSITIONAL, _), ("max_rank", POSITIONAL, _)]),
    ("MultiLoRALinear.set_adapter", lambda: lk.MultiLoRALinear.set_adapter,
     [("self", POSITIONAL, _), ("slot", POSITIONAL, _), ("lora_a", POSITIONAL, _), ("lora_b", POSITIONAL, _),
      ("scaling", POSITIONAL, _)]),
    ("MultiLoRALinear.clear_adapter", lambda: lk.MultiLoRALinear.clear_adapter,
     [("self", POSITIONAL, _), ("slot", POSITIONAL, _)]),
    ("MultiLoRALinear.forward", lambda: lk.MultiLoRALinear.forward,
     [("self", POSITIONAL, _), ("x", POSITIONAL, _), ("adapter_ids", POSITIONAL, None)]),
    ("lk.LoRABatch.from_adapter_ids", lambda: lk.LoRABatch.from_adapter_ids,
     [("adapter_ids", POSITIONAL, _), ("num_adapters", POSITIONAL, _)]),
    # lk.ops: design.md names them without their arguments; pinned as serving stacks call them now.
    ("lk.ops.lora_shrink", lambda: lk.ops.lora_shrink,
     [("x", POSITIONAL, _), ("lora_a", POSITIONAL, _), ("batch", POSITIONAL, _), ("scalings", POSITIONAL, _),
      ("ranks", POSITIONAL, None), ("backend", KEYWORD, "auto"), ("deterministic", KEYWORD, False),
      ("out", KEYWORD, None)]),
    ("lk.ops.lora_expand", lambda: lk.ops.lora_expand,
     [("t", POSITIONAL, _), ("lora_b", POSITIONAL, _), ("batch", POSITIONAL, _), ("out", POSITIONAL, _),
      ("slice_offset", POSITIONAL, 0), ("ranks", POSITIONAL, None), ("backend", KEYWORD, "auto")]),
    ("lk.ops.add_lora", lambda: lk.ops.add_lora,
     [("y", POSITIONAL, _), ("x", POSITIONAL, _), ("lora_a_slices", POSITIONAL, _),
      ("lora_b_slices", POSITIONAL, _), ("batch", POSITIONAL, _), ("scalings", POSITIONAL, _),
      ("ranks", POSITIONAL, _), ("output_slices", POSITIONAL, _), ("backend", KEYWORD, "auto"),
      ("deterministic", KEYWORD, False), ("buffer", KEYWORD, None)]),
]


@pytest.mark.parametrize("what,get,promised", PROMISED, ids=[row[0] for row in PROMISED])
def test_promised_parameters_keep_their_names_order_kinds_and_defaults(what, get, promised):
    parameters = list(inspect.signature(get()).parameters.values())
    actual = [(p.name, p.kind, p.default) for p in parameters[:len(promised)]]
    assert actual == promised, f"{what}: the promised parameters changed"
    for extra in parameters[len(promised):]:  # added since: a call written against the promise still binds
        assert extra.kind in (KEYWORD, inspect.Parameter.VAR_KEYWORD) or extra.default is not _, \
            f"{what}: parameter {extra.name!r} after the promised ones needs a default or to be keyword-only"


def test_promised_names_exist():
    """The names design.md §5 lists, including the attributes and the module reached through lk."""
    for name in ("lora_linear", "LoRALinear", "inject_lora", "save_peft_adapter", "load_peft_adapter",
                 "multi_lora_linear", "MultiLoRALinear", "LoRABatch", "ops", "merge_and_unload"):
        assert name in lk.__all__ and hasattr(lk, name), name
    layer = lk.LoRALinear(8, 6, r=2)
    assert layer.merged is False
    assert tuple(layer.lora_A.weight.shape) == (2, 8) and tuple(layer.lora_B.weight.shape) == (6, 2)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


# Every public signature as it ships (helper 183: the promise above pinned only design.md's parameters, so a later
# parameter could turn keyword-only, or a later default change, with every test green): the parameters shipped keep
# their names, order, kinds and defaults; parameters added since go after them, keyword-only or with a default
# (then add them here). "*name" is keyword-only; the LoRABatch entry is its dataclass fields, which hand-built
# batches pass by position.
SHIPPED = {
        'lk.LoRABatch': (
        'adapter_ids: torch.Tensor, sorted_token_ids: torch.Tensor, slot_counts: torch.Tensor, '
        'slot_starts: torch.Tensor, active_slots: torch.Tensor, num_active: torch.Tensor, num_adapters: int'),
        'lk.LoRALinear': (
        'in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True, use_rslora=False, '
        "device=None, dtype=None, *init_lora_weights=True, *backend='auto', *fan_in_fan_out=False, "
        '*autocast_adapter_dtype=True'),
    'lk.MultiLoRALinear': "base_linear, max_adapters, max_rank, *backend='auto', *adapter_dtype=None",
    'lk.available_backends': 'device',
    'lk.count_parameters': 'model',
    'lk.delete_adapter': 'model, adapter_name',
    'lk.disable_adapter': 'model',
        'lk.inject_lora': (
        'model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, *exclude_modules=None, '
        "*init_lora_weights=True, *backend='auto', *fan_in_fan_out=False, *layers_to_transform=None, "
        '*layers_pattern=None, *rank_pattern=None, *alpha_pattern=None, *modules_to_save=None, '
        "*autocast_adapter_dtype=True, *bias='none'"),
        'lk.load_peft_adapter': (
        "model, path, adapter_name=None, *backend='auto', *autocast_adapter_dtype=True, *revision=None, "
        '*subfolder=None'),
    'lk.lora_linear': "x, weight, lora_a, lora_b, scaling=1.0, bias=None, *dropout_p=0.0, *backend='auto'",
    'lk.merge_and_unload': 'model, *safe_merge=False',
    'lk.multi_lora_linear': "x, weight, lora_a, lora_b, adapter_ids, scalings, bias=None, *ranks=None, *backend='auto'",
        'lk.prepare_multi_adapter': (
        'model, target_modules, max_adapters, max_rank, *exclude_modules=None, *layers_to_transform=None, '
        "*layers_pattern=None, *backend='auto', *adapter_dtype=None"),
        'lk.save_peft_adapter': (
        'model, path, adapter_name=None, *task_type=None, *base_model_name_or_path=None, '
        "*save_embedding_layers='auto'"),
    'lk.set_batch_adapters': 'model, adapter_names',
    'lk.trainable_parameters_summary': 'model',
    'lk.LoRALinear.from_linear': ("linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, "
                                  "*init_lora_weights=True, *backend='auto', *fan_in_fan_out=False, "
                                  "*autocast_adapter_dtype=True"),
    'lk.LoRALinear.base_weight': '',
    'lk.LoRALinear.reset_lora_parameters': 'init_lora_weights=True',
    'lk.LoRALinear.reset_parameters': '',
    'lk.LoRALinear.forward': 'x',
    'lk.LoRALinear.delta_weight': '',
    'lk.LoRALinear.merge': 'safe_merge=False',
    'lk.LoRALinear.unmerge': '',
    'lk.LoRALinear.disable_adapter': '',
    'lk.LoRALinear.to_linear': '',
    'lk.MultiLoRALinear.base_weight': '',
    'lk.MultiLoRALinear.set_adapter': 'slot, lora_a, lora_b, scaling',
    'lk.MultiLoRALinear.reset_parameters': '',
    'lk.MultiLoRALinear.clear_adapter': 'slot',
    'lk.MultiLoRALinear.forward': 'x, adapter_ids=None',
    'lk.LoRABatch.from_adapter_ids': 'adapter_ids, num_adapters, *validate=None',
    'lk.LoRABatch.refill_': 'adapter_ids, *validate=None',
    'lk.ops.lora_shrink': "x, lora_a, batch, scalings, ranks=None, *backend='auto', *deterministic=False, *out=None",
    'lk.ops.lora_expand': "t, lora_b, batch, out, slice_offset=0, ranks=None, *backend='auto'",
        'lk.ops.add_lora': (
        "y, x, lora_a_slices, lora_b_slices, batch, scalings, ranks, output_slices, *backend='auto', "
        '*deterministic=False, *buffer=None'),
}


def _shipped_form(obj):
    """obj's parameters as SHIPPED writes them (self and private ones left out)."""
    return [("*" if p.kind is KEYWORD else "") + str(p) for p in inspect.signature(obj).parameters.values()
            if p.name != "self" and not p.name.startswith("_")]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_signature_keeps_its_parameters(name):
    shipped = [p for p in SHIPPED[name].split(", ") if p]
    current = _shipped_form(eval(name, {"lk": lk}))
    assert current[:len(shipped)] == shipped, f"{name}: a shipped parameter changed"
    for extra in current[len(shipped):]:
        assert extra.startswith("*") or "=" in extra, f"{name}: {extra} needs a default or to be keyword-only"


def test_the_shipped_snapshot_covers_the_public_names():
    public = {f"lk.{name}" for name in lk.__all__ if inspect.isfunction(getattr(lk, name))
              or inspect.isclass(getattr(lk, name))}
    assert public <= set(SHIPPED), sorted(public - set(SHIPPED))
    # the layers' own public methods too (from_linear's keyword-only parameters were pinned nowhere: helper 273);
    # extra_repr is nn.Module's, refuse_offloaded the package's own check
    methods = {f"lk.{cls.__name__}.{name}" for cls in (lk.LoRALinear, lk.MultiLoRALinear)
               for name, member in vars(cls).items()
               if not name.startswith("_") and name not in ("extra_repr", "refuse_offloaded")
               and (inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)))}
    assert methods <= set(SHIPPED), sorted(methods - set(SHIPPED))
