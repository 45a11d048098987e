"""lora_kernels: fused LoRA kernels (Triton and C++/CUDA) for training and multi-adapter serving."""

from lora_kernels.backends import BACKENDS, available_backends
from lora_kernels.batch import LoRABatch
from lora_kernels import ops
from lora_kernels.functional import lora_linear, multi_lora_linear
from lora_kernels.modules import (LoRALinear, MultiLoRALinear, count_parameters, inject_lora, merge_and_unload,
                                  trainable_parameters_summary)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "LoRABatch", "LoRALinear", "MultiLoRALinear", "available_backends", "count_parameters",
           "inject_lora", "lora_linear", "merge_and_unload", "multi_lora_linear", "ops", "trainable_parameters_summary"]
