"""Training manifests -> typed `Sample` records.

Three formats are read as users already have them:

* JSON dict   ``{"a.wav": "transcript", ...}``  (paths relative to --audio-dir)
* JSON list   ``[{"audio_path": "a.wav", "text": "...", "language"?: "zh"}, ...]``
* JSON lines  ``{"audio": {"path", "start_time"?, "end_time"?}, "sentence", "language"?,
  "sentences"?: [{"start", "end", "text"}], "duration"?}``  (Whisper-Finetune's format)

Relative paths resolve against --audio-dir when given, else the manifest's own folder. Every error
names the manifest and the line or entry it is about.

There is one parser with two front ends. `iter_rows` never stops at a bad row: it yields every row
with either its Sample or all the reasons it has none, so that `whisper-lora check` can list every
problem in one pass. `read_manifest` is the strict front end training uses: it raises on the first
bad row. The file is read as bytes and decoded leniently, so one line of broken UTF-8 is reported
with its line number instead of the whole file being rejected.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ManifestError, UserError

AUDIO_KEYS = ("audio", "audio_path", "path")  # where a row's audio path may live, in order of precedence
TEXT_KEYS = ("sentence", "text", "transcript")
# Bytes that are not UTF-8 survive decoding with "surrogateescape" as lone surrogates U+DC80..U+DCFF:
# finding one in a string is how a bad line is found without giving up on the rest of the file.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds from the start of the sample
    end: float  # seconds
    text: str


@dataclass(frozen=True)
class Sample:
    audio_path: Path
    text: str  # "" only when read with allow_empty_text: a no-speech sample
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


@dataclass(frozen=True)
class RowProblem:
    """One reason a manifest row cannot become a Sample."""
    kind: str  # stable identifier: invalid_json, not_utf8, not_object, no_audio_path, no_text, empty_text,
    #            bad_field, bad_sentences, unknown_language
    message: str  # worded for the user, without the location (ManifestRow.where holds it)


@dataclass(frozen=True)
class ManifestRow:
    """One row as the manifest has it: where it is, what it says, and its Sample or why there is none."""
    index: int  # position among the manifest's rows, 0-based
    where: str  # "line 12", "entry 3", "entry 'a.wav'"; "" when the problem is the whole file
    line: int | None  # 1-based line in the file where it is known (JSON lines, whole-file JSON errors)
    format: str  # "dict", "list" or "lines"
    raw: object  # the row as parsed: a dict ({path: text} for the dict format), or the line's text if unparsable
    audio_path: Path | None  # resolved audio path whenever the row names one, even if the row is bad
    sample: Sample | None
    problems: tuple[RowProblem, ...] = ()


def language_code(value: str, where: str) -> str:
    """Whisper's code for a language given as a code ("zh"), a token ("<|zh|>") or a name ("Chinese")."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = value.strip().lower().removeprefix("<|").removesuffix("|>")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise UserError(f"unknown language {value!r}; use a Whisper language code such as 'en', 'zh', 'mr'", where)


class _Problems(list):
    def add(self, kind: str, message: str) -> None:
        self.append(RowProblem(kind, message))


def _has_undecodable(value: object) -> bool:
    if isinstance(value, str):
        return _UNDECODABLE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _text_field(row: dict, problems: _Problems, allow_empty: bool) -> str | None:
    for key in TEXT_KEYS:
        if key in row:
            value = row[key]
            if not isinstance(value, str):
                problems.add("bad_field", f"'{key}' must be a string, got {type(value).__name__}")
                return None
            if not value.strip() and not allow_empty:
                problems.add("empty_text", f"empty text in '{key}'")
                return None
            return value.strip()
    problems.add("no_text", f"row has no text (expected one of {', '.join(TEXT_KEYS)})")
    return None


def _optional_float(row: dict, key: str, problems: _Problems) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add("bad_field", f"'{key}' must be a number of seconds, got {value!r}")
        return None
    return float(value)


def _sentences(value: object, problems: _Problems) -> tuple[TimedText, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add("bad_sentences", "'sentences' must be a list of {start, end, text}")
        return ()
    out = []
    for i, item in enumerate(value):
        try:
            out.append(TimedText(float(item["start"]), float(item["end"]), str(item["text"])))
        except (KeyError, TypeError, ValueError):
            problems.add("bad_sentences", f"sentences[{i}] needs numeric 'start', 'end' and a 'text'")
            return ()
    return tuple(out)


class _Resolver:
    """`(base / audio).resolve()`, fast enough for 100k rows.

    Path.resolve() lstat()s every component of every path (~50 µs a row); rows share a few folders,
    so each folder is resolved once per manifest and only the file name is checked for a symlink.
    """

    def __init__(self, base: Path):
        self.base = str(base)
        self.folders: dict[str, str] = {}

    def __call__(self, audio: str) -> Path:
        if os.path.isabs(audio):
            return Path(audio)
        folder, name = os.path.split(os.path.join(self.base, audio))
        if name in ("", ".", ".."):
            return Path(os.path.realpath(os.path.join(folder, name)))
        if folder not in self.folders:
            self.folders[folder] = os.path.realpath(folder)
        resolved = os.path.join(self.folders[folder], name)
        return Path(os.path.realpath(resolved) if os.path.islink(resolved) else resolved)


def _parse_row(row: object, where: str, path: Path, resolve: _Resolver,
               allow_empty_text: bool) -> tuple[Sample | None, Path | None, list[RowProblem]]:
    """A JSON-list or JSON-lines row -> (Sample or None, its audio path if any, every problem found)."""
    problems = _Problems()
    if not isinstance(row, dict):
        problems.add("not_object", f"expected a JSON object, got {type(row).__name__}")
        return None, None, problems
    audio = row.get("audio", row.get("audio_path", row.get("path")))
    start = end = None
    if isinstance(audio, dict):
        start = _optional_float(audio, "start_time", problems)
        end = _optional_float(audio, "end_time", problems)
        audio = audio.get("path")
    audio_path = None
    if not isinstance(audio, str) or not audio:
        problems.add("no_audio_path", "row has no audio path ('audio.path' or 'audio_path')")
    else:
        audio_path = resolve(audio)
    text = _text_field(row, problems, allow_empty_text)
    language = row.get("language")
    if language is not None:
        try:
            language = language_code(str(language), where)
        except UserError as exc:
            problems.add("unknown_language", str(exc).removeprefix(f"{where}: "))
    sentences = _sentences(row.get("sentences"), problems)
    duration = _optional_float(row, "duration", problems)
    if problems:
        return None, audio_path, problems
    return Sample(audio_path=audio_path, text=text, language=language, start=start, end=end, duration=duration,
                  sentences=sentences, source=f"{path}:{where}"), audio_path, problems


def _checked(row: ManifestRow, line: str | None = None) -> ManifestRow:
    """Flag a row whose bytes were not valid UTF-8 (the parser saw them as lone surrogates)."""
    if line is not None:
        bad = _UNDECODABLE.search(line)
        if bad is None:
            return row
        offset = len(line[:bad.start()].encode("utf-8", errors="surrogateescape"))
        problem = RowProblem("not_utf8", f"not valid UTF-8 (byte {offset} of the line)")
    elif _has_undecodable(row.raw):
        problem = RowProblem("not_utf8", "text is not valid UTF-8")
    else:
        return row
    return ManifestRow(row.index, row.where, row.line, row.format, row.raw, row.audio_path, None,
                       (problem,) + row.problems)


def iter_rows(path: str | Path, audio_dir: str | Path | None = None,
              allow_empty_text: bool = False) -> Iterator[ManifestRow]:
    """Every row of a manifest, good or bad, in file order.

    Raises ManifestError only when there are no rows to speak of: the file is missing or empty. A JSON
    list that does not parse as a whole yields one row with where="" and the line of the JSON error.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest not found", path)
    resolve = _Resolver(Path(audio_dir) if audio_dir else path.parent)
    content = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if not content.strip():
        raise ManifestError("manifest is empty", path)

    try:
        whole = json.loads(content)
    except json.JSONDecodeError as whole_error:
        whole = None
        if content.lstrip().startswith("["):
            problem = RowProblem("invalid_json", f"invalid JSON at line {whole_error.lineno}: {whole_error.msg}")
            yield ManifestRow(0, "", whole_error.lineno, "list", None, None, None, (problem,))
            return

    is_single_row = isinstance(whole, dict) and any(k in whole for k in AUDIO_KEYS)
    if isinstance(whole, dict) and whole and not is_single_row and all(isinstance(v, str) for v in whole.values()):
        for index, (audio, text) in enumerate(whole.items()):
            where, audio_path = f"entry '{audio}'", resolve(audio)
            problems, sample = (), None
            if not text.strip() and not allow_empty_text:
                problems = (RowProblem("empty_text", "empty text"),)
            else:
                sample = Sample(audio_path=audio_path, text=text.strip(), source=f"{path}:{audio}")
            yield _checked(ManifestRow(index, where, None, "dict", {audio: text}, audio_path, sample, problems))
        return
    if isinstance(whole, list):
        for index, row in enumerate(whole):
            sample, audio_path, problems = _parse_row(row, f"entry {index}", path, resolve, allow_empty_text)
            yield _checked(ManifestRow(index, f"entry {index}", None, "list", row, audio_path, sample, tuple(problems)))
        return

    # JSON lines. Split on "\n" only: str.splitlines() would also split inside a transcript holding U+2028.
    index = 0
    for number, line in enumerate(content.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems = (RowProblem("invalid_json", f"invalid JSON ({exc.msg})"),)
            yield _checked(ManifestRow(index, where, number, "lines", line, None, None, problems), line)
        else:
            sample, audio_path, problems = _parse_row(row, where, path, resolve, allow_empty_text)
            yield _checked(ManifestRow(index, where, number, "lines", row, audio_path, sample, tuple(problems)), line)
        index += 1


READ_KEPT = 4  # manifests a stage reads: train, dev, retain, and one more
_READ: dict[tuple, tuple[Sample, ...]] = {}  # manifests read in this process, by file state and options


def read_manifest(path: str | Path, audio_dir: str | Path | None = None, *,
                  allow_empty_text: bool = False) -> list[Sample]:
    """Read any supported manifest into Samples; raises ManifestError naming file and line.

    `allow_empty_text` admits rows whose text is empty as no-speech samples (`Sample.text == ""`),
    as training with timestamps wants them; otherwise such a row is an error. A file read before in
    this process, unchanged since, is not parsed again: the options' check reads each manifest before
    the stage that uses it, so a bad row is reported before any model loads.
    """
    try:
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, str(audio_dir), allow_empty_text)
    except OSError:
        key = None
    if key is not None and key in _READ:
        return list(_READ[key])
    samples = []
    for row in iter_rows(path, audio_dir, allow_empty_text):
        if row.problems:
            message = row.problems[0].message
            raise ManifestError(f"{row.where}: {message}" if row.where else message, path)
        samples.append(row.sample)
    if key is not None:
        while len(_READ) >= READ_KEPT:  # the last few only: a long-lived process must not keep them all
            del _READ[next(iter(_READ))]
        _READ[key] = tuple(samples)
    return samples


def check_audio_exists(samples: list[Sample], manifest: str | Path) -> None:
    """Fail fast, before any model is loaded, if rows point at audio that is not there."""
    missing = [s for s in samples if not s.audio_path.is_file()]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ManifestError(f"audio file not found: {first.audio_path} ({first.source.rsplit(':', 1)[-1]}){more}",
                            manifest)
