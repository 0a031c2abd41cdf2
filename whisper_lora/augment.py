"""Training-time data augmentation, configured from a YAML file and deterministic under a seed.

Waveform augmentations (speed, time shift, volume, additive noise) act on 16 kHz mono float32 audio
before the log-mel; SpecAugment acts on the log-mel itself. Everything is NumPy + soxr, cheap enough
for DataLoader workers, and needs no torch.

Every random choice for a sample comes from a generator seeded with (seed, epoch, stable hash of the
sample's key, augmentation id), never from global state. So a sample gets the same augmentation in any
worker process, on any rank and after a resume, a different one in the next epoch, and turning one
augmentation on or off does not change what the others draw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio import load_audio
from .constants import AUDIO_SUFFIXES, CHUNK_SECONDS, N_SAMPLES, SAMPLE_RATE
from .settings import option, read_value, read_yaml_mapping
from .errors import AudioError, UserError

# Suffixes picked up from a noise folder; the same formats `load_audio` decodes.
NOISE_CACHE_BYTES = 64 * 2**20  # per process: ~17 min of 16 kHz float32 noise; each DataLoader worker has its own
QUIET_DB = -40.0  # dB below the clip's peak: samples under this before the first word count as leading silence
ONSET_MARGIN = int(0.02 * SAMPLE_RATE)  # samples (20 ms) always kept before the first loud sample
HASH_BYTES = 8  # 64-bit key hash: collisions only make two samples share a random stream, which is harmless

# Stream ids: each augmentation draws from its own generator, so enabling one leaves the others' draws alone.
SPEED, SHIFT, VOLUME, NOISE, SPEC_AUGMENT = range(5)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SpeedConfig:
    p: float = option(0.5, "probability that a clip is speed-perturbed")
    factors: tuple[float, ...] = option((0.9, 1.0, 1.1), "speed factors drawn uniformly; 1.1 = 10% faster and "
                                                         "higher (Kaldi-style: tempo and pitch change together)")

    def validate(self) -> None:
        _check_p("speed", self.p)
        if not self.factors:
            raise UserError("speed.factors: needs at least one factor")
        for factor in self.factors:
            if not factor > 0:
                raise UserError(f"speed.factors: every factor must be > 0, got {factor}")


@dataclass(frozen=True)
class VolumeConfig:
    p: float = option(0.5, "probability that a clip's gain is changed")
    min_db: float = option(-6.0, "lowest gain in dB")
    max_db: float = option(6.0, "highest gain in dB")

    def validate(self) -> None:
        _check_p("volume", self.p)
        if self.min_db > self.max_db:
            raise UserError(f"volume.min_db: must not exceed volume.max_db ({self.max_db}), got {self.min_db}")


@dataclass(frozen=True)
class NoiseConfig:
    dir: str = option(None, "folder of noise recordings (searched recursively); relative to the YAML file's folder")
    p: float = option(0.5, "probability that noise is added to a clip")
    min_snr_db: float = option(5.0, "lowest signal-to-noise ratio in dB (noisiest)")
    max_snr_db: float = option(20.0, "highest signal-to-noise ratio in dB (cleanest)")

    def validate(self) -> None:
        _check_p("noise", self.p)
        if self.min_snr_db > self.max_snr_db:
            raise UserError(f"noise.min_snr_db: must not exceed noise.max_snr_db ({self.max_snr_db}), "
                            f"got {self.min_snr_db}")
        if not self.dir:
            raise UserError("noise.dir: is required (a folder of noise recordings)")
        folder = Path(self.dir)
        if not folder.is_dir():
            raise UserError(f"noise.dir: folder not found: {folder}")
        files = noise_files(folder)
        if not files:
            raise UserError(f"noise.dir: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {folder}")
        # One decodable file proves the folder is usable; decoding all of them here would stall start-up
        # on a large noise corpus. A file that fails later is skipped deterministically (see Augmenter).
        for path in files:
            try:
                load_audio(path)
                return
            except AudioError:
                continue
        raise UserError(f"noise.dir: none of the {len(files)} audio files in {folder} can be decoded")


@dataclass(frozen=True)
class ShiftConfig:
    p: float = option(0.3, "probability that a clip is shifted in time")
    max_seconds: float = option(0.5, "largest shift; positive delays the speech, negative drops leading silence")

    def validate(self) -> None:
        _check_p("shift", self.p)
        if not 0 <= self.max_seconds <= CHUNK_SECONDS:
            raise UserError(f"shift.max_seconds: must lie in [0, {CHUNK_SECONDS}], got {self.max_seconds}")


@dataclass(frozen=True)
class SpecAugmentConfig:
    p: float = option(0.5, "probability that a clip's log-mel is masked")
    freq_masks: int = option(2, "number of frequency masks")
    freq_width: int = option(27, "widest frequency mask, in mel bins (Park et al. 2019: F = 27 of 80)")
    time_masks: int = option(2, "number of time masks")
    time_width: int = option(100, "widest time mask, in 10 ms frames (Park et al. 2019: T = 100)")
    max_time_fraction: float = option(0.2, "a time mask covers at most this fraction of the clip's frames, so a "
                                           "short clip is never blanked out (Park et al.'s p)")

    def validate(self) -> None:
        _check_p("spec_augment", self.p)
        for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
            if getattr(self, name) < 0:
                raise UserError(f"spec_augment.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.max_time_fraction <= 1:
            raise UserError(f"spec_augment.max_time_fraction: must lie in (0, 1], got {self.max_time_fraction}")


@dataclass(frozen=True)
class AugmentConfig:
    """One optional section per augmentation; None = off."""

    speed: SpeedConfig | None = option(None, "speed perturbation via soxr resampling")
    volume: VolumeConfig | None = option(None, "random gain")
    noise: NoiseConfig | None = option(None, "additive noise from a folder at a random SNR")
    shift: ShiftConfig | None = option(None, "time shift by padding or trimming at the start")
    spec_augment: SpecAugmentConfig | None = option(None, "frequency and time masks on the log-mel")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if section is not None:
                section.validate()

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (no tuples), so `yaml.safe_dump` can record it next to a run's outputs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if section is not None:
                fields = dataclasses.asdict(section)
                out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return out


SECTIONS: dict[str, type] = {"speed": SpeedConfig, "volume": VolumeConfig, "noise": NoiseConfig,
                             "shift": ShiftConfig, "spec_augment": SpecAugmentConfig}


def _check_p(section: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise UserError(f"{section}.p: must lie in [0, 1], got {p}")


def _read_section(name: str, raw: dict, base: Path) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field_name = str(key).replace("-", "_")
        if field_name not in known:
            raise UserError(f"{name}.{key}: unknown key; {name} takes {', '.join(sorted(known))}")
        values[field_name] = read_value(value, hints[field_name], f"{name}.{key}")
    if name == "noise" and values.get("dir"):
        # Relative to the YAML file, not the working directory, so a config works from anywhere.
        values["dir"] = str(base / Path(values["dir"]).expanduser())
    return cls(**values)


def load_augment_config(path: str | Path) -> AugmentConfig:
    """Read and check an augmentation YAML; any problem is a one-line UserError naming the file and key."""
    path = Path(path)
    loaded = read_yaml_mapping(path, "augmentation config file")
    sections: dict[str, Any] = {}
    try:
        for key, raw in loaded.items():
            name = str(key).replace("-", "_")
            if name not in SECTIONS:
                raise UserError(f"{key}: unknown section; expected one of {', '.join(SECTIONS)}")
            if raw is None or raw is False:
                continue  # `noise: null` / `noise: false` switch a section off without deleting it
            if not isinstance(raw, dict):
                raise UserError(f"{key}: expected a mapping of settings (or null to turn it off), got {raw!r}")
            sections[name] = _read_section(name, raw, path.parent)
        config = AugmentConfig(**sections)
        config.validate()
    except UserError as exc:
        raise UserError(str(exc), path) from None
    return config


# ------------------------------------------------------------------------------------ pure functions


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that is the same in every process (Python's `hash()` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=HASH_BYTES).digest(), "little")


def noise_files(folder: str | Path) -> list[Path]:
    """Audio files under `folder`, sorted so that every process indexes them identically."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play `audio` `factor` times faster: length / factor, pitch × factor (Kaldi's `sox speed`)."""
    import soxr

    if factor == 1.0:
        return audio
    # Declaring the input rate as SAMPLE_RATE × factor and resampling to SAMPLE_RATE is exactly a speed change.
    return soxr.resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE).astype(np.float32, copy=False)


def change_volume(audio: np.ndarray, gain_db: float) -> np.ndarray:
    return (audio * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32, copy=False)


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`audio` plus `noise` (same length) scaled so that mean power(audio) / mean power(noise) = snr_db."""
    signal_power = float(np.mean(np.square(audio, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if signal_power == 0.0 or noise_power == 0.0:
        return audio  # an SNR is undefined against silence; leave the clip alone rather than guess a level
    scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (audio + np.float32(scale) * noise).astype(np.float32, copy=False)


def noise_excerpt(noise: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of `noise` from a random offset, tiled end to start when the noise is shorter."""
    if len(noise) >= length:
        start = int(rng.integers(0, len(noise) - length + 1))
        return noise[start:start + length]
    start = int(rng.integers(0, len(noise)))
    return np.take(noise, (start + np.arange(length)) % len(noise))


def leading_silence(audio: np.ndarray) -> int:
    """Samples before the first one within QUIET_DB of the peak, less ONSET_MARGIN: safe to trim."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return 0  # an all-silent clip has no onset to protect, but trimming it to nothing helps nobody
    first = int(np.argmax(np.abs(audio) > peak * 10.0 ** (QUIET_DB / 20.0)))
    return max(0, first - ONSET_MARGIN)


def time_shift(audio: np.ndarray, samples: int) -> np.ndarray:
    """Delay (samples > 0: prepend silence) or advance (samples < 0: drop leading samples) the clip.

    Padding stops at N_SAMPLES in total: audio past Whisper's 30 s window would be cut from the features
    while its words stay in the label.
    """
    if samples > 0:
        pad = min(samples, max(0, N_SAMPLES - len(audio)))
        return np.concatenate([np.zeros(pad, np.float32), audio]) if pad else audio
    if samples < 0:
        return audio[min(-samples, len(audio)):]
    return audio


def content_frames(mel: np.ndarray) -> int:
    """Frames up to the last one holding more than the padding floor.

    Whisper pads audio with zeros to 30 s and clamps the log-mel at 8 decades below the clip's peak, so the
    padded tail is exactly the array's minimum; masks placed there would change nothing.
    """
    above = np.flatnonzero((mel > mel.min()).any(axis=0))
    return int(above[-1]) + 1 if above.size else mel.shape[1]


def draw_masks(rng: np.random.Generator, n_mels: int, n_frames: int, config: SpecAugmentConfig
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """SpecAugment masks as (start, width) mel-bin bands and frame spans; widths ~ U{0..max} as in Park et al."""
    bands = []
    for _ in range(config.freq_masks):
        width = int(rng.integers(0, min(config.freq_width, n_mels) + 1))
        bands.append((int(rng.integers(0, n_mels - width + 1)), width))
    widest = min(config.time_width, int(config.max_time_fraction * n_frames))
    spans = []
    for _ in range(config.time_masks):
        width = int(rng.integers(0, widest + 1))
        spans.append((int(rng.integers(0, n_frames - width + 1)), width))
    return bands, spans


def apply_masks(mel: np.ndarray, bands: list[tuple[int, int]], spans: list[tuple[int, int]],
                value: float) -> np.ndarray:
    """A copy of `mel` (n_mels, frames) with the given mel bands and frame spans set to `value`."""
    out = mel.copy()
    for start, width in bands:
        out[start:start + width, :] = value
    for start, width in spans:
        out[:, start:start + width] = value
    return out


# ----------------------------------------------------------------------------------------- augmenter


class Augmenter:
    """Applies an AugmentConfig to one sample at a time; safe to pickle into DataLoader workers.

    Both methods return their input unchanged (the same array) when nothing fires, so a disabled
    augmentation costs one random draw.
    """

    def __init__(self, config: AugmentConfig, seed: int):
        config.validate()
        self.config = config
        self.seed = int(seed)
        self._noise_files = tuple(noise_files(config.noise.dir)) if config.noise else ()
        self._noise_cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._noise_cache_bytes = 0
        self._bad_noise: set[Path] = set()

    def _rng(self, key: str, epoch: int, stream: int) -> np.random.Generator:
        # SeedSequence takes non-negative integers only; modulo keeps a negative seed valid and distinct.
        return np.random.default_rng([self.seed % 2**64, int(epoch) % 2**64, stable_hash(key), stream])

    @property
    def changes_audio(self) -> bool:
        """True when some section works on the waveform (so precomputed features cannot be used)."""
        c = self.config
        return any((c.speed, c.volume, c.noise, c.shift))

    def audio(self, audio: np.ndarray, key: str, epoch: int) -> np.ndarray:
        """Speed, shift, volume, then noise, on 16 kHz mono audio; float32, finite, within [-1, 1] if clipped."""
        return self.audio_with_timing(audio, key, epoch)[0]

    def audio_with_timing(self, audio: np.ndarray, key: str, epoch: int) -> tuple[np.ndarray, float, float]:
        """`audio()` plus how it moved time: a moment t s of the input is at t * scale + offset s of the
        output. Timestamp labels (`sentences`) follow speed perturbation and shifts with it."""
        c = self.config
        out = np.asarray(audio, dtype=np.float32)
        scale, offset = 1.0, 0.0
        if out.size == 0:
            return out, scale, offset
        # Speed first so shift seconds mean output seconds; shift before noise so the silence it pads in
        # gets noise too (digital silence before every word would be an unrealistic cue).
        if c.speed:
            rng = self._rng(key, epoch, SPEED)
            if rng.random() < c.speed.p:
                factor = c.speed.factors[int(rng.integers(len(c.speed.factors)))]
                if math.ceil(len(out) / factor) <= N_SAMPLES:
                    before = len(out)
                    out = speed_perturb(out, factor)
                    scale = len(out) / before
        if c.shift:
            rng = self._rng(key, epoch, SHIFT)
            if rng.random() < c.shift.p:
                samples = int(round(rng.uniform(-c.shift.max_seconds, c.shift.max_seconds) * SAMPLE_RATE))
                # Dropping more than the leading silence would cut the first word while the label keeps it.
                before = len(out)
                out = time_shift(out, max(samples, -leading_silence(out)))
                offset = (len(out) - before) / SAMPLE_RATE  # padding or trimming happens at the start
        if c.volume:
            rng = self._rng(key, epoch, VOLUME)
            if rng.random() < c.volume.p:
                out = change_volume(out, rng.uniform(c.volume.min_db, c.volume.max_db))
        if c.noise:
            rng = self._rng(key, epoch, NOISE)
            if rng.random() < c.noise.p:
                first = int(rng.integers(len(self._noise_files)))
                snr_db = rng.uniform(c.noise.min_snr_db, c.noise.max_snr_db)
                noise = self._load_noise(first)
                if noise is not None:
                    out = add_noise(out, noise_excerpt(noise, len(out), rng), snr_db)
        if out is audio:
            return audio, scale, offset
        peak = float(np.max(np.abs(out)))
        if peak > 1.0:
            out = np.clip(out, -1.0, 1.0)
        return np.ascontiguousarray(out, dtype=np.float32), scale, offset

    def features(self, mel: np.ndarray, key: str, epoch: int) -> np.ndarray:
        """SpecAugment on one (n_mels, frames) log-mel; masks fall inside the clip, not its padding.

        The mask value is the mean of the clip's non-padding log-mel. Park et al. mask with 0 on
        mean-normalised features, i.e. with the mean; Whisper's features are (log10 + 4) / 4, not
        zero-mean, so 0 there is a fixed absolute level (log10 power -4) that is loud for a quiet clip
        and quiet for a loud one. Padding is left out of the mean because it is most of a short clip
        and would turn every mask into silence.
        """
        c = self.config.spec_augment
        if c is None:
            return mel
        if mel.ndim != 2:
            raise ValueError(f"expected (n_mels, frames) features, got shape {mel.shape}")
        rng = self._rng(key, epoch, SPEC_AUGMENT)
        if rng.random() >= c.p:
            return mel
        frames = content_frames(mel)
        bands, spans = draw_masks(rng, mel.shape[0], frames, c)
        return apply_masks(mel, bands, spans, float(mel[:, :frames].mean()))

    def describe(self) -> str:
        c = self.config
        parts = []
        if c.speed:
            parts.append(f"speed p={c.speed.p:g} x{{{', '.join(f'{f:g}' for f in c.speed.factors)}}}")
        if c.shift:
            parts.append(f"shift p={c.shift.p:g} ±{c.shift.max_seconds:g} s")
        if c.volume:
            parts.append(f"volume p={c.volume.p:g} {c.volume.min_db:+g}..{c.volume.max_db:+g} dB")
        if c.noise:
            parts.append(f"noise p={c.noise.p:g} {len(self._noise_files)} files "
                         f"SNR {c.noise.min_snr_db:g}..{c.noise.max_snr_db:g} dB")
        if c.spec_augment:
            s = c.spec_augment
            parts.append(f"spec_augment p={s.p:g} {s.freq_masks}×F≤{s.freq_width} "
                         f"{s.time_masks}×T≤{s.time_width}")
        return "augment: " + ("; ".join(parts) if parts else "off")

    def _load_noise(self, first: int) -> np.ndarray | None:
        """The noise file at index `first`, or the next decodable one: every process skips the same bad files."""
        n = len(self._noise_files)
        for step in range(n):
            path = self._noise_files[(first + step) % n]
            if path in self._bad_noise:
                continue
            cached = self._noise_cache.get(path)
            if cached is not None:
                self._noise_cache.move_to_end(path)
                return cached
            try:
                noise = load_audio(path)
            except AudioError as exc:
                self._bad_noise.add(path)
                warnings.warn(f"skipping noise file: {exc}", stacklevel=2)
                continue
            if not np.any(noise):
                self._bad_noise.add(path)  # all-zero noise gives no SNR to scale to
                continue
            self._remember(path, noise)
            return noise
        return None

    def _remember(self, path: Path, noise: np.ndarray) -> None:
        if noise.nbytes > NOISE_CACHE_BYTES:
            return  # a file bigger than the whole cache would only evict everything else
        self._noise_cache[path] = noise
        self._noise_cache_bytes += noise.nbytes
        while self._noise_cache_bytes > NOISE_CACHE_BYTES:
            _, evicted = self._noise_cache.popitem(last=False)
            self._noise_cache_bytes -= evicted.nbytes
