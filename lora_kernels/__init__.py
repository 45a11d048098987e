"""lora_kernels: fused LoRA kernels (Triton and C++/CUDA) for training and multi-adapter serving."""

from lora_kernels.backends import BACKENDS, available_backends
from lora_kernels.batch import LoRABatch
from lora_kernels import ops
from lora_kernels.functional import lora_linear, multi_lora_linear
from lora_kernels.modules import (LoRALinear, MultiLoRALinear, count_parameters, delete_adapter, disable_adapter,
                                  inject_lora, merge_and_unload, prepare_multi_adapter, set_batch_adapters,
                                  trainable_parameters_summary)
from lora_kernels.peft_io import load_peft_adapter, save_peft_adapter

__version__ = "0.1.0"

__all__ = ["BACKENDS", "LoRABatch", "LoRALinear", "MultiLoRALinear", "available_backends", "count_parameters",
           "delete_adapter", "disable_adapter", "inject_lora", "load_peft_adapter", "lora_linear", "merge_and_unload",
           "multi_lora_linear", "ops", "prepare_multi_adapter", "save_peft_adapter", "set_batch_adapters",
           "trainable_parameters_summary"]
