"""Training manifests -> typed `Sample` records.

Three formats are read as users already have them:

* JSON dict   ``{"a.wav": "transcript", ...}``  (paths relative to --audio-dir)
* JSON list   ``[{"audio_path": "a.wav", "text": "...", "language"?: "zh"}, ...]``
* JSON lines  ``{"audio": {"path", "start_time"?, "end_time"?}, "sentence", "language"?,
  "sentences"?: [{"start", "end", "text"}], "duration"?}``  (Whisper-Finetune's format)

Relative paths resolve against --audio-dir when given, else the manifest's own folder. Every error
names the manifest and the line or entry it is about.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError, UserError


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds from the start of the sample
    end: float  # seconds
    text: str


@dataclass(frozen=True)
class Sample:
    audio_path: Path
    text: str
    language: str | None = None
    start: float | None = None  # seconds into audio_path; None = from the beginning
    end: float | None = None  # seconds; None = to the end
    duration: float | None = None  # seconds, as declared by the manifest
    sentences: tuple[TimedText, ...] = ()
    source: str = field(default="", compare=False)  # "manifest.jsonl:12", for error messages

    @property
    def id(self) -> str:
        span = "" if self.start is None and self.end is None else f"@{self.start or 0}-{self.end or ''}"
        return f"{self.audio_path}{span}"


def language_code(value: str, where: str) -> str:
    """Whisper's code for a language given as a code ("zh"), a token ("<|zh|>") or a name ("Chinese")."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = value.strip().lower().removeprefix("<|").removesuffix("|>")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UserError(f"unknown language {value!r}; use a Whisper language code such as 'en', 'zh', 'mr'", where)


def _text_field(row: dict, keys: tuple[str, ...], where: str, path: Path) -> str:
    for key in keys:
        if key in row:
            value = row[key]
            if not isinstance(value, str):
                raise ManifestError(f"{where}: '{key}' must be a string, got {type(value).__name__}", path)
            if not value.strip():
                raise ManifestError(f"{where}: empty text in '{key}'", path)
            return value.strip()
    raise ManifestError(f"{where}: row has no text (expected one of {', '.join(keys)})", path)


def _optional_float(row: dict, key: str, where: str, path: Path) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where}: '{key}' must be a number of seconds, got {value!r}", path)
    return float(value)


def _sentences(value: object, where: str, path: Path) -> tuple[TimedText, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ManifestError(f"{where}: 'sentences' must be a list of {{start, end, text}}", path)
    out = []
    for i, item in enumerate(value):
        try:
            out.append(TimedText(float(item["start"]), float(item["end"]), str(item["text"])))
        except (KeyError, TypeError, ValueError):
            raise ManifestError(f"{where}: sentences[{i}] needs numeric 'start', 'end' and a 'text'", path) from None
    return tuple(out)


def _row_to_sample(row: object, where: str, path: Path, base: Path) -> Sample:
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}", path)
    audio = row.get("audio", row.get("audio_path", row.get("path")))
    start = end = None
    if isinstance(audio, dict):
        start = _optional_float(audio, "start_time", where, path)
        end = _optional_float(audio, "end_time", where, path)
        audio = audio.get("path")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: row has no audio path ('audio.path' or 'audio_path')", path)
    text = _text_field(row, ("sentence", "text", "transcript"), where, path)
    language = row.get("language")
    if language is not None:
        language = language_code(str(language), f"{path}: {where}")
    sentences = _sentences(row.get("sentences"), where, path)
    return Sample(audio_path=(base / audio).resolve() if not Path(audio).is_absolute() else Path(audio),
                  text=text, language=language, start=start, end=end,
                  duration=_optional_float(row, "duration", where, path), sentences=sentences,
                  source=f"{path}:{where}")


def read_manifest(path: str | Path, audio_dir: str | Path | None = None) -> list[Sample]:
    """Read any supported manifest into Samples; raises ManifestError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest not found", path)
    base = Path(audio_dir) if audio_dir else path.parent
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not valid UTF-8 (byte {exc.start})", path) from None
    if not content.strip():
        raise ManifestError("manifest is empty", path)

    try:
        whole = json.loads(content)
    except json.JSONDecodeError as whole_error:
        whole = None
        if content.lstrip().startswith("["):
            raise ManifestError(f"invalid JSON at line {whole_error.lineno}: {whole_error.msg}", path) from None

    is_single_row = isinstance(whole, dict) and any(k in whole for k in ("audio", "audio_path", "path"))
    if isinstance(whole, dict) and whole and not is_single_row and all(isinstance(v, str) for v in whole.values()):
        samples = []
        for audio, text in whole.items():
            if not text.strip():
                raise ManifestError(f"entry '{audio}': empty text", path)
            samples.append(Sample(audio_path=(base / audio).resolve(), text=text.strip(), source=f"{path}:{audio}"))
        return samples
    if isinstance(whole, list):
        return [_row_to_sample(row, f"entry {i}", path, base) for i, row in enumerate(whole)]

    samples = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"line {number}: invalid JSON ({exc.msg})", path) from None
        samples.append(_row_to_sample(row, f"line {number}", path, base))
    return samples


def check_audio_exists(samples: list[Sample], manifest: str | Path) -> None:
    """Fail fast, before any model is loaded, if rows point at audio that is not there."""
    missing = [s for s in samples if not s.audio_path.is_file()]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ManifestError(f"audio file not found: {first.audio_path} ({first.source.rsplit(':', 1)[-1]}){more}",
                            manifest)
