"""Any audio file -> 16 kHz mono float32, the only shape Whisper takes.

soundfile (libsndfile) reads WAV/FLAC/OGG quickly and can seek; PyAV (FFmpeg) reads everything else
(MP3, M4A/AAC, WebM/Opus, video containers). Resampling uses soxr, which is faster and cleaner than
torchaudio's and has no torch dependency.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .constants import CHUNK_SECONDS, N_SAMPLES, RAW_PCM_SUFFIXES, SAMPLE_RATE
from .errors import AudioError

MAX_SAMPLE_RATE = 768_000  # Hz; a header claiming more is corrupt, not hi-fi


def _read_soundfile(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        rate = f.samplerate
        first = int(round((start or 0.0) * rate))
        last = f.frames if end is None else min(f.frames, int(round(end * rate)))
        f.seek(min(first, f.frames))
        audio = f.read(max(0, last - first), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _read_pyav(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise AudioError("no audio stream in file", path)
        stream = container.streams.audio[0]
        # Let FFmpeg downmix and resample while decoding: one pass, constant memory per frame.
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
        if start:
            container.seek(int(start / stream.time_base), stream=stream, any_frame=False, backward=True)
        pieces, first_time = [], None
        for frame in container.decode(stream):
            if first_time is None:
                first_time = float(frame.time or 0.0)
            if end is not None and frame.time is not None and frame.time > end:
                break
            for out in resampler.resample(frame):
                pieces.append(out.to_ndarray()[0])
        for out in resampler.resample(None):
            pieces.append(out.to_ndarray()[0])
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    offset = (first_time or 0.0)
    lo = max(0, int(round(((start or 0.0) - offset) * SAMPLE_RATE)))
    hi = len(audio) if end is None else max(lo, int(round((end - offset) * SAMPLE_RATE)))
    return audio[lo:hi], SAMPLE_RATE


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise AudioError("audio file not found", path, kind="missing_audio")
    if path.stat().st_size == 0:
        raise AudioError("audio file is empty (0 bytes)", path, kind="empty_audio")


def load_audio(path: str | Path, start: float | None = None, end: float | None = None,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `path` (optionally the span start..end seconds) to mono float32 at `sample_rate`.

    Raises AudioError naming the file for anything a user can fix: missing, empty, undecodable,
    zero samples, NaN/inf samples, an impossible sample rate.
    """
    path = Path(path)
    _check_file(path)
    if start is not None and end is not None and end <= start:
        raise AudioError(f"end time {end} s is not after start time {start} s", path, kind="bad_span")

    if path.suffix.lower() in RAW_PCM_SUFFIXES:
        pcm = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
        rate = SAMPLE_RATE
        lo = int(round((start or 0.0) * rate))
        hi = len(pcm) if end is None else int(round(end * rate))
        audio = pcm[lo:hi]
    else:
        audio, rate = _decode(path, start, end)
    if rate <= 0 or rate > MAX_SAMPLE_RATE:
        raise AudioError(f"implausible sample rate {rate} Hz in header", path, kind="bad_sample_rate")
    if audio.size == 0:
        raise AudioError("audio has zero samples" + (" in the requested span" if start or end else ""), path,
                         kind="empty_audio")
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples", path, kind="non_finite_audio")
    if rate != sample_rate:
        import soxr

        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def check_window(audio: np.ndarray, path: str | Path) -> np.ndarray:
    """Refuse a training or scoring sample longer than Whisper's 30 s window rather than cut it: its
    transcript would no longer match what the model hears."""
    if len(audio) > N_SAMPLES:
        raise AudioError(f"{len(audio) / SAMPLE_RATE:.1f} s is longer than Whisper's {CHUNK_SECONDS} s window; "
                         "the transcript would no longer match the audio", path, kind="too_long")
    return audio


def load_window(path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """load_audio for one sample that must fit one window (training, feature caching, shards, scoring)."""
    return check_window(load_audio(path, start, end), path)


def _decode(path: Path, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        return _read_soundfile(path, start, end)
    except sf.LibsndfileError:
        pass  # not a format libsndfile knows (MP3 on old builds, M4A, WebM): try FFmpeg
    except (RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot decode audio ({exc})", path) from None
    import av

    try:
        return _read_pyav(path, start, end)
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise AudioError(f"cannot decode audio ({type(exc).__name__}: {exc})", path) from None


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the header alone (no decoding); raises AudioError if unreadable."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in RAW_PCM_SUFFIXES:
        return path.stat().st_size / 2 / SAMPLE_RATE
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except (sf.LibsndfileError, RuntimeError):
        pass
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration is None:
                raise AudioError("cannot read audio duration", path)
            return container.duration / 1_000_000
    except av.FFmpegError as exc:
        raise AudioError(f"cannot decode audio ({exc})", path) from None


def log_mel(processor, audio: np.ndarray) -> np.ndarray:
    """(n_mels, 3000) log-mel features of up to 30 s of 16 kHz audio, padded as Whisper was trained: the
    one front end that training, decoding and the feature cache share."""
    return processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
