"""lora_kernels: fused LoRA kernels (Triton and C++/CUDA) for training and multi-adapter serving."""

__version__ = "0.1.0"
