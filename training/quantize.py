"""A quantized frozen base for A²BFR training (QLoRA's recipe): the transformer's weights stored in fp8 or nf4, the
LoRA above them trained in fp32, its saved file the same diffusers LoRA that loads on a bf16 base.

- ``bf16``: no quantization; the frozen weights in the mixed-precision dtype (fp32 when mixed precision is off).
- ``fp8``: torchao float8 weight-only (``TorchAoConfig("float8wo_e4m3")`` through diffusers); needs a GPU of
  compute capability 8.9 or newer (Ada, Hopper) and the ``torchao`` package.
- ``nf4``: bitsandbytes 4-bit NormalFloat with bf16 compute (``BitsAndBytesConfig`` through diffusers); needs a
  CUDA GPU and the ``bitsandbytes`` package.

:func:`check_base_dtype` says why an option cannot run on this machine before any weight is read.
"""

from __future__ import annotations

import importlib.util

import torch

BASE_DTYPES = ("bf16", "fp8", "nf4")
OPTIMIZERS_NEEDING_CUDA = {"adamw8bit": "bitsandbytes"}


class QuantizationUnavailable(RuntimeError):
    """A base dtype or optimizer this machine cannot run (the message says what it needs)."""


def _cuda_reason(device: torch.device | str) -> str | None:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device here" if not torch.cuda.is_available() else f"the run's device is {device}"
    return None


def check_base_dtype(base_dtype: str, device: torch.device | str) -> None:
    """Raise :class:`QuantizationUnavailable` when ``base_dtype`` cannot run on ``device`` here."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"unknown base_dtype {base_dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
    if base_dtype == "bf16":
        return
    package = {"fp8": "torchao", "nf4": "bitsandbytes"}[base_dtype]
    need = {"fp8": "an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper) and torchao",
            "nf4": "a CUDA GPU and bitsandbytes"}[base_dtype]
    reason = _cuda_reason(device)
    if reason is None and base_dtype == "fp8" and torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        reason = f"{torch.cuda.get_device_name(torch.device(device))} has compute capability " \
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(torch.device(device))))}"
    if reason is None and importlib.util.find_spec(package) is None:
        reason = f"{package} is not installed (pip install {package})"
    if reason:
        raise QuantizationUnavailable(f"model.base_dtype {base_dtype} needs {need}: {reason}. Train with "
                                      f"base_dtype bf16 here, or on such a GPU")


def check_optimizer(optimizer: str, device: torch.device | str) -> None:
    package = OPTIMIZERS_NEEDING_CUDA.get(optimizer)
    if package is None:
        return
    reason = _cuda_reason(device) or (None if importlib.util.find_spec(package) else f"{package} is not installed")
    if reason:
        raise QuantizationUnavailable(f"optimizer {optimizer} (8-bit states) needs a CUDA GPU and {package}: "
                                      f"{reason}. Use prodigy or adamw here")


def load_quantized_transformer(path, base_dtype: str, compute_dtype: torch.dtype):
    """The Flux transformer of the pipeline folder ``path`` with its weights quantized on load."""
    from diffusers import FluxTransformer2DModel

    if base_dtype == "nf4":
        from diffusers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    elif base_dtype == "fp8":
        from diffusers import TorchAoConfig

        quant = TorchAoConfig("float8wo_e4m3")
    else:
        raise ValueError(f"{base_dtype} is not a quantized base dtype")
    return FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", quantization_config=quant,
                                                  torch_dtype=compute_dtype)


def quantize_in_place(module: torch.nn.Module, base_dtype: str, compute_dtype: torch.dtype = torch.bfloat16):
    """Quantize a built module's linear layers (random-weight architectures in the GPU benchmark; cost does not
    depend on weight values): the layer types ``load_quantized_transformer`` gives, without a checkpoint. CUDA."""
    if base_dtype == "fp8":
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Float8WeightOnlyConfig

            quantize_(module, Float8WeightOnlyConfig())
        except ImportError:  # older torchao
            from torchao.quantization import float8_weight_only

            quantize_(module, float8_weight_only())
        return module
    if base_dtype != "nf4":
        raise ValueError(f"{base_dtype} is not a quantized base dtype")
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, layer)
    return module.to("cuda")  # bitsandbytes quantizes the weights as they move to the GPU
