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
