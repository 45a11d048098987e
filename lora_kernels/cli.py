"""Command line: `lora-kernels info` (versions, device, backends and why some are missing)."""

import argparse
import json
import platform
import sys

import torch

import lora_kernels
from lora_kernels import _ext, backends
from lora_kernels import triton as triton_pkg


def info_dict():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    triton_version = None
    if triton_pkg.HAS_TRITON:
        import triton
        triton_version = triton.__version__
    return {
        "lora_kernels": lora_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {"loaded": _ext.HAS_EXTENSION, "with_cuda": _ext.EXTENSION_WITH_CUDA,
                      "error": _ext.EXTENSION_ERROR},
        "triton_interpreter": triton_pkg.INTERPRET,
        "backends": {device: {name: backends.unavailable_reason(name, device) or "available"
                              for name in backends.BACKENDS} for device in devices},
        "auto": {device: backends.auto_backend(device) for device in devices},
    }


def print_info(as_json=False):
    info = info_dict()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"lora_kernels {info['lora_kernels']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}")
    print(f"CUDA device: {info['cuda_device'] or 'none'}")
    ext = info["extension"]
    print("C++ extension: " + ("loaded, built " + ("with" if ext["with_cuda"] else "without") + " CUDA"
                               if ext["loaded"] else f"not loaded ({ext['error']})"))
    for device, table in info["backends"].items():
        print(f"backends for {device} tensors (auto -> {info['auto'][device]}):")
        for name, status in table.items():
            print(f"  {name:10s} {status}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora-kernels", description="Fused LoRA kernels: info, benchmarks, compare.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device and available backends")
    info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        print_info(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
