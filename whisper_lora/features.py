"""Log-mel features computed once and memory-mapped, so repeated epochs skip decoding and the FFT.

Whisper always looks at 30 s (3000 frames), but a 5 s clip's spectrogram beyond its last frames is a
constant: the waveform is zero-padded, every all-zero frame hits the log floor, and the floor is the
spectrogram's maximum minus 2 after Whisper's scaling. So only each clip's real frames are stored
(6x less disk for 5 s clips) and the padding is rebuilt exactly on read. Storage is float16: the
features lie in about [-1.5, 1.5], where float16 keeps three significant digits, well inside what
training notices, and halves the I/O.

Layout of a cache folder (written by `whisper-lora prepare --cache-features`):
  features.npy   (total_frames, n_mels) float16, every clip's frames one after another
  index.json     {"ids": [...], "offsets": [...], "frames": [...], "durations": [...], "n_mels": 80,
                  "errors": {sample id: reason}}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .audio import load_window
from .constants import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from .errors import AudioError, UserError
from .manifest import Sample

EDGE_FRAMES = 3  # frames past the audio's end that the STFT window still reaches (n_fft 400 = 2.5 hops)
LOG_FLOOR_BELOW_MAX = 2.0  # Whisper clamps log10 power at max - 8, then scales by 1/4: max - 2
FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"


def real_frames(num_samples: int) -> int:
    """Frames of a clip of `num_samples` that differ from the constant padding."""
    return min(N_FRAMES, num_samples // HOP_LENGTH + EDGE_FRAMES)


def pad_frames(frames: np.ndarray) -> np.ndarray:
    """(frames, n_mels) stored rows -> the (n_mels, 3000) float32 features Whisper's extractor gives."""
    full = np.full((frames.shape[1], N_FRAMES), float(frames.max()) - LOG_FLOOR_BELOW_MAX, dtype=np.float32)
    full[:, : len(frames)] = frames.T
    return full


class FeatureCache:
    """Read side: `cache.get(sample_id)` -> (features (n_mels, 3000), clip seconds), or None if absent."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file() or not (self.folder / FEATURES_FILE).is_file():
            raise UserError("not a feature cache (no index.json / features.npy); write one with "
                            "`whisper-lora prepare --cache-features`", self.folder)
        try:
            index = json.loads(index_path.read_text())
            self.frames = np.load(self.folder / FEATURES_FILE, mmap_mode="r")
        except (json.JSONDecodeError, ValueError, OSError) as exc:
            raise UserError(f"feature cache is damaged ({exc}); write it again", self.folder) from None
        self.n_mels = index["n_mels"]
        self.errors: dict[str, str] = index.get("errors", {})
        self._rows = {sid: (offset, count, duration) for sid, offset, count, duration
                      in zip(index["ids"], index["offsets"], index["frames"], index["durations"])}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._rows

    def get(self, sample_id: str) -> tuple[np.ndarray, float] | None:
        row = self._rows.get(sample_id)
        if row is None:
            return None
        offset, count, duration = row
        return pad_frames(np.asarray(self.frames[offset: offset + count], dtype=np.float32)), duration


def write_feature_cache(samples: list[Sample], processor, folder: str | Path, progress: bool = True) -> dict:
    """Decode every sample once and store its features; unreadable or over-long clips are listed, not stored."""
    from tqdm.auto import tqdm

    from .audio import log_mel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_mels = processor.feature_extractor.feature_size
    ids, offsets, counts, durations, errors = [], [], [], [], {}
    staging = folder / (FEATURES_FILE + ".partial")
    total = 0
    with open(staging, "wb") as raw:  # appended clip by clip: memory stays one clip deep
        for sample in tqdm(samples, desc="cache features", unit="clip", disable=not progress):
            try:
                audio = load_window(sample.audio_path, sample.start, sample.end)
            except AudioError as exc:
                errors[sample.id] = str(exc)
                continue
            count = real_frames(len(audio))
            rows = log_mel(processor, audio)[:, :count].T.astype(np.float16)
            raw.write(rows.tobytes())
            ids.append(sample.id)
            offsets.append(total)
            counts.append(count)
            durations.append(len(audio) / SAMPLE_RATE)
            total += count
    # Wrap the raw rows in a .npy header without copying them through memory.
    data = np.memmap(staging, dtype=np.float16, mode="r", shape=(total, n_mels)) if total else np.zeros((0, n_mels), np.float16)
    out = np.lib.format.open_memmap(folder / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(total, n_mels))
    step = 100_000  # frames copied per chunk (16 MB at 80 mels)
    for start in range(0, total, step):
        out[start: start + step] = data[start: start + step]
    out.flush()
    del data, out
    staging.unlink()
    index = {"ids": ids, "offsets": offsets, "frames": counts, "durations": durations, "n_mels": n_mels,
             "errors": errors}
    (folder / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False))  # last: marks the cache complete
    return {"clips": len(ids), "frames": total, "errors": len(errors),
            "megabytes": round(total * n_mels * 2 / 1e6, 1)}
