"""Device and dtype choice in one place: CUDA when present, bf16 there, fp32 on CPU. No hard-coded ``.cuda()``."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else is passed to ``torch.device`` (e.g. ``cuda:1``)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} asked for, but torch sees no CUDA device (torch {torch.__version__})")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[spec]
    except KeyError:
        raise ValueError(f"unknown dtype {spec!r}; choose auto or one of {sorted(_DTYPES)}") from None


def onnx_providers() -> tuple[list[str], int]:
    """onnxruntime execution providers for the insightface models, CUDA first when onnxruntime offers it (the
    ``gpu`` extra's onnxruntime-gpu), and the ``ctx_id`` insightface's ``prepare`` wants with them (-1: CPU)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], 0
    return ["CPUExecutionProvider"], -1
