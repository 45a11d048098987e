"""The validation matrix: every public entry point × each kind of wrong argument raises ValueError/TypeError whose
message names the argument and the expected and actual values, before any work. Adding an op adds rows, not code."""

import os
import tempfile

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.batch import LoRABatch

M, K, N, R, L = 4, 8, 6, 2, 3


def _single():
    return {"x": torch.randn(M, K), "weight": torch.randn(N, K), "lora_a": torch.randn(R, K),
            "lora_b": torch.randn(N, R), "scaling": 1.0, "bias": torch.randn(N), "dropout_p": 0.0, "backend": "torch"}


def _grouped():
    ids = torch.tensor([0, 2, -1, 1])
    return {"x": torch.randn(M, K), "weight": torch.randn(N, K), "lora_a": torch.randn(L, R, K),
            "lora_b": torch.randn(L, N, R), "adapter_ids": ids, "scalings": [1.0, 0.5, 2.0], "bias": torch.randn(N),
            "ranks": [2, 1, 2], "batch": LoRABatch.from_adapter_ids(ids, L), "backend": "torch"}


def call_lora_linear(a):
    return lk.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["scaling"], a["bias"],
                          dropout_p=a["dropout_p"], backend=a["backend"])


def call_multi_lora_linear(a):
    return lk.multi_lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["adapter_ids"], a["scalings"],
                                a["bias"], ranks=a["ranks"], backend=a["backend"])


def call_shrink(a):
    return lk.ops.lora_shrink(a["x"], a["lora_a"], a["batch"], a["scalings"], a["ranks"], backend=a["backend"],
                              out=a.get("out"), deterministic=a.get("deterministic", False))


def call_expand(a):
    out = a.get("out", torch.zeros(M, N + 2))
    t = a.get("t", torch.zeros(M, R))
    return lk.ops.lora_expand(t, a["lora_b"], a["batch"], out, a.get("slice_offset", 1), a["ranks"],
                              backend=a["backend"])


def call_add_lora(a):
    y = a.get("y", torch.zeros(M, N + 3))
    slices = a.get("output_slices", (N, 3))
    lora_bs = a.get("lora_b_slices", [a["lora_b"], torch.randn(L, 3, R)])
    return lk.ops.add_lora(y, a["x"], [a["lora_a"], a["lora_a"]], lora_bs, a["batch"], a["scalings"], a["ranks"],
                           slices, backend=a["backend"])


def call_batch(a):
    return LoRABatch.from_adapter_ids(a["adapter_ids"], a.get("num_adapters", L))


def call_lora_linear_module(a):
    return lk.LoRALinear(a.get("in_features", K), a.get("out_features", N), r=a.get("r", R),
                         lora_alpha=a.get("lora_alpha", 8), lora_dropout=a.get("lora_dropout", 0.0),
                         init_lora_weights=a.get("init", True),
                         use_rslora=a.get("use_rslora", False), dtype=a.get("dtype"))


def call_merge(a):
    return lk.LoRALinear(K, N, r=R).merge(safe_merge=a.get("safe_merge", False))


def call_set_adapter(a):
    layer = lk.MultiLoRALinear(nn.Linear(K, N), max_adapters=L, max_rank=R)
    return layer.set_adapter(a.get("slot", 0), a.get("a", torch.randn(R, K)), a.get("b", torch.randn(N, R)),
                             a.get("scaling", 1.0))


def call_multi_module(a):
    return lk.MultiLoRALinear(a.get("base", nn.Linear(K, N)), max_adapters=a.get("max_adapters", L),
                              max_rank=a.get("max_rank", R), backend=a.get("backend", "auto"))


def call_inject(a):
    model = a.get("model", nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, K)))
    return lk.inject_lora(model, a.get("target_modules", ["0"]), r=a.get("r", R),
                          rank_pattern=a.get("rank_pattern"), exclude_modules=a.get("exclude_modules"),
                          modules_to_save=a.get("modules_to_save"))


def call_save(a):
    model = lk.inject_lora(nn.Sequential(nn.Linear(K, N)), ["0"], r=R)
    return lk.save_peft_adapter(a.get("model", model), a["path"])


def call_load(a):
    return lk.load_peft_adapter(a.get("model", nn.Sequential(nn.Linear(K, N))), a["path"],
                                backend=a.get("backend", "auto"))


_ADAPTER_DIR = tempfile.TemporaryDirectory(prefix="lk_matrix_")  # removed when the test process ends


def _adapter_dir():
    lk.save_peft_adapter(lk.inject_lora(nn.Sequential(nn.Linear(K, N)), ["0"], r=R), _ADAPTER_DIR.name)
    return {"path": _ADAPTER_DIR.name}


# (entry point, argument, bad value from the good arguments, error, words the message must contain)
MATRIX = [
    # lora_linear: shape, dtype, device, rank, non-tensor, ranges
    (call_lora_linear, _single, "x", lambda a: a["x"][:, :-1], ValueError, ["x expected last dimension 8", "(4, 7)"]),
    (call_lora_linear, _single, "x", lambda a: a["x"].int(), TypeError, ["x expected a floating dtype", "int32"]),
    (call_lora_linear, _single, "x", lambda a: a["x"].to("meta"), ValueError,
     ["expected device meta (same as x), got cpu"]),
    (call_lora_linear, _single, "lora_a", lambda a: a["lora_a"][:0], ValueError, ["lora_a", "r >= 1", "(0, 8)"]),
    (call_lora_linear, _single, "lora_b", lambda a: a["lora_b"].T, ValueError, ["lora_b expected shape [6, 2]", "(2, 6)"]),
    (call_lora_linear, _single, "weight", lambda a: a["weight"].half(), TypeError,
     ["weight expected dtype torch.float32", "torch.float16"]),
    (call_lora_linear, _single, "weight", lambda a: "W", TypeError, ["weight expected a torch.Tensor, got str"]),
    (call_lora_linear, _single, "bias", lambda a: a["bias"][:3], ValueError, ["bias expected shape [6]", "(3,)"]),
    (call_lora_linear, _single, "scaling", lambda a: "2", TypeError, ["scaling expected a real number, got str"]),
    # an int past float's range raised OverflowError in math.isfinite
    (call_lora_linear, _single, "scaling", lambda a: 10**400, ValueError,
     ["scaling expected a finite number, got 1000"]),
    (call_lora_linear, _single, "dropout_p", lambda a: -0.1, ValueError, ["dropout_p expected a number in [0, 1)", "-0.1"]),
    (call_lora_linear, _single, "backend", lambda a: "fast", ValueError, ["backend 'fast' is not available"]),
    (call_lora_linear, _single, "weight", lambda a: a["weight"].to_sparse_csr(), TypeError,
     ["weight expected a dense (strided) tensor, got layout torch.sparse_csr"]),
    # a sparse x, factor or bias failed deep inside, differently per backend
    (call_lora_linear, _single, "x", lambda a: a["x"].to_sparse(), TypeError,
     ["x expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_lora_linear, _single, "lora_a", lambda a: a["lora_a"].to_sparse_csr(), TypeError,
     ["lora_a expected a dense (strided) tensor, got layout torch.sparse_csr"]),
    (call_lora_linear, _single, "lora_b", lambda a: a["lora_b"].to_sparse(), TypeError,
     ["lora_b expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_lora_linear, _single, "bias", lambda a: a["bias"].to_sparse(), TypeError,
     ["bias expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    # multi_lora_linear
    (call_multi_lora_linear, _grouped, "adapter_ids", lambda a: a["adapter_ids"][:3], ValueError,
     ["adapter_ids expected shape (4,)", "(3,)"]),
    (call_multi_lora_linear, _grouped, "adapter_ids", lambda a: torch.tensor([0, 3, 0, 0]), ValueError,
     ["adapter_ids expected values in [-1, 3), got 3"]),
    (call_multi_lora_linear, _grouped, "scalings", lambda a: [1.0], ValueError, ["scalings expected shape [3]", "(1,)"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: [2, 3, 1], ValueError, ["ranks expected values in [0, 2]", "got 3"]),
    (call_multi_lora_linear, _grouped, "lora_b", lambda a: a["lora_b"][:, :5], ValueError,
     ["lora_b expected shape [3, 6, 2]", "(3, 5, 2)"]),
    (call_multi_lora_linear, _grouped, "lora_a", lambda a: a["lora_a"][0], ValueError, ["lora_a expected a 3-D tensor"]),
    # K is weight's: the one of x and lora_a that disagrees with it is named
    (call_multi_lora_linear, _grouped, "lora_a", lambda a: torch.randn(L, R, K + 1), ValueError,
     ["lora_a expected shape [L >= 1, R, 8] (K of weight (6, 8))", "(3, 2, 9)"]),
    # no slot at all: named lora_a (it said "num_adapters expected an int >= 1, got 0", an argument not taken here)
    (call_multi_lora_linear, _grouped, "lora_a", lambda a: torch.randn(0, R, K), ValueError,
     ["lora_a expected shape [L >= 1, R, 8] (K of weight (6, 8))", "(0, 2, 8)"]),
    (call_multi_lora_linear, _grouped, "x", lambda a: torch.randn(M, K + 1), ValueError,
     ["x expected shape [..., 8] (K of weight (6, 8) = [N, K])", "(4, 9)"]),
    (call_multi_lora_linear, _grouped, "adapter_ids", lambda a: [0, 1, 2, -1], TypeError,
     ["adapter_ids expected a torch.Tensor or LoRABatch, got list"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: [1.5, 2, 2], TypeError,
     ["ranks expected an integer tensor [L] or a sequence of ints", "1.5"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: [2**32 + 3, 1, 1], ValueError,
     ["ranks expected values in [0, 2]", "got 4294967299"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: [2, -1, 1], ValueError,
     ["ranks expected values in [0, 2]", "got -1"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: torch.tensor([True, True, False]), TypeError,
     ["ranks expected an integer dtype", "torch.bool"]),
    (call_multi_lora_linear, _grouped, "scalings", lambda a: ["1.0", 0.5, 2.0], TypeError,
     ["scalings expected a float tensor [L] or a sequence of numbers", "'1.0'"]),
    (call_multi_lora_linear, _grouped, "weight", lambda a: a["weight"].to_sparse_csr(), TypeError,
     ["weight expected a dense (strided) tensor, got layout torch.sparse_csr"]),
    (call_multi_lora_linear, _grouped, "x", lambda a: a["x"].to_sparse(), TypeError,
     ["x expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "lora_b", lambda a: a["lora_b"].to_sparse(), TypeError,
     ["lora_b expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "adapter_ids", lambda a: a["adapter_ids"].to_sparse(), TypeError,
     ["adapter_ids expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "scalings", lambda a: torch.ones(L).to_sparse(), TypeError,
     ["scalings expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: torch.tensor([2, 1, 2]).to_sparse(), TypeError,
     ["ranks expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_shrink, _grouped, "x", lambda a: a["x"].to_sparse(), TypeError,
     ["x expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "lora_a", lambda a: a["lora_a"].to_sparse(), TypeError,
     ["lora_a expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_multi_lora_linear, _grouped, "bias", lambda a: a["bias"].to_sparse(), TypeError,
     ["bias expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_expand, _grouped, "lora_b", lambda a: a["lora_b"].to_sparse(), TypeError,
     ["lora_b expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_expand, _grouped, "t", lambda a: torch.zeros(M, R).to_sparse(), TypeError,
     ["t expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_expand, _grouped, "out", lambda a: torch.zeros(M, N + 2).to_sparse(), TypeError,
     ["out expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    (call_add_lora, _grouped, "y", lambda a: torch.zeros(M, N + 3).to_sparse(), TypeError,
     ["y expected a dense (strided) tensor, got layout torch.sparse_coo"]),
    # serving-level ops
    (call_shrink, _grouped, "x", lambda a: a["x"][:, :5], ValueError, ["x expected shape [M, 8]", "(4, 5)"]),
    (call_shrink, _grouped, "batch", lambda a: LoRABatch.from_adapter_ids(torch.tensor([0, 1]), L), ValueError,
     ["batch was built for 2 tokens, but x has 4 rows"]),
    (call_shrink, _grouped, "batch", lambda a: LoRABatch.from_adapter_ids(a["adapter_ids"], 5), ValueError,
     ["batch was built for 5 adapter slots", "3 (L)"]),
    (call_shrink, _grouped, "batch", lambda a: a["adapter_ids"], TypeError, ["batch expected a LoRABatch, got Tensor"]),
    (call_shrink, _grouped, "ranks", lambda a: torch.tensor([1.0, 2.0, 2.0]), TypeError,
     ["ranks expected an integer dtype", "torch.float32"]),
    (call_shrink, _grouped, "scalings", lambda a: torch.ones(3, dtype=torch.int64), TypeError,
     ["scalings expected a floating dtype", "torch.int64"]),
    (call_shrink, _grouped, "out", lambda a: torch.zeros(M, R + 1), ValueError,
     ["out expected a float32 tensor of shape [4, 2]", "(4, 3)"]),
    (call_shrink, _grouped, "out", lambda a: torch.zeros(M, R, dtype=torch.float16), ValueError,
     ["out expected a float32 tensor", "torch.float16"]),
    (call_shrink, _grouped, "deterministic", lambda a: "yes", TypeError, ["deterministic expected a bool, got 'yes'"]),
    (call_shrink, _grouped, "scalings", lambda a: torch.ones(L, device="meta"), ValueError,
     ["scalings expected a tensor on cpu", "got meta"]),
    (call_expand, _grouped, "ranks", lambda a: torch.ones(L, dtype=torch.int32, device="meta"), ValueError,
     ["ranks expected a tensor on cpu", "got meta"]),
    (call_multi_lora_linear, _grouped, "ranks", lambda a: torch.ones(L, dtype=torch.int32, device="meta"), ValueError,
     ["ranks expected a tensor on cpu", "got meta"]),
    (call_expand, _grouped, "slice_offset", lambda a: 3, ValueError, ["out expected at least 9 columns", "(4, 8)"]),
    (call_expand, _grouped, "slice_offset", lambda a: -1, ValueError, ["slice_offset expected an int >= 0, got -1"]),
    (call_expand, _grouped, "t", lambda a: torch.zeros(M, R + 1), ValueError, ["t expected shape [4, 2]", "(4, 3)"]),
    # out, not t, disagrees with the batch's token count: out is named
    (call_expand, _grouped, "out", lambda a: torch.zeros(M + 1, N + 2), ValueError,
     ["batch was built for 4 tokens, but out has 5 rows"]),
    (call_expand, _grouped, "ranks", lambda a: [2, 3, 1], ValueError,
     ["ranks expected values in [0, 2] (R of lora_b (3, 6, 2))", "got 3"]),
    (call_add_lora, _grouped, "ranks", lambda a: [2, 3, 1], ValueError,
     ["ranks expected values in [0, 2] (R of lora_a_slices[0] (3, 2, 8))", "got 3"]),
    (call_expand, _grouped, "out", lambda a: torch.zeros(M, N + 2, dtype=torch.float16), TypeError,
     ["lora_b expected dtype torch.float16 (same as out), got torch.float32"]),
    (call_add_lora, _grouped, "output_slices", lambda a: (N, 2), ValueError,
     ["y expected 8 columns (sum of output_slices (6, 2))", "(4, 9)"]),
    (call_add_lora, _grouped, "lora_b_slices", lambda a: [a["lora_b"]], ValueError,
     ["expected the same non-zero length", "2, 1, 2"]),
    (call_add_lora, _grouped, "lora_b_slices", lambda a: [a["lora_b"], torch.randn(L, 4, R)], ValueError,
     ["lora_b_slices[1] expected shape [L, 3, R]", "(3, 4, 2)"]),
    (call_add_lora, _grouped, "lora_b_slices", lambda a: [a["lora_b"], torch.randn(L, 3, R - 1)], ValueError,
     ["lora_b_slices[1] expected R = 2", "(3, 3, 1)"]),
    # metadata
    (call_batch, _grouped, "adapter_ids", lambda a: torch.tensor([0, -2]), ValueError,
     ["adapter_ids expected values in [-1, 3), got -2"]),
    (call_batch, _grouped, "adapter_ids", lambda a: torch.tensor([0.0]), TypeError, ["adapter_ids expected an integer dtype"]),
    (call_batch, _grouped, "num_adapters", lambda a: 0, ValueError, ["num_adapters expected an int >= 1, got 0"]),
    (call_batch, _grouped, "adapter_ids", lambda a: [0, 1], TypeError, ["adapter_ids expected a torch.Tensor, got list"]),
    # modules
    (call_lora_linear_module, dict, "r", lambda a: 0, ValueError, ["r expected an int >= 1, got 0"]),
    (call_lora_linear_module, dict, "in_features", lambda a: -3, ValueError, ["in_features expected an int >= 1, got -3"]),
    (call_lora_linear_module, dict, "lora_dropout", lambda a: 1.5, ValueError, ["lora_dropout expected a number in [0, 1)"]),
    # bools are ints to isinstance: r=True would be a rank-1 adapter, lora_dropout=False no dropout
    (call_lora_linear_module, dict, "r", lambda a: True, ValueError, ["r expected an int >= 1, got True"]),
    (call_lora_linear_module, dict, "in_features", lambda a: 0, ValueError,
     ["in_features expected an int >= 1, got 0"]),
    (call_lora_linear_module, dict, "out_features", lambda a: True, ValueError,
     ["out_features expected an int >= 1, got True"]),
    (call_lora_linear_module, dict, "lora_alpha", lambda a: True, TypeError,
     ["lora_alpha expected a number, got True"]),
    (call_lora_linear_module, dict, "lora_alpha", lambda a: 2j, TypeError, ["lora_alpha expected a number, got 2j"]),
    (call_lora_linear_module, dict, "lora_alpha", lambda a: -10**400, ValueError,
     ["lora_alpha expected a finite number, got -1000"]),
    (call_lora_linear_module, dict, "lora_dropout", lambda a: 1, ValueError,
     ["lora_dropout expected a number in [0, 1), got 1"]),
    (call_lora_linear_module, dict, "lora_dropout", lambda a: -0.1, ValueError, ["in [0, 1), got -0.1"]),
    (call_lora_linear_module, dict, "lora_dropout", lambda a: False, ValueError, ["in [0, 1), got False"]),
    (call_lora_linear_module, dict, "init", lambda a: "pissa", ValueError, ["init_lora_weights expected", "'pissa'"]),
    (call_lora_linear_module, dict, "use_rslora", lambda a: "no", TypeError, ["use_rslora expected a bool, got 'no'"]),
    (call_lora_linear_module, dict, "dtype", lambda a: torch.int64, TypeError,
     ["dtype expected a floating dtype (float32/float16/bfloat16/float64), got torch.int64"]),
    (call_lora_linear_module, dict, "dtype", lambda a: torch.float8_e4m3fn, TypeError,  # failed in nn.init
     ["dtype expected a floating dtype", "got torch.float8_e4m3fn"]),
    (call_merge, dict, "safe_merge", lambda a: "x", TypeError, ["safe_merge expected a bool, got 'x'"]),
    (call_set_adapter, dict, "scaling", lambda a: "2.0", TypeError, ["scaling expected a number, got '2.0'"]),
    (call_set_adapter, dict, "slot", lambda a: L, ValueError, ["slot expected an int in [0, 3), got 3"]),
    (call_set_adapter, dict, "slot", lambda a: -1, ValueError, ["slot expected an int in [0, 3), got -1"]),
    (call_set_adapter, dict, "a", lambda a: torch.randn(R + 1, K), ValueError, ["1 <= r <= 2", "(3, 8)"]),
    (call_set_adapter, dict, "b", lambda a: torch.randn(N + 1, R), ValueError, ["lora_b expected shape [6, 2]", "(7, 2)"]),
    (call_set_adapter, dict, "a", lambda a: [[1.0]], TypeError, ["lora_a expected a 2-D floating tensor, got list"]),
    # a meta tensor failed in the copy (NotImplementedError), an int past float's range in float() (OverflowError)
    (call_set_adapter, dict, "a", lambda a: torch.randn(R, K, device="meta"), ValueError,
     ["set_adapter: lora_a expected a tensor holding values, got one on the meta device"]),
    (call_set_adapter, dict, "scaling", lambda a: 10**400, ValueError, ["scaling expected a finite number, got inf"]),
    (call_shrink, _grouped, "scalings", lambda a: [1.0, 10**400, 0.5], ValueError,
     ["lora_shrink: scalings expected finite numbers, got inf"]),
    (call_shrink, _grouped, "scalings", lambda a: [1.0, -10**400, 0.5], ValueError,
     ["lora_shrink: scalings expected finite numbers, got -inf"]),
    (call_multi_module, dict, "max_rank", lambda a: 0, ValueError, ["max_rank expected an int >= 1, got 0"]),
    (call_multi_module, dict, "max_adapters", lambda a: True, ValueError,
     ["max_adapters expected an int >= 1, got True"]),
    (call_multi_module, dict, "backend", lambda a: "fast", ValueError,
     ["MultiLoRALinear: backend expected one of", "got 'fast'"]),
    (call_multi_module, dict, "base", lambda a: nn.ReLU(), TypeError, ["base_linear expected an nn.Linear", "ReLU"]),
    (call_inject, dict, "target_modules", lambda a: ["nope"], ValueError, ["matched no", "nope"]),
    (call_inject, dict, "target_modules", lambda a: ["1"], TypeError, ["'1'", "ReLU"]),
    (call_inject, dict, "rank_pattern", lambda a: [("0", 4)], TypeError, ["rank_pattern expected a dict", "[('0', 4)]"]),
    (call_inject, dict, "exclude_modules", lambda a: 5, TypeError, ["exclude_modules expected a regex string", "5"]),
    (call_inject, dict, "target_modules", lambda a: [0], TypeError,
     ["inject_lora: target_modules expected a regex string or a list of module names (str), got the entry 0"]),
    (call_inject, dict, "target_modules", lambda a: ["0", 2], TypeError,
     ["inject_lora: target_modules expected a regex string or a list of module names (str), got the entry 2 in "]),
    (call_inject, dict, "exclude_modules", lambda a: ["2", ""], TypeError,
     ["inject_lora: exclude_modules expected a regex string or a list of module names (str), got the entry '' in "]),
    (call_inject, dict, "target_modules", lambda a: "(q", ValueError,
     ["inject_lora: target_modules '(q' is not a valid regular expression"]),
    (call_inject, dict, "exclude_modules", lambda a: "[", ValueError,
     ["inject_lora: exclude_modules '[' is not a valid regular expression"]),
    (call_inject, dict, "rank_pattern", lambda a: {"(": 4}, ValueError,
     ["inject_lora: rank_pattern key '(' is not a valid regular expression"]),
    (call_inject, dict, "modules_to_save", lambda a: ["2", "0("], ValueError,
     ["inject_lora: modules_to_save entry '0(' is not a valid regular expression"]),
    (call_inject, dict, "rank_pattern", lambda a: {"(?i)0": 4}, ValueError,  # fails inside the lookup regex only
     ["inject_lora: rank_pattern key '(?i)0' is not a valid regular expression (global flags not at the start",
      "the regex it is matched as"]),
    (call_inject, dict, "rank_pattern", lambda a: {0: 4}, TypeError,
     ["inject_lora: rank_pattern expected module name regex keys (str), got the key 0"]),
    (call_inject, dict, "model", lambda a: None, TypeError, ["inject_lora: model expected a torch.nn.Module",
                                                             "NoneType"]),
    (call_save, _adapter_dir, "path", lambda a: 5, TypeError, ["save_peft_adapter: path expected a directory path",
                                                                "int"]),
    # a file, or a path under one: refused by name before any work (os.makedirs raised a bare FileExistsError)
    (call_save, _adapter_dir, "path", lambda a: os.path.join(a["path"], "adapter_config.json"), ValueError,
     ["save_peft_adapter: path expected a directory (created if missing)", "adapter_config.json', which is a file"]),
    (call_save, _adapter_dir, "path", lambda a: os.path.join(a["path"], "adapter_config.json", "sub"), ValueError,
     ["save_peft_adapter: path expected a directory", "sub', under ", "adapter_config.json', which is a file"]),
    (call_load, _adapter_dir, "path", lambda a: None, TypeError, ["load_peft_adapter: path expected a directory",
                                                                   "NoneType"]),
    (call_load, _adapter_dir, "backend", lambda a: "fast", ValueError, ["load_peft_adapter: backend expected one of",
                                                                         "'fast'"]),
    (call_load, _adapter_dir, "model", lambda a: None, TypeError, ["load_peft_adapter: model expected a torch.nn.Module"]),
]


@pytest.mark.parametrize("entry,make_args,arg,bad,error,words", MATRIX,
                         ids=[f"{row[0].__name__[5:]}-{row[2]}-{i}" for i, row in enumerate(MATRIX)])
def test_wrong_argument_is_a_specific_error(entry, make_args, arg, bad, error, words):
    args = make_args()
    args[arg] = bad(args)
    with pytest.raises(error) as info:
        entry(args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in the message: {message}"


@pytest.mark.parametrize("entry,make_args", [(call_lora_linear, _single), (call_multi_lora_linear, _grouped),
                                             (call_shrink, _grouped), (call_expand, _grouped),
                                             (call_add_lora, _grouped), (call_batch, _grouped),
                                             (call_lora_linear_module, dict), (call_merge, dict),
                                             (call_set_adapter, dict), (call_multi_module, dict), (call_inject, dict),
                                             (call_save, _adapter_dir), (call_load, _adapter_dir)],
                         ids=lambda v: getattr(v, "__name__", "")[5:])
def test_good_arguments_pass(entry, make_args):
    """The rows above start from arguments that work: each failure is the mutation's doing."""
    entry(make_args())


@pytest.mark.parametrize("entry", [call_shrink, call_expand, call_multi_lora_linear], ids=lambda f: f.__name__[5:])
def test_triton_backend_refuses_float64_before_any_launch(entry):
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 on CPU")
    args = _grouped()
    for name in ("x", "weight", "lora_a", "lora_b", "bias"):
        args[name] = args[name].double()
    if entry is call_expand:
        args["out"] = torch.zeros(M, N + 2, dtype=torch.float64)
    args["backend"] = "triton"
    with pytest.raises(TypeError, match=r"the triton backend runs float32/float16/bfloat16, got torch.float64"):
        entry(args)


@pytest.mark.parametrize("bad", ["float64", "rank"])
def test_triton_lora_linear_limits_are_named_before_the_dropout_seed(bad):
    """The Triton kernels' dtype and rank limits were found inside the launcher: the error named the internal op
    (lora_fwd) and came after the dropout seed was drawn, so a refused call had advanced torch's generator."""
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 on CPU")
    from lora_kernels.triton.lora_linear import MAX_RANK
    args = _single()
    if bad == "float64":
        for name in ("x", "weight", "lora_a", "lora_b", "bias"):
            args[name] = args[name].double()
        error, words = TypeError, "lora_linear: the triton backend runs float32/float16/bfloat16, got torch.float64"
    else:
        args["lora_a"], args["lora_b"] = torch.randn(MAX_RANK + 1, K), torch.randn(N, MAX_RANK + 1)
        error, words = ValueError, f"lora_linear: the triton backend takes ranks up to r = {MAX_RANK}, got lora_a"
    args["backend"], args["dropout_p"] = "triton", 0.1
    generator_state = torch.random.get_rng_state()
    with pytest.raises(error, match=words):
        call_lora_linear(args)
    assert torch.equal(torch.random.get_rng_state(), generator_state)
