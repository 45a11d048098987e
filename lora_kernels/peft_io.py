"""PEFT's LoRA file format in and out: adapter_config.json + adapter_model.safetensors (adapter_model.bin read too),
keys `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], plus the whole state of each
module that `modules_to_save` names (`base_model.model.<module>.<param>`, e.g. a classification head), plus with
bias="all" / "lora_only" the trained biases (`base_model.model.<layer>.base_layer.bias` for a LoRA layer, whose
bias is our `<layer>.bias`; `base_model.model.<module>.bias` for any other), plus, when target_modules names
"lm_head" or "embed_tokens", the base weight of that LoRA layer (`base_model.model.lm_head.base_layer.weight`: PEFT
saves it for a resized vocabulary, and loads it over the model's; so do we), plus the whole state of the input and
output embedding layers that are no LoRA target (`base_model.model.<layer>.<param>`, PEFT's save_embedding_layers:
read, loaded and written again).

Loading is atomic: the config, every tensor, every target module, key and shape are checked before the model is
touched, and a failure while changing it is rolled back; a config field that would change what the adapter computes
and that is not implemented here is refused by name, never ignored.

Distributed training: LoRALinear holds plain Parameters (frozen base, trainable lora_A/lora_B), so DDP and FSDP2
(`torch.distributed.fsdp.fully_shard`, which accepts frozen and trainable parameters in one group) wrap an injected
or loaded model like any other (tests/test_distributed.py: gloo, CPU). Load before wrapping. Save: under DDP call
save_peft_adapter on rank 0 (or on every rank: only rank 0 writes); under FSDP2 call it on every rank, since
gathering the sharded LoRA weights (DTensor.full_tensor) is a collective, and rank 0 writes. Tensor parallelism
(parallelize_module): load after it, on every rank (the factors are distributed from rank 0's copy, a collective,
sharded like the weights they adapt); save on every rank.
"""

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lora_kernels import modules as _modules
from lora_kernels._dtensor import is_dtensor, is_tensor_parallel
from lora_kernels._ext import is_finite_number
from lora_kernels._files import create_temp_file
from lora_kernels._warnings import warn_at_caller
from lora_kernels.backends import check_backend_name
from lora_kernels.functional import check_layer_scaling
from lora_kernels.modules import (_PEFT_ONLY_HINT, ATTENTION_OUT_PROJ, BASE_ADAPTER, BIAS_ATTR, BIAS_MODES,
                                  EMBEDDING_LAYERS_ATTR, LORA_WRAPPERS, MODULES_TO_SAVE_ATTR, PEFT_ONLY_LAYERS,
                                  TASK_TYPE_ATTR, LoRALinear, MultiLoRALinear, _record, _rollback_on_error,
                                  _set_submodule, _train_biases, _warn_aliased_targets, _warn_tied_targets,
                                  adapter_table_lock, check_no_accelerate_hook, check_no_offloading_ancestor,
                                  check_targets_outside_heads, check_wrappable_linear, copy_into, embedding_layer,
                                  enable_input_grads_for_checkpointing, in_out_features, is_attention_out_proj,
                                  is_conv1d, is_layer_index, is_name_wrapper, keep_transformer_layers_calling_lora,
                                  layers_pattern_regex, lora_scaling, modules_to_save_regex, named_modules_to_save,
                                  named_target_modules, pattern_key_regex, pattern_value, refuse_new_layers_under_fsdp1,
                                  refuse_overflowed_copy, refuse_uninitialised_modules, regex_error,
                                  resolve_batch_adapters, scaling_source, selected_modules_to_save, state_dict_name,
                                  suffix_only_modules_to_save, trained_biases, unwrap_model, warn_dropped_hooks,
                                  warn_fan_in_fan_out_corrections, weight_computed_by_hook)
from lora_kernels.ops import check_flag, refuse_inference_tensor_writes

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# Fields that do not change what a loaded LoRA adapter computes (bookkeeping, or only how PEFT initialised it).
_IGNORED_FIELDS = {
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "megatron_core", "ensure_weight_tying", "runtime_config", "astra_config",
}
# Honoured (read and validated below).
_HONOURED_FIELDS = {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "bias", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save",
}
# LoRA variants and extras not implemented here: refused when set (not null / false / empty).
_REFUSED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare nn.Parameters",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}
# The variants PEFT's LoraConfig turns from a dict into its sub-config object (_get_lora_subconfig): {} too, whose
# defaults then switch the variant on (a "kasa_config": {} file ran KaSA in PEFT, 0.44 apart from the plain LoRA
# loaded here), so any dict asks for it.
_SUBCONFIG_FIELDS = ("velora_config", "monteclora_config", "kasa_config", "use_bdlora", "arrow_config")
# init_lora_weights values whose adapters were trained against a base model PEFT modified (residual weights):
# loaded as they are, with a warning, since only the caller knows which base they pass.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")


# ------------------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class AdapterConfig:
    """The honoured fields of a PEFT LoRA adapter_config.json, validated."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: object  # regex str or list of str
    exclude_modules: object = None
    rank_pattern: dict = None
    alpha_pattern: dict = None
    layers_to_transform: object = None
    layers_pattern: object = None
    modules_to_save: list = None  # module names trained whole and saved beside the adapter (None: none)
    bias: str = "none"  # which base biases the adapter trained and holds: "none", "all" or "lora_only"
    task_type: str = None  # PEFT's task type ("CAUSAL_LM"), kept for save_peft_adapter; changes no computation
    peft_version: str = None  # the PEFT that wrote the file, where it says (its modules_to_save rule changed in 0.22)

    def rank_and_alpha(self, name):
        """(r, lora_alpha) of the module called `name`, with PEFT's rank_pattern / alpha_pattern lookup."""
        return (pattern_value(self.rank_pattern, name, self.r),
                pattern_value(self.alpha_pattern, name, self.lora_alpha))


def _is_unset(value):
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and len(value) == 0)


def _bad(file, field, expected, value):
    return ValueError(f"{file}: field {field!r} expected {expected}, got {value!r}")


def _check_names(file, field, value, *, allow_none):
    """A regex str or a list of str (PEFT also allows a set, saved as a list). Where none is allowed, "" and []
    are none too: PEFT tests exclude_modules for truth before using it."""
    if allow_none and (value is None or value == ""):
        return None
    if isinstance(value, str) and value:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{file}: field {field!r} is not a valid regular expression ({exc}): {value!r}") from None
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    if isinstance(value, list) and not value and allow_none:
        return None
    raise _bad(file, field, "a regex string or a non-empty list of module names", value)


def _is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and is_finite_number(value)


def _check_pattern(file, field, value, kind):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(file, field, "an object {module-name regex: value}", value)
    for key, v in value.items():
        error = regex_error(key, pattern_key_regex)
        if error is not None:
            raise ValueError(f"{file}: field {field!r} has an invalid regex key {key!r} ({error})")
        ok = (kind == "rank" and isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
            kind == "alpha" and _is_finite_number(v))
        if not ok:
            raise _bad(file, f"{field}[{key!r}]", "an int >= 1" if kind == "rank" else "a finite number", v)
    return dict(value)


def parse_adapter_config(raw, file=CONFIG_NAME):
    """Validates the dict of an adapter_config.json and returns an AdapterConfig. Raises ValueError naming the field
    for anything malformed, not LoRA, or not implemented here (DoRA, lora_bias, ...)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise _bad(file, "peft_type", '"LORA" (only LoRA adapters are supported)', peft_type)
    for field, what in _REFUSED_FIELDS.items():
        if field in raw and (not _is_unset(raw[field]) or field in _SUBCONFIG_FIELDS and isinstance(raw[field], dict)):
            raise ValueError(f"{file}: field {field!r} = {raw[field]!r} asks for {what}, which lora_kernels does not "
                             f"implement; refusing to load a partial adapter")
    bias = raw.get("bias", "none")
    if bias not in BIAS_MODES:
        raise _bad(file, "bias", f"one of {list(BIAS_MODES)}", bias)
    unknown = sorted(k for k in raw if k not in _IGNORED_FIELDS | _HONOURED_FIELDS | set(_REFUSED_FIELDS)
                     and not _is_unset(raw[k]))
    if unknown:
        raise ValueError(f"{file}: unknown field(s) {unknown} with non-default values; lora_kernels cannot tell what "
                         f"they change, so it refuses to load the adapter")

    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _bad(file, "r", "an int >= 1", r)
    lora_alpha = raw.get("lora_alpha", 8)
    if not _is_finite_number(lora_alpha):  # json.load takes NaN and Infinity: a NaN scaling NaN'd merged weights
        raise _bad(file, "lora_alpha", "a finite number", lora_alpha)
    lora_dropout = raw.get("lora_dropout", 0.0)
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise _bad(file, "lora_dropout", "a number in [0, 1)", lora_dropout)
    flags = {}
    for field in ("use_rslora", "fan_in_fan_out"):
        value = raw.get(field, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise _bad(file, field, "true or false", value)
        flags[field] = value
    if raw.get("target_modules") is None:
        raise ValueError(f"{file}: field 'target_modules' is null (PEFT's per-architecture default); lora_kernels "
                         f"needs the modules listed")
    target_modules = _check_names(file, "target_modules", raw["target_modules"], allow_none=False)
    exclude_modules = _check_names(file, "exclude_modules", raw.get("exclude_modules"), allow_none=True)
    layers_to_transform = raw.get("layers_to_transform")
    if layers_to_transform is not None:
        if not (is_layer_index(layers_to_transform) or (isinstance(layers_to_transform, list)
                                                       and all(map(is_layer_index, layers_to_transform)))):
            raise _bad(file, "layers_to_transform", "an int or a list of ints >= 0", layers_to_transform)
        if isinstance(target_modules, str):
            raise ValueError(f"{file}: field 'layers_to_transform' cannot be used with a regex target_modules "
                             f"(as in PEFT)")
    layers_pattern = raw.get("layers_pattern")
    if layers_pattern is not None:
        if not (isinstance(layers_pattern, str) or (isinstance(layers_pattern, list)
                                                   and all(isinstance(v, str) for v in layers_pattern))):
            raise _bad(file, "layers_pattern", "a str or a list of str", layers_pattern)
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            error = regex_error(pattern, layers_pattern_regex)
            if error is not None:
                raise ValueError(f"{file}: field 'layers_pattern' has an invalid regex {pattern!r} ({error})")
        if layers_pattern and layers_to_transform is None:
            raise ValueError(f"{file}: field 'layers_pattern' needs 'layers_to_transform' (as in PEFT)")
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is not None:
        if not isinstance(modules_to_save, list) or not all(isinstance(v, str) and v for v in modules_to_save):
            raise _bad(file, "modules_to_save", "a list of module names", modules_to_save)
        for entry in modules_to_save:
            error = regex_error(entry, modules_to_save_regex)
            if error is not None:
                raise ValueError(f"{file}: field 'modules_to_save' has an invalid regex entry {entry!r} ({error})")
        modules_to_save = modules_to_save or None
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        warn_at_caller(f"{file}: init_lora_weights={init!r}: this adapter was trained on a base model that PEFT "
                       f"modified (residual weights); it is loaded as is, so pass that modified base model")
    if isinstance(init, str) and init.lower() == "mica":  # PEFT's MiCA: plain LoRA's forward and merge, B frozen
        warn_at_caller(f"{file}: init_lora_weights='mica': PEFT trains this adapter's lora_A only (lora_B frozen); "
                       f"here lora_B loads trainable as in plain LoRA. To go on training it as MiCA, freeze the "
                       f"lora_B weights (requires_grad_(False))")
    return AdapterConfig(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=flags["use_rslora"],
                         fan_in_fan_out=flags["fan_in_fan_out"], target_modules=target_modules,
                         exclude_modules=exclude_modules,
                         rank_pattern=_check_pattern(file, "rank_pattern", raw.get("rank_pattern"), "rank"),
                         alpha_pattern=_check_pattern(file, "alpha_pattern", raw.get("alpha_pattern"), "alpha"),
                         layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                         modules_to_save=modules_to_save, bias=bias,
                         task_type=raw["task_type"] if isinstance(raw.get("task_type"), str) else None,
                         peft_version=raw.get("peft_version"))


def _check_path(op, path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: path expected a directory path (str or os.PathLike), got {type(path).__name__}")


def _check_directory_to_create(op, path):
    """save_peft_adapter's path is a directory it may create: one that names a file, or lies under one, is refused
    before any work (os.makedirs raised a bare FileExistsError / NotADirectoryError after the checks); so is one
    holding a directory where a file of the adapter goes, which _atomic_write's rename would meet only after renaming
    the other file (new weights beside the old config)."""
    existing = os.path.abspath(os.fspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "which" if existing == os.path.abspath(os.fspath(path)) else f"under {existing!r}, which"
        raise ValueError(f"{op}: path expected a directory (created if missing), got {os.fspath(path)!r}, {where} "
                         f"is a file")
    if existing != os.path.abspath(os.fspath(path)):
        return  # made by the save: empty
    for name in (SAFETENSORS_NAME, CONFIG_NAME):
        target = os.path.join(existing, name)
        if os.path.isdir(target) and not os.path.islink(target):  # a link is replaced by the rename, as a file
            raise ValueError(f"{op}: path {os.fspath(path)!r} holds a directory named {name!r}, where the adapter's "
                             f"file goes; nothing was written")


def _check_adapter_name(op, adapter_name):
    """None (the LoRALinear adapter) or the name of a MultiLoRALinear slot: a non-empty str other than "__base__",
    which names the base model in a mixed batch."""
    if adapter_name is None:
        return
    if not isinstance(adapter_name, str):  # a wrong type is a TypeError, as for every other argument
        raise TypeError(f"{op}: adapter_name expected None or a non-empty str other than {BASE_ADAPTER!r}, got "
                        f"{adapter_name!r}")
    if not adapter_name or adapter_name == BASE_ADAPTER:
        raise ValueError(f"{op}: adapter_name expected None or a non-empty str other than {BASE_ADAPTER!r}, got "
                         f"{adapter_name!r}")


# A Hugging Face Hub repo id, "namespace/name", as PEFT's from_pretrained takes one.
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_adapter_dir(op, path, *, revision=None, subfolder=None):
    """The local directory that holds the adapter files: `path` (joined with `subfolder`) when it exists locally (a
    file is refused by name later) or cannot be a Hub repo id, else the files of the Hub repo `path` at `revision`,
    downloaded by huggingface_hub (its cache, token and HF_HUB_OFFLINE apply): adapter_config.json and
    adapter_model.safetensors, or adapter_model.bin where the repo has no safetensors file, as PEFT fetches them."""
    _check_path(op, path)
    for name, value in (("revision", revision), ("subfolder", subfolder)):
        if value is not None and not (isinstance(value, str) and value.strip("/")):
            raise TypeError(f"{op}: {name} expected a non-empty str or None, got {value!r}")
    subfolder = subfolder.strip("/") if subfolder else None  # "/sub" must not join to the root directory
    local = os.fspath(path)
    if os.path.exists(local) or not (isinstance(path, str) and _REPO_ID_RE.fullmatch(path)):
        if revision is not None:
            raise ValueError(f"{op}: revision={revision!r} selects a version of a Hugging Face Hub repo, but {local!r} "
                             f"is a local path")
        return os.path.join(local, subfolder) if subfolder else local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{op}: {path!r} is not a local directory; loading it as a Hugging Face Hub repo needs "
                         f"huggingface_hub (pip install huggingface_hub)") from None
    prefix = subfolder + "/" if subfolder else ""
    try:
        root = snapshot_download(path, revision=revision,
                                 allow_patterns=[prefix + CONFIG_NAME, prefix + SAFETENSORS_NAME])
        if not os.path.isfile(os.path.join(root, prefix + SAFETENSORS_NAME)):  # an older adapter: .bin only
            root = snapshot_download(path, revision=revision, allow_patterns=[prefix + BIN_NAME])
    except Exception as exc:  # no such repo or revision, offline without a cached copy, HTTP errors, ...
        raise ValueError(f"{op}: {path!r} is not a local directory, and fetching it from the Hugging Face Hub "
                         f"failed: {type(exc).__name__}: {exc}") from exc
    return os.path.join(root, subfolder) if subfolder else root


def read_adapter_config(path):
    """AdapterConfig of the adapter directory `path` (adapter_config.json, validated)."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        if os.path.isfile(path):  # the adapter's config or weights file itself, as some loaders take it
            hint = (f"; {path} is a file: pass the directory that holds {CONFIG_NAME} and the weights "
                    f"({os.path.dirname(path) or '.'})")
        else:  # PEFT's save_pretrained writes a named adapter (adapter_name="x", other than "default") into path/x
            named = sorted(entry for entry in (os.listdir(path) if os.path.isdir(path) else [])
                           if os.path.isfile(os.path.join(path, entry, CONFIG_NAME)))
            hint = (f"; adapters saved under a name are in subfolders: {', '.join(named)} (pass "
                    f"{os.path.join(path, named[0])}, or subfolder={named[0]!r})" if named else "")
        raise FileNotFoundError(f"load_peft_adapter: {file} not found{hint}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: malformed JSON ({exc})") from None
    return parse_adapter_config(raw, file)


# ----------------------------------------------------------------------------------------------------------- weights

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_safetensors(file):
    """{name: tensor} of a safetensors file, its data read once into one bytearray that the tensors view (disjoint
    ranges; the loader copies them into the model). Not safetensors' load_file (0.8.0), which keeps ~56 bytes per
    tensor per call for good (25 KB per load of a 448-tensor adapter: a server loading adapters for days piles it
    up), nor its load() of the file's bytes, which copies every tensor out of them: 2x the file's size at peak, GBs
    for an adapter with modules_to_save heads (embed_tokens, lm_head). A dtype not listed above (F8_E8M0, F4, ...)
    goes to load_file, as before."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("header too small")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, 100_000_000):
            raise ValueError("header too large" if header_size > 100_000_000 else "invalid header length")
        header = json.loads(f.read(header_size))
        entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
        if entries is None or not all(isinstance(v, dict) for v in entries.values()):
            raise ValueError("the header is not a JSON object of tensor entries")
        if any(v.get("dtype") not in _SAFETENSORS_DTYPES for v in entries.values()):
            from safetensors.torch import load_file
            return load_file(file, device="cpu")
        data = bytearray(size - 8 - header_size)
        if f.readinto(data) != len(data):
            raise ValueError("the file shrank while it was read")
    tensors, end = {}, 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].get("data_offsets", [None])[0] or 0):
        dtype, shape, offsets = _SAFETENSORS_DTYPES[entry["dtype"]], entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or offsets[0] != end
                or not all(type(o) is int for o in offsets)):
            raise ValueError(f"invalid entry for {name!r} (shape {shape!r}, data_offsets {offsets!r})")
        count = 1
        for d in shape:
            count *= d
        end = offsets[1]
        if end - offsets[0] != count * dtype.itemsize or end > len(data):
            raise ValueError(f"{name!r}: data_offsets {offsets} do not hold shape {shape} of {entry['dtype']}")
        tensor = (torch.frombuffer(data, dtype=dtype, count=count, offset=offsets[0]) if count
                  else torch.empty(0, dtype=dtype))
        tensors[name] = tensor.reshape(shape)
    if end != len(data):
        raise ValueError("incomplete metadata, file not fully covered")
    if sys.byteorder == "big":  # safetensors stores little-endian
        tensors = {k: t.view(torch.uint8).reshape(-1, t.element_size()).flip(-1).contiguous().view(t.dtype)
                   .reshape(t.shape) if t.element_size() > 1 and t.numel() else t for k, t in tensors.items()}
    return tensors


def read_adapter_weights(path):
    """({key: tensor} on CPU, the file read) from adapter_model.safetensors (preferred, as PEFT) or adapter_model.bin
    (torch.load with weights_only=True). Unreadable or truncated files raise ValueError naming the file."""
    file = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(file):
        try:
            tensors = _read_safetensors(file)
        except Exception as exc:  # our header checks, safetensors' SafetensorError (header/size checks) or OSError
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    else:
        file = os.path.join(path, BIN_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"load_peft_adapter: neither {SAFETENSORS_NAME} nor {BIN_NAME} found in {path}")
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors, or objects weights_only refuses
            raise ValueError(f"{file}: not a readable torch checkpoint (truncated or corrupt?): {exc}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{file}: expected a flat mapping of names to tensors")
    return tensors, file


_LORA_BIAS_HINT = " (PEFT's lora_bias: a bias on lora_B, which is not supported; the config has lora_bias=false)"


def _is_lora_b_bias(key):
    return re.search(r"\.lora_B(\.[^.]+)?\.bias$", key) is not None


def _key_hint(key, bias):
    if "lora_magnitude_vector" in key:
        return " (DoRA magnitude: DoRA is not supported)"
    if "lora_embedding" in key:
        return " (LoRA on an embedding: only linear layers are supported)"
    if ".base_layer." in key:
        return (" (a wrapped layer's own tensor, which PEFT saves for a targeted embedding layer such as lm_head; "
                "here that module is no target, or has no such tensor)")
    if _is_lora_b_bias(key):
        return _LORA_BIAS_HINT
    if key.endswith(".bias"):
        if bias != "none":
            return f" (a bias, as bias={bias!r} saves them, of no module of this model)"
        return " (a bias, which PEFT saves with bias='all' or 'lora_only'; the config has bias='none')"
    if ".modules_to_save." in key or ".original_module." in key:
        return (" (PEFT's wrapper name of a modules_to_save module: read for a module the config selects, under "
                "that module's own keys and shapes only)")
    return ""


def group_adapter_weights(tensors, file, modules_to_save=None, bias="none"):
    """{module name: {"lora_A": tensor, "lora_B": tensor}} from PEFT keys. Keys may still carry an adapter name
    (`.lora_A.default.weight`), one name for the whole file. Unknown keys and non-floating tensors raise ValueError
    (modules_to_save, bias: the config's, for the message; their modules' and biases' keys are taken out before)."""
    grouped, adapter_names, unexpected = {}, set(), []
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if match is None:
            unexpected.append(key)
            continue
        adapter_names.add(match.group("adapter"))
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{file}: tensor {key!r} expected a floating dtype, got {tensor.dtype}")
        if tensor.dim() != 2:
            raise ValueError(f"{file}: tensor {key!r} expected 2 dimensions, got shape {tuple(tensor.shape)}")
        factors = grouped.setdefault(match.group("module"), {})
        if match.group("factor") in factors:
            raise ValueError(f"{file}: two tensors for {match.group('module')}.{match.group('factor')}")
        factors[match.group("factor")] = tensor
    if unexpected:
        shown = ", ".join(f"{k!r}{_key_hint(k, bias)}" for k in sorted(unexpected)[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        heads = (f", or the state of a module that modules_to_save {modules_to_save} selects in this model"
                 if modules_to_save else "")
        raise ValueError(f"{file}: unexpected keys {shown}{more}; expected only "
                         f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'{heads}")
    if len(adapter_names) > 1:
        named = sorted(name for name in adapter_names if name is not None)
        unnamed = " and keys without one" if None in adapter_names else ""
        raise ValueError(f"{file}: the keys carry several adapter names ({named}{unnamed}); expected one adapter "
                         f"per file")
    if not grouped:
        raise ValueError(f"{file}: holds no LoRA tensors")
    return grouped


# -------------------------------------------------------------------------------------------------------------- load

def _targets(model, config, op, into_slots):
    """([(name, module)] that the config targets in `model`, with PEFT's matching (inside LoRA wrappers excluded),
    [names of the targets left out]). An nn.MultiheadAttention's out_proj, which the attention reads the weight of
    and never calls (a file saved with "all-linear" on a model with one lists it): PEFT's LoRA there changes no
    output until merge_and_unload folds it into the weight. A single adapter wraps it as PEFT does (its biases,
    heads and merge as PEFT's), with a warning; into slots (`into_slots`), where prepare_multi_adapter left it out,
    it is left out with a warning, its factors unloaded."""
    refuse_uninitialised_modules(op, model)
    found = named_target_modules(model, config.target_modules, config.exclude_modules,
                                 layers_to_transform=config.layers_to_transform,
                                 layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save, op=op)
    if not found:
        raise ValueError(f"{op}: the adapter's target_modules {config.target_modules!r} match no module of the model")
    out_projs = [name for name, module in found
                 if not isinstance(module, LORA_WRAPPERS) and is_attention_out_proj(model, name)]
    if out_projs:
        shown = ", ".join(repr(name) for name in out_projs[:3]) + (" ..." if len(out_projs) > 3 else "")
        warn_at_caller(f"{op}: {len(out_projs)} targeted layer(s) are {ATTENTION_OUT_PROJ} ({shown}): their LoRA "
                       f"factors change no output and get no gradient, as in PEFT, "
                       + ("so they are left out of the slots, unloaded" if into_slots else
                          "until merge_and_unload folds them into the weight"))
    left_out = out_projs if into_slots else []
    return [(name, module) for name, module in found if name not in left_out], left_out


def _pop_state_tensor(op, file, rest, file_key, current, owner, why):
    """The file's tensor for the model tensor `current` (described by `owner`), popped from `rest`: present, of
    current's shape and kind of dtype, and bound for a materialised tensor; else ValueError naming the key."""
    if current.is_meta:
        raise ValueError(f"{op}: {owner} is on the meta device; load the adapter into a model whose weights are "
                         f"materialised")
    tensor = rest.pop(file_key, None)
    if tensor is None:
        raise ValueError(f"{op}: {file} is missing {file_key!r} ({why})")
    if tensor.shape != current.shape or tensor.dtype.is_floating_point != current.dtype.is_floating_point:
        raise ValueError(f"{op}: {file_key!r} in {file} expected shape {list(current.shape)} and a "
                         f"{'floating' if current.dtype.is_floating_point else 'non-floating'} dtype ({owner}), "
                         f"got shape {list(tensor.shape)}, {tensor.dtype}")
    return tensor


def _modules_to_save_entries(model, config, tensors):
    """The config's modules_to_save entries, plus the full name of each module that only PEFT <= 0.21's plain suffix
    test selected and whose whole state the file holds: a file written under that rule ("proj" selected "q_proj",
    saved whole), read as its writer meant. Named, the module is selected by either rule, in a save of the model
    too. Not for a file PEFT >= 0.22 wrote, nor the embedding layers (whose whole weights a file may hold for
    save_embedding_layers)."""
    if _written_by_peft_0_22_or_later(config.peft_version):
        return list(config.modules_to_save)
    embeddings = {id(embedding_layer(model, getter)) for getter in ("get_input_embeddings", "get_output_embeddings")}
    written = []
    for name, module in suffix_only_modules_to_save(model, config.modules_to_save):
        state, prefix = module.state_dict(), f"{KEY_PREFIX}{state_dict_name(name)}."
        # the whole state: not a bias="all" file's bias alone
        if id(module) not in embeddings and state and all(prefix + key in tensors for key in state):
            written.append(state_dict_name(name))
    return list(config.modules_to_save) + written


def _written_by_peft_0_22_or_later(peft_version):
    """Whether an adapter_config.json's peft_version ("0.22.0", "0.22.1.dev0@<commit>") is 0.22 or later: PEFT
    writes it since 0.18; lora_kernels writes none."""
    match = re.match(r"(\d+)\.(\d+)", peft_version) if isinstance(peft_version, str) else None
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (0, 22)


def _split_modules_to_save(model, config, tensors, file, adapter_name, op):
    """([(name, module, {state key: tensor})] for each module the config's modules_to_save selects in model, the
    remaining tensors, the entries that select them (_modules_to_save_entries)). Each selected module's whole state
    must be in the file, shapes equal."""
    if not config.modules_to_save:
        return [], tensors, None
    entries = _modules_to_save_entries(model, config, tensors)
    if adapter_name is not None:
        # entries that select no module of this model leave nothing trained whole (PEFT's load_adapter takes the file
        # as another adapter); any keys of such a module left in the file are unexpected keys
        selected = selected_modules_to_save(model, entries)
        if not selected:
            return [], tensors, None
        name = selected[0][0]
        # an entry that ends the name other than as whole components selects it only in a file of the old rule
        # (_modules_to_save_entries)
        old_rule = name not in {n for n, _ in selected_modules_to_save(model, config.modules_to_save)}
        why = ("; by PEFT <= 0.21's plain-suffix rule, which the file was written under, as it holds the module's "
               "whole state") if old_rule else ""
        raise ValueError(f"{op}: {file} has modules_to_save {config.modules_to_save}, which selects module {name!r} "
                         f"(whole modules trained with the adapter{why}); MultiLoRALinear slots hold LoRA factors "
                         f"only, so it cannot load by adapter_name")
    rest, heads = dict(tensors), []
    for name, module in named_modules_to_save(model, entries, op):
        # PEFT's files may also hold a module's state under its wrapper's names: the trained copy
        # (`<module>.modules_to_save.<key>`) and the original (`<module>.original_module.<key>`), both from its
        # save_embedding_layers (a resized vocabulary) or bias="all" (their biases). PEFT loads `<module>.<key>`
        # over the module and ignores them; so do we (the original is not kept here: the module is replaced in place),
        # for the module's own keys and shapes (anything else stays, refused as unexpected). The trained copy's keys
        # may carry the adapter name (`<module>.modules_to_save.default.<key>`, PEFT >= 0.18's bias="all").
        state, prefix = module.state_dict(), f"{KEY_PREFIX}{state_dict_name(name)}."
        wrapper_names = tuple(f"{prefix}{part}." for part in ("modules_to_save", "original_module"))
        for file_key in [key for key in rest if key.startswith(wrapper_names)]:
            part, _, key = file_key[len(prefix):].partition(".")
            if part == "modules_to_save" and key not in state:
                key = key.partition(".")[2]  # past the adapter name
            if key in state and rest[file_key].shape == state[key].shape:
                del rest[file_key]
        loaded = {key: _pop_state_tensor(op, file, rest, f"{prefix}{key}", current,
                                         f"{key!r} of module {name!r} (modules_to_save)",
                                         f"modules_to_save {config.modules_to_save} selects module {name!r}")
                  for key, current in state.items()}
        heads.append((name, module, loaded))
    return heads, rest, entries


def _bias_file_keys(model, bias, lora_names, head_names):
    """{file key: (state-dict key, tensor)} of the biases that `bias` trains and saves (trained_biases), under PEFT's
    keys: a LoRA layer's bias is `<layer>.base_layer.bias` there, since PEFT wraps the original layer."""
    return {f"{KEY_PREFIX}{layer}.base_layer.bias" if layer is not None else f"{KEY_PREFIX}{key}": (key, tensor)
            for key, tensor, layer in trained_biases(model, bias, lora_names, head_names)}


def _split_biases(model, config, tensors, file, adapter_name, op, lora_names, heads):
    """([(state-dict key, model tensor, file tensor)] for each bias the config's bias mode trains in model, the
    remaining tensors). `lora_names`: the modules that will be LoRA layers. Each such bias must be in the file,
    shapes equal, and every other bias key of the file must be one of them."""
    if config.bias == "none":
        return [], tensors
    if adapter_name is not None:
        return [], _check_shared_biases(model, config, tensors, file, op, adapter_name)
    rest, biases = dict(tensors), []
    expected = _bias_file_keys(model, config.bias, lora_names, [name for name, *_ in heads])
    # PEFT before 0.21 saved no bias with bias="lora_only" (it looked for `<layer>.bias`; a LoRA layer's is
    # `<layer>.base_layer.bias`), so its files hold none, and PEFT loads them over the base biases: the same here. A
    # file holding some of them is refused as incomplete.
    saved_none = config.bias == "lora_only" and expected and not any(file_key in rest for file_key in expected)
    for file_key, (key, current) in expected.items():
        tensor = current.detach().clone() if saved_none else _pop_state_tensor(
            op, file, rest, file_key, current, f"the model's {key!r}",
            f"bias={config.bias!r} trains the model's {key!r}")
        biases.append((key, current, tensor))
    unmatched = sorted(k for k in rest if k.endswith(".bias"))
    lora_b_biases = [k for k in unmatched if _is_lora_b_bias(k)]
    if lora_b_biases:
        raise ValueError(f"{op}: {file} has {lora_b_biases[0]!r}{' and more' if len(lora_b_biases) > 1 else ''}"
                         f"{_LORA_BIAS_HINT}")
    if unmatched:
        where = "a LoRA layer's" if config.bias == "lora_only" else "the model's"
        raise ValueError(f"{op}: {file} has {unmatched[0]!r}{' and more' if len(unmatched) > 1 else ''}, which maps "
                         f"to no bias that bias={config.bias!r} trains in this model (expected {where} biases: "
                         f"{sorted(expected)[:3]}{' ...' if len(expected) > 3 else ''})")
    if saved_none:
        warn_at_caller(f"{op}: {file} has bias='lora_only' but holds no bias of its LoRA layers (e.g. "
                       f"{next(iter(expected))!r}): PEFT before 0.21 saved none, so the biases trained with it are "
                       f"lost; the model's own biases are kept and train, as in PEFT")
    return biases, rest


def _check_shared_biases(model, config, tensors, file, op, adapter_name):
    """The tensors but the biases, for a load by adapter_name: MultiLoRALinear slots share the base layers' biases
    with every adapter, so each bias the file holds must equal the model's (a MultiLoRALinear's state-dict key is
    PEFT's `<layer>.base_layer.bias`; PEFT names the bias of a layer the adapter does not target `<layer>.bias`, which
    is `<layer>.base_layer.bias` here too once that layer is prepared for another adapter); a file whose bias mode found
    no bias (a Llama's) holds none, and loads, as in PEFT. One that trained them is refused; a key of no bias of the
    model stays, refused as unexpected."""
    rest = dict(tensors)
    state = model.state_dict(keep_vars=True)
    for file_key in [key for key in tensors if key.endswith(".bias")]:
        key = file_key[len(KEY_PREFIX):] if file_key.startswith(KEY_PREFIX) else None
        if key not in state and key is not None and ".base_layer." not in key:
            key = f"{key.removesuffix('.bias')}.base_layer.bias"
        if key in state:
            _pop_base_model_tensor(op, file, rest, file_key, state[key], f"the model's {key!r}",
                                   f"a base bias (bias={config.bias!r})", adapter_name)
    return rest


def _pop_base_model_tensor(op, file, rest, file_key, current, owner, what, adapter_name):
    """_pop_state_tensor for a tensor of the base model that the file holds whole (`what`, for the message), which
    is loaded over the model's. With adapter_name only one equal to the model's loads: MultiLoRALinear slots share
    the base model with every adapter."""
    tensor = _pop_state_tensor(op, file, rest, file_key, current, owner, "")
    if adapter_name is None:
        return tensor
    # compared in the narrower dtype: a file saved from the model in bf16 holds its fp32 weights rounded (PEFT saves
    # in the model's dtype), the same weights; the model keeps its own
    both_floating = tensor.dtype.is_floating_point and current.dtype.is_floating_point
    narrower = (min(tensor.dtype, current.dtype, key=lambda dtype: torch.finfo(dtype).bits) if both_floating
                else current.dtype)
    if not torch.equal(tensor.to(narrower), current.detach().cpu().to(narrower)):
        compared = f" (compared in {narrower})" if tensor.dtype != current.dtype else ""
        raise ValueError(f"{op}: {file} holds {file_key!r}, {what}, and it differs from the model's{compared}; "
                         f"MultiLoRALinear slots share the base layers and embeddings with every adapter, so it "
                         f"cannot load by adapter_name")
    return tensor


def _unprepared_error(op, adapter_name, name, module):
    fix = ("prepare_multi_adapter refuses LoRALinear layers: prepare a fresh base model (save this model's adapter "
           "with save_peft_adapter to load it there by name too)" if isinstance(module, LoRALinear) else
           "call prepare_multi_adapter with target_modules covering it first")
    return ValueError(f"{op}: adapter_name={adapter_name!r} loads into MultiLoRALinear slots, but module {name!r} "
                      f"is a {type(module).__name__}; {fix}")


def _split_base_layers(targets, tensors, file, adapter_name, op):
    """([(state-dict key, model tensor, file tensor)] for each base-layer tensor of a LoRA target that the file holds,
    the remaining tensors). PEFT saves the whole layer a LoRA wraps when target_modules names an embedding layer
    ("lm_head", "embed_tokens": save_embedding_layers="auto", for a resized vocabulary), under its wrapper's keys
    `<layer>.base_layer.weight` (and `.bias`), and loads them over the model's: so do we. Our state-dict key is
    `<layer>.weight`, before and after the layer is wrapped."""
    found, rest = [], dict(tensors)
    for name, module in targets:
        base = module.base_layer if isinstance(module, MultiLoRALinear) else module
        key_name = state_dict_name(name)
        for leaf in ("weight", "bias"):
            file_key = f"{KEY_PREFIX}{key_name}.base_layer.{leaf}"
            current = getattr(base, leaf, None)
            if file_key not in rest or not isinstance(current, torch.Tensor):
                continue  # a bias key of a layer without bias stays in rest, refused as unexpected
            tensor = _pop_base_model_tensor(
                op, file, rest, file_key, current, f"module {name!r}'s {leaf}", f"the base layer's own {leaf} (PEFT "
                f"saves it when target_modules names an embedding layer)", adapter_name)
            found.append((f"{key_name}.{leaf}", current, tensor))
    return found, rest


def _embedding_layers(model, skip):
    """[(name, module)] of the model's input and output embedding layers (transformers' get_input_embeddings /
    get_output_embeddings: embed_tokens, lm_head) but the modules named in `skip` (LoRA targets, whose base layer
    PEFT saves as `<layer>.base_layer.*`, and modules_to_save modules, saved whole anyway)."""
    layers = _embedding_layer_modules(model)
    return [(name, module) for name, module in model.named_modules()
            if name and name not in skip and any(module is layer for layer in layers)]


def _embedding_layer_modules(model):
    return [embedding_layer(model, getter) for getter in ("get_input_embeddings", "get_output_embeddings")]


def _split_embedding_layers(model, targets, heads, tensors, file, adapter_name, op):
    """([(state-dict key, model tensor, file tensor)] for the input and output embedding layers (embed_tokens,
    lm_head) that the file holds whole, the remaining tensors). PEFT saves them under their plain keys
    (`<layer>.weight`) when the vocabulary was resized (save_embedding_layers="auto" compares the base model's
    vocab_size; True saves them always) and loads them over the model's: so do we, frozen. A LoRA target's own
    tensors are `<layer>.base_layer.*` (_split_base_layers); a modules_to_save module's are taken out before."""
    found, rest = [], dict(tensors)
    skip = {name for name, _ in targets} | {name for name, *_ in heads}
    for name, module in _embedding_layers(model, skip):
        key_name = state_dict_name(name)
        # one prepared for other adapters (slots) holds the layer as its base_layer; the file names the plain layer
        base = module.base_layer if isinstance(module, MultiLoRALinear) else module
        for leaf, current in base.state_dict(keep_vars=True).items():
            file_key = f"{KEY_PREFIX}{key_name}.{leaf}"
            if file_key not in rest:
                continue
            tensor = _pop_base_model_tensor(
                op, file, rest, file_key, current, f"embedding layer {name!r}'s {leaf}", f"the embedding layer's "
                f"{leaf} (PEFT saves it for a resized vocabulary)", adapter_name)
            found.append((f"{key_name}.{leaf}", current, tensor))
    return found, rest


def _check_pair(op, file, name, factors, r, in_features, out_features):
    for factor, shape in (("lora_A", (r, in_features)), ("lora_B", (out_features, r))):
        tensor = factors.get(factor)
        if tensor is None:
            raise ValueError(f"{op}: {file} is missing '{KEY_PREFIX}{name}.{factor}.weight' (the config targets "
                             f"module {name!r})")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: '{KEY_PREFIX}{name}.{factor}.weight' in {file} expected shape {list(shape)} "
                             f"(r={r}, module [in={in_features}, out={out_features}]), got {list(tensor.shape)}")


def _check_target_type(op, name, module):
    """ValueError naming the module unless it is a layer the loader can put a LoRA on (nn.Linear, transformers
    Conv1D, or a LoRA layer of lora_kernels): a PEFT layer (a PeftModel was passed), or a Conv/Embedding layer that
    PEFT adapts and lora_kernels does not (Whisper's and ViT's Conv targets)."""
    if isinstance(module, (nn.Linear, *LORA_WRAPPERS)) or is_conv1d(module):
        return
    if type(module).__module__.startswith("peft."):
        raise ValueError(f"{op}: module {name!r} is a PEFT layer ({type(module).__name__}); pass the base model, "
                         f"not a PeftModel")
    raise ValueError(f"{op}: the adapter targets module {name!r}, a {type(module).__name__}; only nn.Linear and "
                     f"transformers' Conv1D (GPT-2's linear layer) are supported"
                     f"{_PEFT_ONLY_HINT if isinstance(module, PEFT_ONLY_LAYERS) else ''}")


def _plan_layers(op, model, file, config, targets, grouped, adapter_name):
    """[(name, module, r, alpha)] for each target: checked that it can take the adapter (a MultiLoRALinear by
    adapter_name and within its max_rank, an unmerged LoRALinear of the same rank, a wrappable nn.Linear / Conv1D)
    and that the file holds its factors in the shapes its r and features call for."""
    plan = []
    if not all(isinstance(module, LORA_WRAPPERS) for _, module in targets):
        refuse_new_layers_under_fsdp1(op, model)
    for name, module in targets:
        r, alpha = config.rank_and_alpha(state_dict_name(name))
        if isinstance(module, MultiLoRALinear):
            if adapter_name is None:
                raise ValueError(f"{op}: module {name!r} is a MultiLoRALinear; pass adapter_name=... to load the "
                                 f"adapter into a slot")
            if r > module.max_rank:
                raise ValueError(f"{op}: module {name!r} holds ranks up to {module.max_rank}, the adapter has r={r}")
            scaling = lora_scaling(r, alpha, config.use_rslora)
            if abs(scaling) > torch.finfo(module.scalings.dtype).max:  # set_adapter refused it half-way through
                rule = "lora_alpha / sqrt(r)" if config.use_rslora else "lora_alpha / r"
                raise ValueError(f"{op}: module {name!r}: the adapter's scaling {scaling!r} ({rule}, lora_alpha "
                                 f"{alpha!r}, r={r}) is past the range of the slots' {module.scalings.dtype}; the "
                                 f"model is unchanged")
            in_features, out_features = module.in_features, module.out_features
            _check_not_flattened(op, name, "lora_a", module.lora_a, (module.max_adapters, module.max_rank,
                                                                     in_features), _LOAD_UNDER_FSDP1)
            _check_not_flattened(op, name, "lora_b", module.lora_b, (module.max_adapters, out_features,
                                                                     module.max_rank), _LOAD_UNDER_FSDP1)
        elif adapter_name is not None:
            raise _unprepared_error(op, adapter_name, name, module)
        elif isinstance(module, LoRALinear):
            module.refuse_offloaded(op)
            if module.merged:
                raise ValueError(f"{op}: module {name!r} has a merged adapter; unmerge() it first")
            if module.r != r:
                raise ValueError(f"{op}: module {name!r} is a LoRALinear of r={module.r}, the adapter has r={r} there; "
                                 f"load into the base model or a model injected with the adapter's ranks")
            in_features, out_features = module.in_features, module.out_features
            for what, factor, shape in (("lora_A.weight", module.lora_A.weight, (module.r, in_features)),
                                        ("lora_B.weight", module.lora_B.weight, (out_features, module.r))):
                _check_not_flattened(op, name, what, factor, shape, _LOAD_UNDER_FSDP1)
        else:  # nn.Linear or transformers Conv1D: _check_target_type let nothing else through
            check_no_accelerate_hook(op, name, module)
            check_no_offloading_ancestor(op, model, name)
            check_wrappable_linear(op, f"module {name!r}", module)
            in_features, out_features = in_out_features(module)
        weight = module.base_weight() if isinstance(module, LORA_WRAPPERS) else module.weight
        if weight.is_meta:  # the adapter would be copied into meta tensors, which hold nothing
            raise ValueError(f"{op}: module {name!r} has its weight on the meta device; load the adapter into a model "
                             f"whose weights are materialised")
        if not isinstance(module, MultiLoRALinear):  # a LoRALinear's (or the one made for it) runs in the weight's
            check_layer_scaling(f"{op}: module {name!r}", lora_scaling(r, alpha, config.use_rslora), weight.dtype,
                                f"the adapter's {scaling_source(r, alpha, config.use_rslora)}")
        _check_pair(op, file, state_dict_name(name), grouped.get(name, {}), r, in_features, out_features)
        plan.append((name, module, r, alpha))
    return plan


def load_peft_adapter(model, path, adapter_name=None, *, backend="auto", autocast_adapter_dtype=True, revision=None,
                      subfolder=None):
    """Loads the PEFT LoRA adapter saved in directory `path` into `model` (the base model, not a PeftModel) and
    returns model.

    path: a local directory, or, as in PeftModel.from_pretrained, a Hugging Face Hub repo id ("namespace/name") that
    is not one: its adapter_config.json and weights are downloaded through huggingface_hub, at `revision` (a branch,
    tag or commit; None: the default branch); a missing relative path that reads as "namespace/name" is looked up
    there too, so a ValueError naming the failed download reports it, not FileNotFoundError. subfolder: the adapter's
    directory inside path or the repo.

    adapter_name=None: every module the config targets becomes a LoRALinear (nn.Linear, or transformers Conv1D with
    its [in, out] weight) holding the adapter, in the train/eval mode of the layer it replaces, with float32 factors
    for 16-bit layers unless autocast_adapter_dtype=False (PEFT's default and option); modules that are LoRALinear
    already (inject_lora) get the weights when their rank matches (alpha, rsLoRA and dropout are taken from the
    file) and keep their backend and factor dtype: backend and autocast_adapter_dtype set up the layers this call
    creates (with adapter_name, none: the prepared layers keep theirs). Every non-LoRA parameter is frozen
    and lora_A/lora_B train, like inject_lora. Modules that the config's modules_to_save selects (a classification
    head; by whole name components, PEFT 0.22's rule, and also, in a file whose peft_version is not 0.22 or later, a
    module that the plain-suffix rule of PEFT 0.21 and earlier selected and whose whole state the file holds) get
    their saved state and train whole; unlike PEFT, which keeps the originals beside a trained copy, their state is
    replaced in place (load into a fresh base model to keep it). With the config's bias "all" or
    "lora_only" (PEFT's option, see inject_lora) the file's biases are copied into the model's, which then train;
    every bias that mode selects must be in the file, and every bias of the file must map to one. Except: a
    "lora_only" file without any bias, as PEFT before 0.21 saved them, loads with a warning, keeping the model's
    biases (trainable), as PEFT does. A target's own weight in the file (`<layer>.base_layer.weight`, which PEFT saves
    when target_modules names "lm_head" or "embed_tokens") is copied into the layer's base weight, frozen, as PEFT
    loads it; so are the input and output embedding layers that the file holds whole (PEFT's save_embedding_layers,
    for a resized vocabulary), which save_peft_adapter writes again. Like modules_to_save modules, these keep no
    original: into a model holding the biases, base weights or embedding layers that an adapter loaded (or injected)
    before trained or wrote, a file that does not overwrite them all is refused (ValueError; load into a fresh base
    model), as one without that adapter's modules_to_save is.

    adapter_name="name": the model was prepared with prepare_multi_adapter; the adapter goes into a slot of every
    MultiLoRALinear (the one already named so, else the first free one) and `model.lora_adapter_slots[name]` records
    it; layers the adapter does not target get that slot cleared. Mix adapters per row with set_batch_adapters.
    Slots hold LoRA factors only: an adapter with modules_to_save or a bias other than "none" is refused, and so is a
    base weight in the file that differs from the model's (the base layer is every adapter's).

    A model built on the meta device: a base weight still there is refused (ValueError naming the module); LoRA
    tensors still there while the base weight is loaded (wrapped on the meta device, then the base checkpoint loaded
    with load_state_dict(..., assign=True)) are made on the base weight's device, holding the file's values (a
    MultiLoRALinear's other slots empty).

    Atomic: the config, tensors, targets, keys and shapes are all checked first (ValueError naming the field, key
    or module; FileNotFoundError for missing files); on any failure the model is left exactly as it was."""
    op = "load_peft_adapter"
    wrapper, model = model, unwrap_model(model, op, adds_parameters=True)
    check_backend_name(op, backend)
    autocast_adapter_dtype = check_flag(op, "autocast_adapter_dtype", autocast_adapter_dtype)
    _check_adapter_name(op, adapter_name)  # before any file is read or downloaded
    path = resolve_adapter_dir(op, path, revision=revision, subfolder=subfolder)
    config = read_adapter_config(path)
    tensors, file = read_adapter_weights(path)
    targets, left_out = _targets(model, config, op, into_slots=adapter_name is not None)
    if adapter_name is not None:  # before the file's tensors are matched to the layers, which assumes slots
        for name, module in targets:
            if isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d(module):
                raise _unprepared_error(op, adapter_name, name, module)
    heads, tensors, modules_to_save = _split_modules_to_save(model, config, tensors, file, adapter_name, op)
    check_targets_outside_heads(op, targets, [(name, module) for name, module, _ in heads], modules_to_save, file)
    biases, tensors = _split_biases(model, config, tensors, file, adapter_name, op, {name for name, _ in targets},
                                    heads)
    for name, module in targets:  # before the tensors: a Conv layer's 3-D/4-D factors would be refused by shape
        _check_target_type(op, name, module)
    base_tensors, tensors = _split_base_layers(targets, tensors, file, adapter_name, op)
    embedding_tensors, tensors = _split_embedding_layers(model, targets, heads, tensors, file, adapter_name, op)
    base_tensors += embedding_tensors
    if not (targets or heads or biases or base_tensors):  # into slots: nothing left to load
        raise ValueError(f"{op}: the adapter's target_modules {config.target_modules!r} match only {left_out[:3]}, "
                         f"{ATTENTION_OUT_PROJ}; the slots leave it out: an adapter there changes no output")
    grouped = group_adapter_weights(tensors, file, config.modules_to_save, config.bias)
    for name in left_out:
        grouped.pop(state_dict_name(name), None)
    # The file's names are the state dict's, the targets' the model's: they differ inside wrappers (state_dict_name)
    model_names = {state_dict_name(name): name for name, _ in targets}
    grouped = {model_names.get(key_name, key_name): factors for key_name, factors in grouped.items()}
    plan = _plan_layers(op, model, file, config, targets, grouped, adapter_name)
    target_names = {name for name, *_ in plan}
    extra = sorted(set(grouped) - target_names)
    if extra:
        shown = ", ".join(f"'{KEY_PREFIX}{n}.lora_A/B.weight'" for n in extra[:5])
        raise ValueError(f"{op}: {file} has unexpected keys {shown}{' ...' if len(extra) > 5 else ''}: modules the "
                         f"config's target_modules do not select in this model (or that it does not have)")
    if adapter_name is None:
        stale = [n for n, m in model.named_modules() if isinstance(m, LORA_WRAPPERS) and n not in target_names]
        if stale:
            raise ValueError(f"{op}: the model has LoRA layers the adapter does not target ({stale[:5]}"
                             f"{' ...' if len(stale) > 5 else ''}); they would keep other weights. Load into the base "
                             f"model or a model injected with the adapter's target_modules")
        # modules_to_save heads of the adapter loaded (or injected) before hold its trained state in place (no
        # original is kept): an adapter without them would run beside them and drop them from the next save
        recorded = getattr(model, MODULES_TO_SAVE_ATTR, None)
        loading = {name for name, *_ in heads}
        stale_heads = [n for n, _ in (named_modules_to_save(model, recorded, op) if recorded else [])
                       if n not in loading]
        if stale_heads:
            raise ValueError(f"{op}: the model has modules_to_save {stale_heads[:5]} trained in place by the adapter "
                             f"loaded or injected before ({recorded}), which this adapter does not hold; they would "
                             f"keep that adapter's weights. Load into the base model")
        _refuse_stale_base_state(op, model, config.bias, {key.rpartition(".")[0] for key, *_ in base_tensors}
                                 | {state_dict_name(name) for name, *_ in heads})
        # as inject_lora warns (and PEFT's from_pretrained of tied targets): merge() of a tied target would change
        # both, and a target under a second name is replaced under the first only
        new_layers = [(n, m) for n, m, *_ in plan if not isinstance(m, LORA_WRAPPERS)]
        _warn_tied_targets(op, model, new_layers)
        _warn_aliased_targets(op, model, new_layers)
        _commit_single(model, config, plan, grouped, heads, modules_to_save, biases, base_tensors, backend,
                       autocast_adapter_dtype)
        _record(model, EMBEDDING_LAYERS_ATTR, sorted({key.rpartition(".")[0] for key, *_ in base_tensors}) or None)
        _record(model, TASK_TYPE_ATTR, config.task_type)
        enable_input_grads_for_checkpointing(model)
    else:
        _commit_multi(model, op, adapter_name, plan, grouped, config)
    return wrapper


def _refuse_stale_base_state(op, model, bias, layers_loaded):
    """Refuses a file that leaves base tensors which the adapter loaded (or injected) before wrote or trained in
    place: biases its bias mode trained, embedding layers and targets' base layers its file held (PEFT's
    save_embedding_layers); `layers_loaded`, the state-dict names of the layers this file writes whole. They keep
    no original, so the new adapter would run on the earlier one's values (and the next save drop them)."""
    before = getattr(model, BIAS_ATTR, "none")
    if BIAS_MODES.index(bias) < BIAS_MODES.index(before):
        raise ValueError(f"{op}: the model's biases were trained in place by the adapter loaded or injected before "
                         f"(bias={before!r}), and this adapter (bias={bias!r}) does not hold them all; they would "
                         f"keep that adapter's values. Load into the base model")
    stale = [name for name in getattr(model, EMBEDDING_LAYERS_ATTR, None) or () if name not in layers_loaded]
    if stale:
        raise ValueError(f"{op}: the model's layers {stale[:5]}{' ...' if len(stale) > 5 else ''} hold the whole "
                         f"state that the adapter file loaded before held (PEFT's save_embedding_layers), and this "
                         f"file does not; they would keep that adapter's values. Load into the base model")


def _materialise_meta(module, names, device, dtypes=None):
    """Replaces each of module's tensors (parameters or buffers) named in `names` that is on the meta device by zeros
    on `device`, of its dtype (or dtypes[name]) and requires_grad; returns [(module, name, meta tensor)] for _put_back.
    A LoRA layer built on the meta device whose base weight was loaded since (load_state_dict(..., assign=True) of a
    base checkpoint) still holds meta adapter tensors: the adapter is loaded into real ones (copied into meta ones, it
    was silently dropped), and a MultiLoRALinear's other slots start empty, as on a layer built on `device`."""
    replaced = []
    for name in names:
        old = getattr(module, name)
        if old.is_meta:
            new = torch.zeros_like(old, device=device, dtype=(dtypes or {}).get(name, old.dtype))
            setattr(module, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
            replaced.append((module, name, old))
    return replaced


def _put_back(replaced):
    for module, name, old in reversed(replaced):
        setattr(module, name, old)


def _refuse_computed_factors(op, name, layer):
    """ValueError when a LoRALinear's factor weight is computed from other parameters (torch.nn.utils.parametrize,
    the deprecated weight_norm / spectral_norm hooks, or torch.nn.utils.prune): the file's values copied into it would
    be lost on the next access, leaving that factor as it was while the rest of the adapter loads (as PEFT, which
    reports the keys)."""
    for key in ("lora_A", "lora_B"):
        factor = getattr(layer, key)
        if "weight" in factor._parameters:
            continue
        if nn.utils.parametrize.is_parametrized(factor, "weight"):
            source = "a parametrization (torch.nn.utils.parametrize)"
            remedy = (f"remove it first (parametrize.remove_parametrizations(layer.{key}, 'weight')), load, then "
                      f"apply it again")
        elif weight_computed_by_hook(factor):
            source = ("a forward pre-hook (the deprecated torch.nn.utils.weight_norm or spectral_norm, or "
                      "torch.nn.utils.prune), which the layer's forward refuses")
            remedy = "remove it first (remove_weight_norm, remove_spectral_norm, prune.remove)"
        else:
            continue
        raise ValueError(f"{op}: module {name!r}: {key}.weight is computed from other parameters by {source}, so "
                         f"the file's {key} written into it would be lost; the model is unchanged. To load, {remedy}")


def _commit_single(model, config, plan, grouped, heads, modules_to_save, biases, base_tensors, backend,
                   autocast_adapter_dtype):
    op = "load_peft_adapter"
    # Everything that can fail on the inputs is checked; build the new layers before touching the model.
    prepared = []
    for name, module, r, alpha in plan:
        if config.lora_dropout > 0 and is_tensor_parallel(module):
            # as inject_lora refuses it; an injected layer took the value and failed at its first training forward
            raise ValueError(f"{op}: module {name!r}: the adapter's lora_dropout is {config.lora_dropout!r}, but "
                             f"the layer is tensor-parallel (a DTensor weight from parallelize_module), where dropout "
                             f"is refused: each process would draw its own mask; the model is unchanged")
        if isinstance(module, LoRALinear):
            _refuse_computed_factors(op, name, module)
        # on the layer's device, in the file's dtype: copy_ rounds once, into the factors' own dtype
        lora_a = grouped[name]["lora_A"].to(device=module.weight.device)
        lora_b = grouped[name]["lora_B"].to(device=module.weight.device)
        prepared.append((name, module, r, alpha, lora_a, lora_b))
    # Everything the file overwrites in place, before any write (see refuse_inference_tensor_writes): the factors of
    # existing LoRA layers, trained biases, base-layer and embedding tensors, heads. Torch refuses an inference
    # tensor only after writing it, and the rollback's requires_grad_(True) then failed on every parameter.
    written = [(f"{name}.lora_{f}", getattr(m, f"lora_{f}").weight) for name, m, *_ in plan
               if isinstance(m, LoRALinear) for f in "AB"]
    written += [(key, current) for key, current, _ in biases + base_tensors]
    written += [(f"{name}.{key}", t) for name, module, _ in heads
                for key, t in module.state_dict(keep_vars=True).items()]
    refuse_inference_tensor_writes("load_peft_adapter", written)
    # the whole tensors too, as the factors are below: a float32 file's 1e6 would become inf in an fp16 model
    whole = [(key, current, loaded) for key, current, loaded in biases + base_tensors]
    whole += [(f"{name}.{key}", module.state_dict()[key], tensor) for name, module, loaded in heads
              for key, tensor in loaded.items()]
    for key, current, loaded in whole:
        if current.dtype.is_floating_point:
            refuse_overflowed_copy(op, f"tensor {key!r}", loaded, loaded.to(current.dtype),
                                   "convert the model to float32 or bfloat16 first" if current.dtype == torch.float16
                                   else "convert the model to a wider dtype first")
    snapshots = [(m, m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(),
                  (m.lora_alpha, m.use_rslora, m.scaling, m.lora_dropout))
                 for _, m, *_ in plan if isinstance(m, LoRALinear)]
    head_snapshots = [(module, {k: v.detach().clone() for k, v in module.state_dict().items()})
                      for _, module, _ in heads]
    # biases and base-layer tensors alike are restored by their state-dict keys
    bias_snapshot = {key: current.detach().clone() for key, current, _ in biases + base_tensors}
    materialised = []
    try:
        with _rollback_on_error(model) as replaced:
            layers = []
            conv1d = {name: is_conv1d(module) for name, module, *_ in prepared if not isinstance(module, LoRALinear)}
            warn_fan_in_fan_out_corrections(op, config.fan_in_fan_out, conv1d)
            for name, module, r, alpha, lora_a, lora_b in prepared:
                if isinstance(module, LoRALinear):
                    layer = module
                    # in the dtype the layer would give them over its base weight now (one assigned since from a
                    # checkpoint of another dtype), as inject_lora on that base gives; a layer pickled before that
                    # setting was kept: the meta factors' own
                    follow = ({"weight": layer._factor_dtype_for(layer.base_weight().dtype)}
                              if hasattr(layer, "_autocast_adapter_dtype") else {})
                    for factor in (layer.lora_A, layer.lora_B):
                        materialised += _materialise_meta(factor, ["weight"], lora_a.device, follow)
                    layer.lora_alpha, layer.use_rslora = alpha, config.use_rslora
                    layer.scaling = lora_scaling(r, alpha, config.use_rslora)
                    layer.lora_dropout = config.lora_dropout
                else:
                    conv = conv1d[name]
                    warn_dropped_hooks(op, f"module {name!r}", module, "the LoRALinear that replaces it never calls "
                                       "it")
                    try:
                        layer = LoRALinear.from_linear(module, r, alpha, config.lora_dropout, config.use_rslora,
                                                       backend=backend, fan_in_fan_out=conv,
                                                       autocast_adapter_dtype=autocast_adapter_dtype)
                    except (TypeError, ValueError) as exc:  # named as inject_lora names it (a backend that cannot
                        raise type(exc)(f"{op}: module {name!r}: {exc}") from None  # read a quantized weight)
                fix = ("convert the layer's factors to float32 first (layer.lora_A.float(), layer.lora_B.float())"
                       if layer is module else "load with autocast_adapter_dtype=True (float32 factors)")
                for key, loaded, factor in (("lora_A", lora_a, layer.lora_A.weight),
                                            ("lora_B", lora_b, layer.lora_B.weight)):
                    # against the file's values rounded to the factor's dtype: a sharded factor's (tensor
                    # parallelism) are read by no one rank whole
                    refuse_overflowed_copy(op, f"module {name!r}: {key}", loaded, loaded.to(factor.dtype), fix)
                with torch.no_grad():  # sharded like the base weight under tensor parallelism: copy_into
                    copy_into(layer.lora_A.weight, lora_a)
                    copy_into(layer.lora_B.weight, lora_b)
                layers.append((name, module, layer))
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            for name, old, layer in layers:
                if layer is not old:
                    _set_submodule(model, name, layer)
                    replaced.append((name, old))
                layer.lora_A.weight.requires_grad_(True)
                layer.lora_B.weight.requires_grad_(True)
            if base_tensors:  # frozen, as the base layer was (PEFT's too)
                _copy_state(model, {key: loaded for key, _, loaded in base_tensors})
            if biases:  # the state-dict keys are the base model's: a LoRA layer's bias is `<layer>.bias`
                _copy_state(model, {key: loaded for key, _, loaded in biases})
                _train_biases(current for _, current, _ in biases)
            for _, module, loaded in heads:
                _copy_state(module, loaded)
                module.requires_grad_(True)
    except BaseException:
        _put_back(materialised)
        with torch.no_grad():
            for layer, a, b, attrs in snapshots:
                layer.lora_A.weight.copy_(a)
                layer.lora_B.weight.copy_(b)
                layer.lora_alpha, layer.use_rslora, layer.scaling, layer.lora_dropout = attrs
        if bias_snapshot:
            _copy_state(model, bias_snapshot)
        for module, state in head_snapshots:
            _copy_state(module, state)
        raise
    _record(model, MODULES_TO_SAVE_ATTR, modules_to_save if heads else None)
    _record(model, BIAS_ATTR, None if config.bias == "none" else config.bias)
    keep_transformer_layers_calling_lora(model)


def _copy_state(module, state):
    """Copies {state-dict key: tensor} into module's parameters and buffers in place (cast to their dtype and
    device), so whatever holds them (an optimizer) sees the new values; DTensors (tensor parallelism) take their
    shards of the whole tensor."""
    current = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in state.items():
            copy_into(current[key], tensor)


def _commit_multi(model, op, adapter_name, plan, grouped, config):
    slots = getattr(model, "lora_adapter_slots", None)
    if slots is None:
        raise ValueError(f"{op}: adapter_name={adapter_name!r} needs a model prepared with prepare_multi_adapter")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]
    capacity = min(m.max_adapters for _, m in layers)
    # Choosing the slot, writing it and recording the name take turns with other loads and delete_adapter: two
    # loads of new names in two threads both chose the first free slot before either recorded its name, so both
    # names got one slot, holding the weights of whichever wrote last.
    with adapter_table_lock():
        slot = _slot_for(op, adapter_name, slots, capacity)
        if config.lora_dropout > 0:
            warn_at_caller(f"{op}: lora_dropout={config.lora_dropout} is not applied by MultiLoRALinear slots "
                           f"(inference; the same in eval mode)")
        _write_slot(layers, slot, plan, grouped, config)
        slots[adapter_name] = slot
        resolve_batch_adapters(model)  # a name deleted and loaded again has a slot again


def _slot_for(op, adapter_name, slots, capacity):
    """The slot adapter_name has, else the first free one."""
    if adapter_name in slots:
        return slots[adapter_name]
    free = sorted(set(range(capacity)) - set(slots.values()))
    if not free:
        raise ValueError(f"{op}: all {capacity} adapter slots are taken ({sorted(slots)}); prepare the model with "
                         f"more max_adapters")
    return free[0]


def _write_slot(layers, slot, plan, grouped, config):
    """The adapter into `slot` of every MultiLoRALinear (cleared where it has no weights); all slots as they were
    on an error."""
    for _, module in layers:  # before any slot is written (the restore below would write them too, and cannot
        # write one slot of a sharded stack)
        module._refuse_sharded_slots("load_peft_adapter")
        refuse_inference_tensor_writes("load_peft_adapter", module._slot_tensors())
    loaded = {name: (r, alpha) for name, _, r, alpha in plan}
    snapshots = [(m, m.lora_a[slot].detach().clone(), m.lora_b[slot].detach().clone(), m.scalings[slot].clone(),
                  m.ranks[slot].clone(), dict(getattr(m, "_exact_scalings", {}))) for _, m in layers]
    materialised = []
    try:
        for name, module in layers:
            weight = module.base_layer.weight
            # slots of the base weight's dtype (adapter_dtype=None) take the loaded weight's, as if made after it
            follow = ({} if getattr(module, "_requested_adapter_dtype", None)  # None too in a pickle from before it
                      else {"lora_a": weight.dtype, "lora_b": weight.dtype})
            materialised += _materialise_meta(module, ["lora_a", "lora_b", "ranks"], weight.device, follow)
            # float64 where the materialised layer computes in float64, as a layer made there keeps them
            materialised += _materialise_meta(module, ["scalings"], weight.device,
                                              {"scalings": module._scalings_dtype()})
            if name in loaded:
                r, alpha = loaded[name]
                for key, slots_dtype in (("lora_A", module.lora_a.dtype), ("lora_B", module.lora_b.dtype)):
                    factor = grouped[name][key]  # set_adapter refuses it too, naming neither module nor file key
                    refuse_overflowed_copy("load_peft_adapter", f"module {name!r}: {key}", factor,
                                           factor.to(slots_dtype), "prepare the model with adapter_dtype=torch.float32")
                module.set_adapter(slot, grouped[name]["lora_A"], grouped[name]["lora_B"],
                                   lora_scaling(r, alpha, config.use_rslora))
            else:
                module.clear_adapter(slot)
    except BaseException:
        _put_back(materialised)
        # under the slot lock, as set_adapter writes: a forward in another thread never sees a half-restored slot
        with torch.no_grad(), _modules._SLOT_LOCK:
            for module, a, b, scaling, rank, exact_scalings in snapshots:
                module.lora_a[slot].copy_(a)
                module.lora_b[slot].copy_(b)
                module.scalings[slot] = scaling
                module.ranks[slot] = rank
                module._exact_scalings = exact_scalings
        raise


# -------------------------------------------------------------------------------------------------------------- save

def _atomic_write(directory, files):
    """Writes each (name, write) of `files` by calling write(temp_path) for a temporary file in `directory` and
    fsyncing it, then, all written, renames them to their names one after another: a failed or interrupted write
    leaves the old files, never a truncated one nor new weights beside the old config (which loaded with the old
    alpha). Only a crash between the renames, microseconds apart, can still pair them wrongly."""
    temps = []
    try:
        for name, write in files:
            tmp = create_temp_file(directory, f".{name}.")
            temps.append(tmp)
            mode = os.stat(tmp).st_mode & 0o777
            write(tmp)
            # safetensors 0.8's save_file makes the file anew, 0600 (its issue #782: a server running as another
            # user, vLLM's, could not read the adapter); 0666 less the umask, as a plain open() and PEFT's config
            os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for (name, _), tmp in zip(files, temps):
            os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    try:  # make the renames themselves durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _refuse_meta(op, what, tensor):
    """ValueError naming `what` (a tensor and its module) when `tensor` is on the meta device: it holds no values to
    save (a model built on the meta device whose adapter was never loaded or initialised). Raised before any file is
    written; torch's own "Cannot copy out of meta tensor" named no layer."""
    if tensor.is_meta:
        raise ValueError(f"{op}: {what} is on the meta device, so it holds no values to save (the model was built on "
                         f"the meta device and this tensor was never loaded or materialised); nothing was written")


def _to_saved(op, what, tensor):
    """A contiguous CPU copy: safetensors refuses tensors sharing storage (slot slices), and the file must not alias
    the model. An FSDP2-sharded DTensor is gathered first (a collective: every rank must call save). A meta tensor
    is refused (_refuse_meta)."""
    _refuse_meta(op, what, tensor)
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.to("cpu", copy=True).contiguous()


def _clean_number(value, margin):
    """An alpha recovered from a scaling: the int it is meant to be when within `margin` (relative: the scaling's
    rounding) of one. Relative: an absolute margin had turned every |alpha| <= 1e-6 into 0, an adapter that changes
    nothing (helper 301)."""
    rounded = round(value)
    return int(rounded) if abs(value - rounded) <= margin * abs(value) else float(value)


_SAVE_UNDER_FSDP1 = ("call save_peft_adapter on every rank inside `with FullyShardedDataParallel.summon_full_params("
                     "model):` (with writeback=False, rank0_only=True: on rank 0 only, the other ranks keep their "
                     "shards), or shard with fully_shard (FSDP2); nothing was written")
_LOAD_UNDER_FSDP1 = ("call load_peft_adapter on every rank inside `with FullyShardedDataParallel.summon_full_params("
                     "model, writeback=True):`; the model is unchanged")


def _check_not_flattened(op, name, what, tensor, shape, fix=_SAVE_UNDER_FSDP1):
    """FullyShardedDataParallel (FSDP1) holds a layer's parameters as views of its flat local shard outside
    summon_full_params (1-D, often empty): saved, they were pieces of the adapter under the layer's keys; loaded
    into, torch's copy failed naming no tensor (an IndexError for slots). With use_orig_params=False they keep their
    shapes but view the gathered flat parameter, whose storage FSDP1 frees after the backward: reading or writing
    them crashed the process (SIGSEGV). fix: what to do instead, for the message."""
    hint = f"(a FullyShardedDataParallel (FSDP1) model's flattened shard?): {fix}"
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: module {name!r}'s {what} has shape {list(tensor.shape)}, expected {list(shape)} "
                         f"{hint}")
    if tensor.numel() and not is_dtensor(tensor) and not tensor.is_meta:
        extent = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape,
                                                                                             tensor.stride())) + 1
        if tensor.untyped_storage().nbytes() < extent * tensor.element_size():
            raise ValueError(f"{op}: module {name!r}'s {what} views {tensor.untyped_storage().nbytes()} bytes of "
                             f"storage, fewer than its shape {list(tensor.shape)} needs {hint}")


class _SavedLayer(NamedTuple):
    """One LoRA layer of the adapter save_peft_adapter writes."""
    name: str  # the model's name (_collect_layers), then the state dict's (save_peft_adapter)
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    r: int
    alpha: float
    use_rslora: bool
    dropout: float
    fan_in_fan_out: bool


def _saved_alpha(layer):
    """The lora_alpha that gives the scaling a LoRALinear computes with: its lora_alpha, or scaling·r (·√r with
    rsLoRA) where its `scaling` or `lora_alpha` attribute was set since. The file had the attribute lora_alpha, and
    reproduced another model than the one saved (PEFT's save ignores its set_scale likewise)."""
    scaling = float(layer.scaling)
    if scaling == lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora):
        return layer.lora_alpha
    # not _clean_number's: its rounding to a near int is for float32 scalings, and here wrote 16 for 2.000001 · 8
    alpha = scaling * (math.sqrt(layer.r) if layer.use_rslora else layer.r)
    return int(alpha) if alpha.is_integer() else alpha


def _collect_layers(model, adapter_name, op):
    """[_SavedLayer] of the adapter to save, the names the model's."""
    records = []
    if adapter_name is None:
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):  # merged or not: merging leaves the factors as they are (PEFT saves both)
                m.refuse_offloaded(f"{op} (module {name!r})")
                _check_not_flattened(op, name, "lora_A.weight", m.lora_A.weight, (m.r, m.in_features))
                _check_not_flattened(op, name, "lora_B.weight", m.lora_B.weight, (m.out_features, m.r))
                records.append(_SavedLayer(name, m.lora_A.weight, m.lora_B.weight, m.r, _saved_alpha(m), m.use_rslora,
                                           m.lora_dropout, m.fan_in_fan_out))
        if not records:
            raise ValueError(f"{op}: the model has no LoRALinear layers (for MultiLoRALinear slots pass adapter_name)")
        return records
    # Read in one turn with loads and deletes by name, and copied: a delete and a load into the freed slot while the
    # file was written saved another adapter (or layers of both) under this name
    with adapter_table_lock():
        slots = getattr(model, "lora_adapter_slots", None) or {}
        if adapter_name not in slots:
            raise ValueError(f"{op}: unknown adapter_name {adapter_name!r}; loaded: {sorted(slots)}")
        slot = slots[adapter_name]
        for name, m in model.named_modules():
            if isinstance(m, MultiLoRALinear):
                for buffer in ("ranks", "scalings"):  # read just below (int(), float()): refused by name first
                    _refuse_meta(op, f"{buffer} of module {name!r}", getattr(m, buffer))
                _check_not_flattened(op, name, "lora_a", m.lora_a, (m.max_adapters, m.max_rank, m.in_features))
                _check_not_flattened(op, name, "lora_b", m.lora_b, (m.max_adapters, m.out_features, m.max_rank))
                r = int(m.ranks[slot])
                if r == 0:
                    continue  # this layer is not targeted by the adapter
                # MultiLoRALinear keeps the scaling, not alpha: alpha = scaling * r reproduces it (use_rslora off),
                # from the scaling as it was given where the slot still holds it (alpha / r · r is alpha to a few
                # float64 ulps: 16.000008 stays), else from its float32 rounding (10 / 3 · 3 is 9.9999998 there)
                given = m._given_scaling(slot)
                alpha = (_clean_number(given * r, 1e-12) if given is not None
                         else _clean_number(float(m.scalings[slot]) * r, 1e-6))
                records.append(_SavedLayer(name, m.lora_a[slot, :r].clone(), m.lora_b[slot, :, :r].clone(), r, alpha,
                                           False, 0.0, m.fan_in_fan_out))
    if not records:
        raise ValueError(f"{op}: adapter {adapter_name!r} has no layer with a non-empty slot")
    return records


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pattern(values, default):
    """rank_pattern / alpha_pattern for [(module name, value)]: keyed by the last name component when every layer of
    that component shares the value (e.g. {"down_proj": 4}), else by full module name; {} when all equal default."""
    by_suffix = {}
    for name, value in values:
        by_suffix.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    pattern = {}
    for name, value in values:
        suffix = name.rsplit(".", 1)[-1]
        if value == default:
            continue  # r / lora_alpha covers it; the other layers of its suffix, if they differ, get full-name keys
        if len(by_suffix[suffix]) == 1:
            pattern[suffix] = value
        else:
            pattern[name] = value
    return pattern


def _full_name_pattern(values):
    """rank_pattern / alpha_pattern for [(module name, value)] with a key for every module: its name, regex
    characters other than the dots escaped (a name with "+" or "(" matched other names, or none), in order of
    decreasing components, so that each name meets its own key before any shorter key it ends with. The dots stay
    as they are: peft < 0.14 looks a name up as a plain key when no key matches it as a regex."""
    names = [name for name, _ in values]

    def key(name):
        escaped = re.escape(name).replace(r"\.", ".")
        # a name that ends another one ("proj", "x.proj") is anchored: "^proj" matches "proj" alone under PEFT's
        # (.*\.)?(key)$, so the keys hold in any order (the file's keys are sorted, and PEFT sorts them too)
        return "^" + escaped if any(other.endswith("." + name) for other in names) else escaped

    keyed = [(key(name), value) for name, value in values]
    return dict(sorted(keyed, key=lambda item: -item[0].count(".")))


def _target_modules_for(model, names, op, modules_to_save=None):
    """The shortest target_modules list that selects exactly the modules `names` (the model's) under PEFT's matching
    (which skips modules_to_save modules): their last name components when those pick no other module, else the
    full names (as the state dict spells them), else a regex of them."""
    names = set(names)

    def selected(targets):
        return {n for n, _ in named_target_modules(model, targets, modules_to_save=modules_to_save, op=op)}

    short = sorted({state_dict_name(n).rsplit(".", 1)[-1] for n in names})
    if selected(short) == names:
        return short
    full = sorted(state_dict_name(n) for n in names)
    if selected(full) == names:
        return full
    # a full name that ends another module's name ("attn.q" and "vision.attn.q") selects that module too: a regex
    # (PEFT matches a str against the whole name) names exactly these
    regex = "|".join(re.escape(name) for name in full)
    if selected(regex) != names:
        raise ValueError(f"{op}: cannot express the LoRA layers {full[:5]} as PEFT target_modules")
    return regex


def _adapter_config(op, model, records, module_names, modules_to_save, bias, task_type, base_model_name_or_path):
    """save_peft_adapter's adapter_config.json, as a dict: the most common r and alpha, the others in rank_pattern /
    alpha_pattern, checked to read back as `records` (module_names: the model's names of the records' layers;
    modules_to_save: the entries that select the heads saved, or None)."""
    for field, attr in (("use_rslora", "use_rslora"), ("lora_dropout", "dropout")):
        values = {getattr(rec, attr) for rec in records}
        if len(values) > 1:
            raise ValueError(f"{op}: the LoRA layers have different {field} values {sorted(values)}; PEFT's config "
                             f"holds one")
    r = _most_common([rec.r for rec in records])
    lora_alpha = _most_common([rec.alpha for rec in records])
    rank_pattern = _pattern([(rec.name, rec.r) for rec in records], r)
    alpha_pattern = _pattern([(rec.name, rec.alpha) for rec in records], lora_alpha)
    target_modules = _target_modules_for(model, module_names, op, modules_to_save)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        # no "exclude_modules" (always null here): peft < 0.14's LoraConfig has no such field, and its
        # PeftModel.from_pretrained raises TypeError on a key it does not know
        "lora_dropout": records[0].dropout,
        "use_rslora": records[0].use_rslora,
        "bias": bias,
        "fan_in_fan_out": any(rec.fan_in_fan_out for rec in records),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    # The config must select exactly these layers with these ranks when read back (PEFT's rules, our parser).
    parsed = parse_adapter_config(json.loads(json.dumps(config, sort_keys=True)))  # as written
    if any(parsed.rank_and_alpha(rec.name) != (rec.r, rec.alpha) for rec in records):
        # a key also matched a longer name it should not ("proj" matches "block.proj"): every layer by its full
        # name, the names with more components first (PEFT takes the first key that matches)
        config["rank_pattern"] = _full_name_pattern([(rec.name, rec.r) for rec in records])
        config["alpha_pattern"] = _full_name_pattern([(rec.name, rec.alpha) for rec in records])
        parsed = parse_adapter_config(json.loads(json.dumps(config, sort_keys=True)))  # as written
        for rec in records:
            if parsed.rank_and_alpha(rec.name) != (rec.r, rec.alpha):
                raise ValueError(f"{op}: internal error: rank/alpha patterns do not reproduce module {rec.name!r}")
    return config


# PEFT 0.21 with transformers 5 rewrites these target_modules names into target_parameters on the fused experts for
# the model types in its conversion table: those transformers' conversion mapping gives Mixtral's or Qwen2-MoE's
# layout (qwen3_moe, qwen3_next, olmoe, deepseek_v3, minimax, ...), and mixtral itself; not qwen2_moe, which PEFT
# reads as written (peft.utils.transformers_weight_conversion)
_PEFT_EXPERT_TARGET_NAMES = {"mixtral": ("gate", "w1", "w2", "w3"),
                             "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def _peft_expert_target_names(model):
    """The target_modules names PEFT reads as fused experts for this model (none for a model transformers does not
    convert, or where its private conversion mapping is missing)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str) or "transformers" not in sys.modules:
        return ()
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as layouts
    except ImportError:
        return ()
    return _PEFT_EXPERT_TARGET_NAMES.get("mixtral" if model_type == "mixtral" else layouts.get(model_type), ())


def _warn_if_peft_reads_targets_as_experts(op, model, target_modules):
    """PeftModel.from_pretrained of a file whose target_modules names such a layer put new LoRAs on the model's
    fused experts and dropped the file's factors of the dense or shared-expert layers of that name (logits 0.25-0.51
    off on qwen3_next, qwen3_moe, deepseek_v3; helper 260), with only a missing-keys warning, or refused the file
    (gate_proj without up_proj). PEFT 0.22 and load_peft_adapter read the file as written. A regex target_modules is
    read as the names of the modules it selects, as PEFT resolves it."""
    expert_names = _peft_expert_target_names(model)
    if not expert_names:
        return
    if isinstance(target_modules, str):
        target_modules = [name for name in _module_state_dict_names(model) if re.fullmatch(target_modules, name)]
    named = sorted({target.rpartition(".")[2] for target in target_modules for name in expert_names
                    if target == name or target.endswith(f".{name}")})
    if named:
        warn_at_caller(f"{op}: target_modules names {named}, which PEFT (0.21, with transformers 5) reads as this "
                       f"{model.config.model_type} model's fused experts (target_parameters): "
                       f"PeftModel.from_pretrained would put new LoRAs there and drop these factors, or refuse the "
                       f"file; PEFT 0.22 and load_peft_adapter read it as written", UserWarning)


def _warn_if_peft_0_21_selects_more_heads(op, model, modules_to_save):
    """PEFT <= 0.21 selected modules_to_save by a plain name suffix: where an entry also ends other module names, it
    wraps those too and expects their weights in the file (from_pretrained raised a KeyError), or refuses a LoRA
    layer among them. PEFT 0.22 and load_peft_adapter select whole name components, as the file was written."""
    also = [state_dict_name(name) for name, _ in suffix_only_modules_to_save(model, modules_to_save or [])]
    if also:
        warn_at_caller(f"{op}: PEFT <= 0.21 cannot read this file: it selects modules_to_save {modules_to_save!r} by "
                       f"a plain name suffix, so also {also[:5]}{' ...' if len(also) > 5 else ''}, whose weights the "
                       f"file does not hold; PEFT >= 0.22 and load_peft_adapter read it as written", UserWarning)


# PEFT's task model classes add their head to modules_to_save when they load a file with these task types
# (PeftModelForSequenceClassification and ...ForTokenClassification "classifier" and "score", and from 0.22
# "pre_classifier", ...ForQuestionAnswering "qa_outputs"), then require its weights in the file and never put a LoRA
# on it. Tested here as PEFT <= 0.21 selected them, by a plain suffix ("classifier" selects "pre_classifier" too):
# the modules of both rules, so that either PEFT reads the file.
_TASK_TYPE_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def _task_heads_problem(op, model, task_type, heads):
    """What stops PEFT from loading a file of `task_type` as this model (None: nothing): a module the task type makes
    PEFT train and load whole (_TASK_TYPE_HEADS) that the file would not hold as such: PeftModel.from_pretrained
    failed with a KeyError on its weights, and a LoRA on it PEFT would drop. heads: the modules_to_save this save
    writes."""
    implied = _TASK_TYPE_HEADS.get(task_type, ())
    saved = {id(module) for _, module in heads}
    matched = []
    for name, module in model.named_modules():
        key = state_dict_name(name)
        if (not key or is_name_wrapper(module) or not key.endswith(implied)
                or any(name.startswith(prefix) for prefix in matched)):
            continue
        matched.append(name + ".")  # PEFT wraps the outermost match
        lora = [f"{key}.{n}".rstrip(".") for n, m in module.named_modules() if isinstance(m, LORA_WRAPPERS)]
        why = (f"task_type={task_type!r} makes PEFT add {list(implied)} to modules_to_save when it loads the file: "
               f"it trains and loads the model's {key!r} whole")
        if lora:
            return (f"{why} and puts no LoRA on it, but it holds the LoRA layer {lora[0]!r}, which PEFT would drop "
                    f"(train that head whole, inject_lora modules_to_save, instead of with a LoRA)")
        if id(module) not in saved:
            return (f"{why} and requires its weights in the file, which this one would not hold (it is not among the "
                    f"model's modules_to_save: inject_lora(..., modules_to_save=[{key.rsplit('.', 1)[-1]!r}]) trains "
                    f"and saves it)")
    return None


def _refuse_records_below(op, model):
    """ValueError for what inject_lora or load_peft_adapter called on a submodule recorded there (a bias mode,
    modules_to_save, embedding layers a file held): this save reads the model's own records, so the trained biases
    or heads were silently left out of the file. The model inside a wrapper whose component the state dict leaves
    out (FSDP1's root `_fsdp_wrapped_module`) is the model itself: the wrapper forwards the records' attributes."""
    root_bias = BIAS_MODES.index(getattr(model, BIAS_ATTR, None) or "none")
    root_heads = set(getattr(model, MODULES_TO_SAVE_ATTR, None) or ())
    root_layers = set(getattr(model, EMBEDDING_LAYERS_ATTR, None) or ())
    for name, module in model.named_modules():
        prefix = state_dict_name(name)
        if not prefix:
            continue
        # what the model's own records already save (its bias mode covers the submodule's layers too; its
        # modules_to_save entries select by trailing name components anywhere) is not lost
        lost = [(attr, what) for attr, what, covered in (
            (BIAS_ATTR, "bias", lambda mode: BIAS_MODES.index(mode) <= root_bias),
            (MODULES_TO_SAVE_ATTR, "modules_to_save", lambda entries: set(entries) <= root_heads),
            (EMBEDDING_LAYERS_ATTR, "embedding layers a loaded file held",
             lambda layers: {f"{prefix}.{layer}" for layer in layers} <= root_layers))
            if getattr(module, attr, None) and not covered(getattr(module, attr))]
        recorded = [f"{what}={getattr(module, attr)!r}" for attr, what in lost]
        if recorded:
            raise ValueError(f"{op}: module {name!r} records {', '.join(recorded)} from an inject_lora or "
                             f"load_peft_adapter call on that submodule, which a file of the whole model would leave "
                             f"out; call inject_lora / load_peft_adapter on the whole model (target_modules select "
                             f"layers by name anywhere in it), or save that submodule; nothing was written")


def _adapter_tensors(op, model, records, module_names, heads, bias, adapter_name, save_embedding_layers,
                     target_modules):
    """save_peft_adapter's {file key: contiguous CPU tensor}: the LoRA factors, the modules_to_save heads' state,
    the trained biases and the embedding layers save_embedding_layers selects (target_modules: the config's)."""
    tensors = {}
    factor_names = ("lora_a", "lora_b") if adapter_name is not None else ("lora_A.weight", "lora_B.weight")
    for rec in records:
        tensors[f"{KEY_PREFIX}{rec.name}.lora_A.weight"] = _to_saved(op, f"{factor_names[0]} of module {rec.name!r}",
                                                                     rec.lora_a)
        tensors[f"{KEY_PREFIX}{rec.name}.lora_B.weight"] = _to_saved(op, f"{factor_names[1]} of module {rec.name!r}",
                                                                     rec.lora_b)
    for name, module in heads:
        for key, tensor in module.state_dict().items():
            tensors[f"{KEY_PREFIX}{state_dict_name(name)}.{key}"] = _to_saved(
                op, f"{key!r} of module {name!r} (modules_to_save)", tensor)
    for file_key, (key, tensor) in _bias_file_keys(model, bias, {rec.name for rec in records},
                                                   [name for name, _ in heads]).items():
        tensors[file_key] = _to_saved(op, f"the model's {key!r} (bias={bias!r})", tensor)
    embedding_layers, targeted = [], []
    if save_embedding_layers:  # True or "auto"
        embedding_layers = _embedding_layers(model, {*module_names, *(name for name, _ in heads)})
        if adapter_name is None:  # slots share their base layer with every adapter: a file by name holds none
            targeted = _targeted_embedding_layers(model, module_names)
    if save_embedding_layers == "auto":
        held = getattr(model, EMBEDDING_LAYERS_ATTR, ()) if adapter_name is None else ()  # by the file loaded
        embedding_layers = [(name, module) for name, module in embedding_layers if state_dict_name(name) in held]
        if not _names_an_embedding_layer(model, target_modules):
            targeted = []
        elif targeted:  # as PEFT warns: the file grows by the whole layer
            warn_at_caller(f"{op}: target_modules names an embedding layer, so the base weight of "
                           f"{[name for name, _ in targeted]} is saved whole beside its factors, as PEFT saves it "
                           f"(save_embedding_layers='auto': a resized vocabulary's new rows); pass "
                           f"save_embedding_layers=False to leave it out", UserWarning)
    elif save_embedding_layers and not (embedding_layers or targeted):
        raise ValueError(f"{op}: save_embedding_layers=True, but the model has no input or output embedding layer "
                         f"(get_input_embeddings / get_output_embeddings) but its modules_to_save")
    # an embedding layer tied to a merged LoRA target (embed_tokens to a merged lm_head) holds the merged weight: it
    # is saved as unmerge() would leave it, as the target's base weight is (the file held two values for one tensor)
    merged_targets = [m for m in model.modules() if isinstance(m, LoRALinear) and m.merged]
    for name, module in embedding_layers:
        for key, tensor in module.state_dict(keep_vars=True).items():
            tied = next((m for m in merged_targets if m.weight is tensor), None)
            tensors[f"{KEY_PREFIX}{state_dict_name(name)}.{key}"] = _to_saved(
                op, f"{key!r} of embedding layer {name!r}", tensor if tied is None else tied._unmerged_weight())
    for name, module in targeted:
        for leaf, tensor in (("weight", module._unmerged_weight()), ("bias", module.bias)):
            if tensor is not None:
                tensors[f"{KEY_PREFIX}{state_dict_name(name)}.base_layer.{leaf}"] = _to_saved(
                    op, f"the base {leaf} of embedding layer {name!r}", tensor)
    return tensors


def _targeted_embedding_layers(model, module_names):
    """[(name, LoRALinear)] of the input and output embedding layers (get_input_embeddings /
    get_output_embeddings: an lm_head) that are LoRA targets: PEFT saves their base layer whole, as
    `<layer>.base_layer.weight` (and `.bias`), with save_embedding_layers (a resized vocabulary's new rows)."""
    layers = _embedding_layer_modules(model)
    names = set(module_names)
    return [(name, module) for name, module in model.named_modules()
            if name in names and isinstance(module, LoRALinear) and any(module is layer for layer in layers)]


PEFT_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES


def _names_an_embedding_layer(model, target_modules):
    """Whether the config's target_modules names an embedding layer as PEFT's save_embedding_layers="auto" decides
    it (then true, with a warning, in PEFT): a list holding "embed_tokens" or "lm_head", or a regex that matches a
    module whose name ends with one of them."""
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, name) for name in _module_state_dict_names(model)
                   if re.match(rf"(.*\.)?({'|'.join(PEFT_EMBEDDING_LAYER_NAMES)})$", name))
    return any(name in target_modules for name in PEFT_EMBEDDING_LAYER_NAMES)


def _module_state_dict_names(model):
    return [state_dict_name(name) for name, _ in model.named_modules() if name]


# peft.TaskType's values (the same six in PEFT 0.13 and 0.21): PEFT 0.21's PeftConfig raises ValueError for any other
# task_type (0.13 took it and loaded a plain PeftModel, not the task's class)
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def save_peft_adapter(model, path, adapter_name=None, *, task_type=None, base_model_name_or_path=None,
                      save_embedding_layers="auto"):
    """Writes the LoRA adapter of `model` to directory `path` (created if needed) in PEFT's format:
    adapter_config.json and adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, path)` loads.

    adapter_name=None saves the LoRALinear layers, the whole state of the modules_to_save given to inject_lora
    or read by load_peft_adapter, and the biases that their bias mode trains ("all" / "lora_only": the config's
    "bias", the tensors under PEFT's keys); a name saves that adapter's MultiLoRALinear slots (bias "none"). Layers
    of different rank or alpha go into rank_pattern / alpha_pattern (keyed by the last name component where that
    selects exactly those layers, else by full module name); one lora_dropout and one use_rslora must hold for the
    whole adapter (PEFT has one of each). Each file is written to a temporary file in `path` and renamed over the
    old one, so a crash never leaves a truncated file. With torch.distributed initialised only rank 0 writes (FSDP2:
    call it on every rank, the sharded weights are gathered).

    task_type: PEFT's task type for the config, e.g. "CAUSAL_LM", which AutoPeftModelForCausalLM needs (None: the
    task type of the file load_peft_adapter read, if any, else none, as PEFT's default). base_model_name_or_path:
    None takes the model's own (from_pretrained's path). save_embedding_layers (PEFT's option): True also writes the
    whole state of the model's input and output embedding layers (those of a resized vocabulary: the new tokens'
    rows), as PEFT does, under their own keys, which load_peft_adapter and PEFT load over the model's, and for one
    that is a LoRA target (lm_head) its base weight and bias, as `<layer>.base_layer.weight` (PEFT's True then
    leaves the untargeted ones out; written here, they load in PEFT too); "auto" those that the adapter file
    load_peft_adapter read held (PEFT's "auto" looks the base model's vocabulary size up), and the targeted ones'
    base layers when target_modules names "lm_head" or "embed_tokens" (PEFT's rule, with its warning); False none.
    modules_to_save modules are saved as such, never as embedding layers. A merged LoRALinear saves its factors (and
    a targeted embedding layer the base weight unmerge() would leave), the same file as unmerged (PEFT saves a
    merged model's merged base weight)."""
    op = "save_peft_adapter"
    model = unwrap_model(model, op)
    if isinstance(model, (LoRALinear, MultiLoRALinear)):  # PEFT's keys and target_modules name layers by their path
        raise TypeError(f"{op}: model expected a module that holds LoRA layers, got a {type(model).__name__} itself "
                        f"(it has no module name for PEFT's file to key it by): save the model it is part of, e.g. "
                        f"nn.Sequential(layer)")
    if not (save_embedding_layers is True or save_embedding_layers is False or save_embedding_layers == "auto"):
        raise ValueError(f"{op}: save_embedding_layers expected True, False or 'auto', got {save_embedding_layers!r}")
    _check_path(op, path)
    _check_directory_to_create(op, path)
    _check_adapter_name(op, adapter_name)
    if task_type is not None and not isinstance(task_type, str):  # written to the config as is
        raise TypeError(f"{op}: task_type expected None or a str such as 'CAUSAL_LM', got {task_type!r}")
    task_type_origin = ""
    if task_type is None and adapter_name is None:  # the loaded file's, as PEFT saves what it loaded
        task_type = getattr(model, TASK_TYPE_ATTR, None)
        task_type_origin = " (the task type of the adapter file load_peft_adapter read; pass task_type= to replace it)"
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        # PEFT 0.21's PeftConfig refuses any other value ("Invalid task type"), so the file would not load there
        raise ValueError(f"{op}: task_type expected None or one of PEFT's task types {list(PEFT_TASK_TYPES)}, "
                         f"got {task_type!r}{task_type_origin}")
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)  # a Path was not JSON serializable
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"{op}: base_model_name_or_path expected None, a str or a path, got "
                        f"{base_model_name_or_path!r}")
    records = _collect_layers(model, adapter_name, op)
    if adapter_name is None:
        _refuse_records_below(op, model)
    module_names = [rec.name for rec in records]  # to match targets; the file has the state dict's names:
    records = [rec._replace(name=state_dict_name(rec.name)) for rec in records]
    modules_to_save = getattr(model, MODULES_TO_SAVE_ATTR, None) if adapter_name is None else None
    bias = getattr(model, BIAS_ATTR, "none") if adapter_name is None else "none"
    heads = named_modules_to_save(model, modules_to_save, op) if modules_to_save else []
    if modules_to_save and not heads:
        raise ValueError(f"{op}: model.{MODULES_TO_SAVE_ATTR} = {modules_to_save!r} matches no module of the model")
    problem = _task_heads_problem(op, model, task_type, heads)
    if problem and task_type_origin:  # not the caller's: the file it loaded had it, and passing None inherits it
        warn_at_caller(f"{op}: the task type of the adapter file load_peft_adapter read is not written: {problem}; the "
                       f"file's task_type is null (pass task_type= to set one)")
        task_type = None
    elif problem:
        raise ValueError(f"{op}: {problem}; or save with task_type=None; nothing was written")
    config = _adapter_config(op, model, records, module_names, modules_to_save if heads else None, bias, task_type,
                             base_model_name_or_path)
    tensors = _adapter_tensors(op, model, records, module_names, heads, bias, adapter_name, save_embedding_layers,
                               config["target_modules"])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    _warn_if_peft_reads_targets_as_experts(op, model, config["target_modules"])  # once, on the rank that writes
    _warn_if_peft_0_21_selects_more_heads(op, model, modules_to_save)
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save_file

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, [(SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
                         (CONFIG_NAME, write_json)])
