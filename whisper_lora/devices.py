"""Where inference runs and in which precision: `--device` and `--dtype`, resolved once, for both backends.

Defaults follow what users of faster-whisper and transformers expect: the first CUDA GPU when torch sees
one, in float16; otherwise the CPU in float32 (float16 matmuls on a CPU are slow or unsupported, and
bfloat16 is only fast on CPUs with bf16 units, so it is asked for, never chosen). Apple's MPS runs the
transformers backend in float32 unless told otherwise; CTranslate2 has no MPS support.
"""
from __future__ import annotations

import re

from .errors import UserError

DEVICE_HELP = "auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_HELP = ("weights and activations of the transformers backend: auto = float16 on CUDA, float32 elsewhere; "
              "with --backend ct2 it picks the compute type unless --compute-type names one")
CT2_GPU_DEFAULT = "float16"  # faster-whisper's recommendation on a GPU
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
GPU_DOCS = "see docs/gpu.md for installing a CUDA build of torch"


def check_device(device: str) -> None:
    """The spelling alone, checked before anything is imported."""
    if not DEVICE_PATTERN.match(device):
        raise UserError(f"--device must be {DEVICE_HELP}, got {device!r}")


def resolve_device(device: str | None = "auto") -> str:
    """A device torch can use now: 'auto' resolved, and a GPU that is not there refused in one line."""
    import torch

    device = device or "auto"
    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
            raise UserError(f"--device {device}: no CUDA GPU is visible to {build}; {GPU_DOCS}")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's Metal backend is not available to this torch")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype for `--dtype` on a resolved device."""
    import torch

    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def torch_placement(device: str | None, dtype: str | None):
    """(device, torch dtype) for the transformers backend: `--device` and `--dtype` resolved together."""
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def ct2_placement(device: str | None, dtype: str | None, compute_type: str = "default") -> tuple[str, int, str]:
    """(device, device_index, compute_type) for CTranslate2, a GPU that it cannot see refused in one line.
    The compute type as `ct2_compute_type` says ('default' on a CPU: faster-whisper's own, which computes an
    fp16 model in float32 there)."""
    device = device or "auto"
    check_device(device)
    if device == "mps":
        raise UserError("--device mps: CTranslate2 runs on CPUs and CUDA GPUs only; use --backend transformers")
    kind, _, index = device.partition(":")
    try:
        import ctranslate2
    except ImportError:
        raise UserError("--backend ct2 needs faster-whisper: pip install 'whisper-lora[ct2]'") from None
    gpus = ctranslate2.get_cuda_device_count()
    if kind == "auto":
        kind = "cuda" if gpus > 0 else "cpu"
    elif kind == "cuda" and int(index or 0) >= gpus:
        why = "" if gpus else " (a CPU-only build, or no GPU)"
        raise UserError(f"--device {device}: CTranslate2 sees {gpus} CUDA device(s){why}; {GPU_DOCS}")
    return kind, int(index or 0), ct2_compute_type(kind, dtype, compute_type)


def ct2_compute_type(kind: str, dtype: str | None, compute_type: str = "default") -> str:
    """CTranslate2's compute type on a device kind ('cpu' or 'cuda'): an explicit --compute-type wins; else an
    explicit --dtype names it; else float16 on a GPU and the stored type on the CPU."""
    if compute_type != "default":
        return compute_type
    if dtype not in (None, "auto"):
        return dtype
    return CT2_GPU_DEFAULT if kind == "cuda" else "default"
