"""whisper-lora: fine-tune Whisper with LoRA, offline, from data to deployment.

`import whisper_lora` is light (no torch): the names below load their modules on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_audio": "whisper_lora.audio",
    "UserError": "whisper_lora.errors",
    "load_model": "whisper_lora.models",
    "DecodeOptions": "whisper_lora.decode",
    "Segment": "whisper_lora.decode",
    "TranscriptionInfo": "whisper_lora.decode",
    "TransformersBackend": "whisper_lora.decode",
    "CT2Backend": "whisper_lora.decode",
    "load_backend": "whisper_lora.decode",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'whisper_lora' has no attribute {name!r}")


def transcribe(audio, model: str | None = None, language: str | None = None, task: str = "transcribe"):
    """One-call transcription: `segments, info = whisper_lora.transcribe("a.wav")` (segments is lazy)."""
    from .decode import DecodeOptions, load_backend

    samples = audio if hasattr(audio, "dtype") else str(audio)  # paths are read block by block
    return load_backend(model).transcribe(samples, language, DecodeOptions(task=task))


__all__ = ["__version__", "transcribe", *_LAZY]
