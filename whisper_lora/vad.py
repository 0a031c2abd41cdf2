"""Voice-activity detection as a pure function: audio in, speech regions out.

Uses the Silero VAD model that ships inside the faster-whisper package (ONNX, run offline through
onnxruntime), so no model is downloaded. Regions are packed into windows of at most 30 s, which the
decoder then transcribes in batches; times always refer to the original audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import CHUNK_SECONDS, SAMPLE_RATE
from .errors import UserError

MIN_SILENCE_MS = 500  # a pause this long separates two regions
SPEECH_PAD_MS = 200  # kept on each side of a region so word edges are not clipped


@dataclass(frozen=True)
class SpeechRegion:
    start: float  # seconds in the original audio
    end: float


def speech_regions(audio: np.ndarray, threshold: float = 0.5) -> list[SpeechRegion]:
    """Speech regions of 16 kHz mono audio, each at most 30 s long."""
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps
    except ImportError:
        raise UserError("--vad needs the Silero model shipped with faster-whisper: pip install 'whisper-lora[ct2]'") from None
    options = VadOptions(threshold=threshold, min_silence_duration_ms=MIN_SILENCE_MS, speech_pad_ms=SPEECH_PAD_MS,
                         max_speech_duration_s=CHUNK_SECONDS - 1)
    stamps = get_speech_timestamps(audio, options, sampling_rate=SAMPLE_RATE)
    return [SpeechRegion(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def pack_regions(regions: list[SpeechRegion], max_seconds: float = CHUNK_SECONDS) -> list[list[SpeechRegion]]:
    """Group consecutive regions into windows whose span fits Whisper's 30 s input."""
    windows: list[list[SpeechRegion]] = []
    for region in regions:
        if windows and region.end - windows[-1][0].start <= max_seconds:
            windows[-1].append(region)
        else:
            windows.append([region])
    return windows
