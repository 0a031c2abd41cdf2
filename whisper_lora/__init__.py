"""whisper-lora: fine-tune Whisper with LoRA, offline, from data to deployment."""
from __future__ import annotations

__version__ = "0.1.0"

from .audio import load_audio  # noqa: E402
from .errors import UserError  # noqa: E402
from .inference import DecodeOptions, Segment, Transcriber, TranscriptionInfo  # noqa: E402
from .models import load_model  # noqa: E402


def transcribe(audio, model=None, language: str | None = None, task: str = "transcribe"):
    """One-call transcription: `segments, info = whisper_lora.transcribe("a.wav")` (segments is lazy)."""
    loaded_model, processor = load_model(model)
    samples = audio if hasattr(audio, "dtype") else str(audio)  # paths are read block by block
    return Transcriber(loaded_model, processor).transcribe(samples, language, DecodeOptions(task=task))


__all__ = ["__version__", "load_audio", "load_model", "transcribe", "DecodeOptions", "Segment", "TranscriptionInfo",
           "Transcriber", "UserError"]
