"""The checks behind `whisper-lora check`: every problem in a manifest, found before training starts.

Training skips a bad sample when it meets it, hours into a GPU run; this module finds all of them
up front. Each check turns rows into `Finding`s of a known `ProblemKind`; the stage (stages/check.py)
only orchestrates, prints and fixes.

Severities: an *error* makes a row unusable or harmful to train on (training would skip it, crash on
it, or learn from a label that does not match the audio); a *warning* is suspicious but trainable
(duplicates, conflicting transcripts, train/dev leakage, very short clips, a declared duration that
disagrees with the audio); *info* is worth knowing (no-speech rows under --timestamps).

Decisions worth knowing:
* Audio is judged by the loader training uses (`audio.load_audio`), so the checker accepts exactly
  what training accepts; on top of it, a header sample rate under 1 kHz is called implausible too.
* Clip length comes from the header first: a clip over --max-duration is reported without being
  decoded, so a two-hour recording costs one header read, not two hours of decoding.
* Leakage by text compares texts folded by `fold_text`: NFKC, case folded, punctuation, symbols and
  all whitespace removed. Simpler than `text.normalize` on purpose: its English normaliser costs
  ~1 ms a row, over a minute per 100k rows, for matches ("seven" = "7") that leakage rarely hinges on.
  Leakage by audio compares a hash of the decoded samples (the same sound copied under another name
  or re-encoded losslessly is found); with --no-audio it compares a hash of the files' bytes, and only
  for files whose sizes occur in both manifests (so most files are never read).
* Label lengths are those of `data.LabelBuilder.longest`, counted from batched tokenizer calls over
  unique texts.
"""
from __future__ import annotations

import functools
import hashlib
import os
import stat
import struct
import sys
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .audio import MAX_SAMPLE_RATE, load_audio
from .constants import MAX_TARGET_TOKENS, RAW_PCM_SUFFIXES, SAMPLE_RATE
from .errors import AudioError, UserError
from .manifest import ManifestRow, Sample, TimedText
from .tokens import segment_text

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}
MIN_SAMPLE_RATE = 1000  # Hz; no speech recording is sampled slower: such a header is corrupt
TOKENIZE_BATCH = 2048  # texts per tokenizer call: large enough to amortise the call, small enough for memory
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a file


@dataclass(frozen=True)
class ProblemKind:
    name: str  # stable identifier, used in the JSON report and the rejects file
    title: str  # what the table says
    severity: str


_KINDS = [
    # Rows that do not parse (from manifest.iter_rows).
    ProblemKind("invalid_json", "row is not valid JSON", ERROR),
    ProblemKind("not_utf8", "text is not valid UTF-8", ERROR),
    ProblemKind("not_object", "row is not a JSON object", ERROR),
    ProblemKind("no_audio_path", "row has no audio path", ERROR),
    ProblemKind("no_text", "row has no text field", ERROR),
    ProblemKind("bad_field", "field has the wrong type", ERROR),
    ProblemKind("bad_sentences", "malformed 'sentences'", ERROR),
    ProblemKind("unknown_language", "unknown language", ERROR),
    # Text and labels.
    ProblemKind("empty_text", "empty text", ERROR),
    ProblemKind("no_speech", "empty text: trained as a no-speech sample", INFO),
    ProblemKind("no_language", "no language for a multilingual model", ERROR),
    ProblemKind("label_too_long", f"label over Whisper's {MAX_TARGET_TOKENS} tokens", ERROR),
    # Audio.
    ProblemKind("missing_audio", "audio file missing", ERROR),
    ProblemKind("empty_audio", "audio empty (0 bytes or 0 samples)", ERROR),
    ProblemKind("undecodable_audio", "audio cannot be decoded", ERROR),
    ProblemKind("non_finite_audio", "audio has NaN/inf samples", ERROR),
    ProblemKind("bad_sample_rate", "implausible sample rate", ERROR),
    ProblemKind("bad_span", "impossible start/end time", ERROR),
    ProblemKind("too_long", "clip longer than --max-duration", ERROR),
    ProblemKind("too_short", "clip shorter than --min-duration", WARNING),
    ProblemKind("duration_mismatch", "declared duration disagrees with the audio", WARNING),
    # An error where timestamp labels are trained (their only use), a warning elsewhere: see check_text.
    ProblemKind("bad_timestamps", "'sentences' times out of order or outside the clip", ERROR),
    # Across rows.
    ProblemKind("duplicate", "duplicate row (same audio, span and text)", WARNING),
    ProblemKind("conflicting_text", "same audio and span, different text", WARNING),
    ProblemKind("leak_text", "text also in the dev manifest", WARNING),
    ProblemKind("leak_audio", "audio also in the dev manifest", WARNING),
]
KINDS = {kind.name: kind for kind in _KINDS}


@dataclass(frozen=True)
class Finding:
    """One problem of one row."""
    kind: str
    severity: str
    manifest: str  # the manifest's path as the user gave it
    where: str  # "line 12", "entry 3", "entry 'a.wav'"
    row: int  # ManifestRow.index: the row --fix keeps or rejects
    audio: str | None  # resolved audio path, when the row names one
    message: str

    @property
    def location(self) -> str:
        return f"{Path(self.manifest).name}:{self.where}"


def _printable(text: str) -> str:
    """Bytes that were not UTF-8 reach us as lone surrogates; they cannot be printed or written."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def finding(kind: str, manifest: str, row: ManifestRow, message: str, severity: str | None = None) -> Finding:
    where = row.where or (f"line {row.line}" if row.line else "file")
    audio = None if row.audio_path is None else _printable(str(row.audio_path))
    return Finding(kind, severity or KINDS[kind].severity, manifest, _printable(where), row.index, audio,
                   _printable(message))


# ---- audio ---------------------------------------------------------------------------------------

AudioTask = tuple[str, float | None, float | None]  # (path, start seconds, end seconds): one clip to probe


@dataclass(frozen=True)
class AudioFacts:
    """What probing one clip found (returned from worker processes, so small and picklable)."""
    size: int | None = None  # bytes of the file; None when it is missing
    file_seconds: float | None = None  # the whole file, from its header
    seconds: float | None = None  # the clip (span): decoded length, or the header's when not decoded
    decoded: bool = False
    digest: str | None = None  # hash of the decoded samples: the same sound under any file name
    problem: tuple[str, str] | None = None  # (kind, message) of the first problem that makes it unusable


def plausible_rate(rate: float) -> bool:
    return MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE


def _riff_sample_rate(path: Path) -> int | None:
    """The sample rate a WAV header claims, read by hand: decoders refuse absurd ones without saying why."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(head):
        chunk, size = head[offset:offset + 4], struct.unpack("<I", head[offset + 4:offset + 8])[0]
        if chunk == b"fmt " and offset + 16 <= len(head):
            return struct.unpack("<I", head[offset + 12:offset + 16])[0]
        offset += 8 + size + (size & 1)
    return None


def _header(path: Path) -> tuple[float | None, int, bool]:
    """(file seconds or None if unknown, sample rate, whether load_audio returns that rate unresampled)."""
    if path.suffix.lower() in RAW_PCM_SUFFIXES:
        return path.stat().st_size / 2 / SAMPLE_RATE, SAMPLE_RATE, True
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return (info.frames / info.samplerate if info.samplerate > 0 else 0.0), info.samplerate, True
    except (sf.LibsndfileError, RuntimeError):
        pass  # not a libsndfile format: FFmpeg decides, as in load_audio
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream in file", path)
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate or 0
            seconds = container.duration / 1_000_000 if container.duration else None
            return seconds, rate, False  # load_audio resamples FFmpeg input to 16 kHz while decoding
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise AudioError(f"cannot decode audio ({type(exc).__name__}: {exc})", path) from None


def _classify(exc: AudioError) -> tuple[str, str]:
    """load_audio's verdict as a problem kind; the path is left out of the message (the report has it)."""
    return exc.kind, exc.message.replace(f": '{exc.path}'", "") if exc.path else exc.message


def stat_audio(task: AudioTask) -> AudioFacts:
    """What needs no decoding, all that --no-audio checks: the file is there, not empty, the span possible."""
    path, start, end = task
    try:
        st = os.stat(path)
    except OSError:
        return AudioFacts(problem=("missing_audio", "audio file not found"))
    if not stat.S_ISREG(st.st_mode):
        return AudioFacts(problem=("missing_audio", "audio path is not a file"))
    if st.st_size == 0:
        return AudioFacts(size=0, problem=("empty_audio", "audio file is empty (0 bytes)"))
    if (start is not None and start < 0) or (end is not None and end < 0):
        return AudioFacts(st.st_size, problem=("bad_span", f"negative start/end time ({start}, {end} s)"))
    if start is not None and end is not None and end <= start:
        return AudioFacts(st.st_size, problem=("bad_span", f"end time {end} s is not after start time {start} s"))
    return AudioFacts(size=st.st_size)


def probe_audio(task: AudioTask, max_seconds: float) -> AudioFacts:
    """Everything about one clip that training would trip over; runs in a worker process."""
    facts = stat_audio(task)
    if facts.problem:
        return facts
    path, start, end = Path(task[0]), task[1], task[2]
    try:
        file_seconds, rate, native = _header(path)
    except AudioError as exc:
        claimed = _riff_sample_rate(path)
        if claimed is not None and not plausible_rate(claimed):
            return AudioFacts(facts.size, problem=("bad_sample_rate",
                                                   f"implausible sample rate {claimed} Hz in header"))
        return AudioFacts(facts.size, problem=_classify(exc))
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # a corrupt file must not stop 100k rows
        return AudioFacts(facts.size, problem=("undecodable_audio",
                                               f"cannot read header ({type(exc).__name__}: {exc})"))
    if not plausible_rate(rate):
        return AudioFacts(facts.size, problem=("bad_sample_rate", f"implausible sample rate {rate} Hz in header"))

    clip = None
    if file_seconds is not None:
        if start and start >= file_seconds:
            return AudioFacts(facts.size, file_seconds, problem=(
                "empty_audio", f"span starts at {start} s, at or after the end of the {file_seconds:.2f} s file"))
        clip = (file_seconds if end is None else min(end, file_seconds)) - (start or 0.0)
        if clip > max_seconds:  # decided from the header: a long recording is never decoded whole
            return AudioFacts(facts.size, file_seconds, clip)
    out_rate = rate if native else SAMPLE_RATE
    try:
        audio = load_audio(path, start, end, sample_rate=out_rate)
    except AudioError as exc:
        return AudioFacts(facts.size, file_seconds, clip, problem=_classify(exc))
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        return AudioFacts(facts.size, file_seconds, clip,
                          problem=("undecodable_audio", f"cannot decode audio ({type(exc).__name__}: {exc})"))
    digest = hashlib.blake2b(audio.tobytes(), digest_size=16).hexdigest()
    return AudioFacts(facts.size, file_seconds, len(audio) / out_rate, True, digest)


def probe_all(tasks: list[AudioTask], decode: bool, max_seconds: float, workers: int,
              progress: bool = True) -> list[AudioFacts]:
    """Probe every clip: in parallel processes when decoding, in this process for --no-audio."""
    from tqdm.auto import tqdm

    if not decode:  # one stat() per file: far cheaper than sending 100k tasks to workers
        return [stat_audio(task) for task in tasks]
    probe = functools.partial(probe_audio, max_seconds=max_seconds)
    bar = functools.partial(tqdm, total=len(tasks), desc="check audio", unit="clip", disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        return list(bar(map(probe, tasks)))
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    # fork: workers start in milliseconds instead of re-importing torch (~2 s each) as spawn would.
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))  # 100k clips -> ~1.6k chunks, not 100k messages
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
        return list(bar(pool.map(probe, tasks, chunksize=chunksize)))


def file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- labels --------------------------------------------------------------------------------------

def label_lengths(builder, samples: list[Sample]) -> list[int | UserError]:
    """`builder.longest(sample)` for every sample (or the UserError its prompt raises), in batches.

    One tokenizer call per row costs ~50 µs of Python overhead; unique texts in batches do not, and
    a fast tokenizer gives the same ids either way. The arithmetic mirrors LabelBuilder.build.
    """
    timestamps = builder.ever_timestamps
    pieces: list[list[str] | None] = []
    for sample in samples:
        if not sample.text.strip() and not sample.sentences:
            pieces.append(None)  # no-speech label: <|sot|><|nospeech|><|eot|>
        elif timestamps:
            language = sample.language or builder.default_language
            segments = sample.sentences or (sample,)
            pieces.append([segment_text(segment.text, language) for segment in segments])
        else:
            pieces.append([sample.text])
    unique = list(dict.fromkeys(text for texts in pieces if texts for text in texts))
    counts: dict[str, int] = {}
    # The Rust tokenizer itself, when there is one: the same ids as tokenizer(...) (a test compares them)
    # without transformers building a BatchEncoding, which costs as much again.
    backend = getattr(builder.tokenizer, "backend_tokenizer", None)
    for first in range(0, len(unique), TOKENIZE_BATCH):
        batch = unique[first:first + TOKENIZE_BATCH]
        if backend is not None:
            lengths = [len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
        else:
            lengths = list(map(len, builder.tokenizer(batch, add_special_tokens=False)["input_ids"]))
        counts.update(zip(batch, lengths))
    lengths: list[int | UserError] = []
    for sample, texts in zip(samples, pieces):
        if texts is None:
            lengths.append(3)
            continue
        try:
            prompt = builder.prompt(sample.language or builder.default_language, timestamps)
        except UserError as exc:
            lengths.append(exc)
            continue
        # Timestamp labels wrap each segment in two time tokens; every label ends with <|endoftext|>.
        lengths.append(len(prompt) + sum(counts[t] for t in texts) + (2 * len(texts) if timestamps else 0) + 1)
    return lengths


# ---- timestamps ----------------------------------------------------------------------------------

def sentence_problems(sentences: tuple[TimedText, ...], clip_seconds: float | None, tolerance: float) -> list[str]:
    """Why `sentences` cannot become timestamp tokens: negative, empty, out of order, past the clip."""
    problems = []
    previous_end = None
    for i, s in enumerate(sentences):
        if s.start < 0 or s.end < 0:
            problems.append(f"sentences[{i}] has a negative time ({s.start}-{s.end} s)")
        elif s.end <= s.start:
            problems.append(f"sentences[{i}] ends at {s.end} s, not after its start {s.start} s")
        elif previous_end is not None and s.start < previous_end:
            problems.append(f"sentences[{i}] starts at {s.start} s, before sentences[{i - 1}] ends ({previous_end} s)")
        elif clip_seconds is not None and s.end > clip_seconds + tolerance:
            problems.append(f"sentences[{i}] ends at {s.end} s, after the {clip_seconds:.2f} s clip")
        previous_end = s.end
    return problems


# ---- one manifest --------------------------------------------------------------------------------

@dataclass
class CheckedManifest:
    """A manifest's rows and everything found about them."""
    path: str  # as the user gave it
    role: str  # "train" or "dev"
    rows: list[ManifestRow]
    findings: list[Finding] = field(default_factory=list)
    facts: dict[int, AudioFacts] = field(default_factory=dict)  # by row index, rows with a Sample only
    digests: dict[int, str] = field(default_factory=dict)  # by row index: content hash for leakage

    @property
    def samples(self) -> list[tuple[ManifestRow, Sample]]:
        return [(row, row.sample) for row in self.rows if row.sample is not None]

    def add(self, kind: str, row: ManifestRow, message: str, severity: str | None = None) -> None:
        self.findings.append(finding(kind, self.path, row, message, severity))

    def error_rows(self) -> set[int]:
        return {f.row for f in self.findings if f.severity == ERROR}


@dataclass(frozen=True)
class CheckOptions:
    """What the checks need from CheckConfig, resolved (language code, worker count)."""
    decode: bool
    workers: int
    max_duration: float  # seconds
    min_duration: float  # seconds
    duration_tolerance: float  # seconds
    empty_text_ok: bool  # empty text is a no-speech sample (train --timestamps), not an error
    timestamp_labels: bool  # timestamp tokens are trained, so `sentences` must be right
    default_language: str | None
    progress: bool = True


def check_rows(checked: CheckedManifest) -> None:
    """Problems of the rows themselves: parse errors, types, languages, UTF-8."""
    for row in checked.rows:
        for problem in row.problems:
            checked.add(problem.kind, row, problem.message)


def check_audio(checked: CheckedManifest, options: CheckOptions) -> None:
    """Files, decoding, durations, spans and declared durations; one probe per distinct clip."""
    tasks: dict[AudioTask, list[ManifestRow]] = defaultdict(list)
    for row, sample in checked.samples:
        tasks[(str(sample.audio_path), sample.start, sample.end)].append(row)
    keys = list(tasks)
    for key, facts in zip(keys, probe_all(keys, options.decode, options.max_duration, options.workers,
                                          options.progress)):
        for row in tasks[key]:
            checked.facts[row.index] = facts
    for row, sample in checked.samples:
        facts = checked.facts[row.index]
        if facts.problem:
            checked.add(facts.problem[0], row, facts.problem[1])
            continue
        if facts.digest:
            checked.digests[row.index] = facts.digest
        seconds, what = clip_seconds(sample, facts)
        if seconds is None:
            continue
        if seconds > options.max_duration:
            checked.add("too_long", row, f"{seconds:.2f} s ({what}) is over --max-duration {options.max_duration:g} s")
        elif seconds < options.min_duration:
            checked.add("too_short", row, f"{seconds:.3f} s ({what}) is under --min-duration "
                                          f"{options.min_duration:g} s")
        if what != "declared" and sample.duration is not None \
                and abs(sample.duration - seconds) > options.duration_tolerance:
            checked.add("duration_mismatch", row, f"declared duration {sample.duration:g} s, audio is {seconds:.2f} s "
                                                  f"({what})")


def clip_seconds(sample: Sample, facts: AudioFacts | None) -> tuple[float | None, str]:
    """The clip's length and where it comes from: decoded, else the header, else (--no-audio) the row."""
    if facts is not None and facts.seconds is not None:
        return facts.seconds, "decoded" if facts.decoded else "from the header"
    if sample.start is not None and sample.end is not None:
        return sample.end - sample.start, "from start/end times"
    if sample.duration is not None:
        return sample.duration, "declared"
    return None, ""


def check_text(checked: CheckedManifest, options: CheckOptions, builder) -> None:
    """Empty text, label length with the model's tokenizer, and `sentences` timestamps."""
    pairs = checked.samples
    for (row, sample), length in zip(pairs, label_lengths(builder, [s for _, s in pairs])):
        if not sample.text:
            if not options.empty_text_ok:
                checked.add("empty_text", row, "empty text (with `train --timestamps` such rows are no-speech samples)")
            elif not sample.sentences:
                checked.add("no_speech", row, "empty text: a no-speech sample")
        if isinstance(length, UserError):
            kind = "no_language" if (sample.language or builder.default_language) is None else "unknown_language"
            checked.add(kind, row, str(length))
        elif length > MAX_TARGET_TOKENS:
            checked.add("label_too_long", row, f"label has {length} tokens (prompt included), over Whisper's "
                                               f"{MAX_TARGET_TOKENS}")
        if sample.sentences:
            clip, _ = clip_seconds(sample, checked.facts.get(row.index))
            problems = sentence_problems(sample.sentences, clip, options.duration_tolerance)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                checked.add("bad_timestamps", row, problems[0] + more,
                            severity=ERROR if options.timestamp_labels else WARNING)


def check_duplicates(checked: CheckedManifest) -> None:
    """Rows repeating a clip: the same text twice (duplicate) or different texts (conflict)."""
    by_clip: dict[tuple, list[tuple[ManifestRow, Sample]]] = defaultdict(list)
    for row, sample in checked.samples:  # str keys: hashing 100k Paths costs seconds
        by_clip[(str(sample.audio_path), sample.start, sample.end)].append((row, sample))
    for group in by_clip.values():
        if len(group) < 2:
            continue
        first_row, first = group[0]
        seen: dict[str, ManifestRow] = {first.text: first_row}
        for row, sample in group[1:]:
            if sample.text in seen:
                checked.add("duplicate", row, f"same audio, span and text as {seen[sample.text].where}")
            else:
                seen[sample.text] = row
                checked.add("conflicting_text", row, f"same audio and span as {first_row.where}, "
                                                     f"different text: {_clip(sample.text)!r} vs {_clip(first.text)!r}")


class _FoldTable(dict):
    """str.translate table filled on first sight of each character: punctuation (P), symbols (S),
    separators (Z) and controls/format characters (C) are removed, everything else is kept."""

    def __missing__(self, code: int) -> int | None:
        value = None if unicodedata.category(chr(code))[0] in "PSZC" else code
        self[code] = value
        return value


_FOLD_TABLE = _FoldTable()


def fold_text(text: str) -> str:
    """The key texts are compared by for leakage: "Hello, World!" and "hello world" are the same."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_FOLD_TABLE)


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def check_leakage(train: CheckedManifest, dev: CheckedManifest, options: CheckOptions) -> None:
    """Train rows whose text or audio is also in dev: they make dev scores look better than they are."""
    dev_texts: dict[str, ManifestRow] = {}
    for row, sample in dev.samples:
        if fold_text(sample.text):
            dev_texts.setdefault(fold_text(sample.text), row)
    for row, sample in train.samples:
        other = dev_texts.get(fold_text(sample.text)) if sample.text else None
        if other is not None:
            train.add("leak_text", row, f"text {_clip(sample.text)!r} is also in {Path(dev.path).name}:{other.where} "
                                        "(compared without case, punctuation and spaces)")

    if not options.decode:
        _byte_digests(train, dev)
    dev_audio: dict[str, ManifestRow] = {}
    for index, digest in dev.digests.items():
        dev_audio.setdefault(digest, dev.rows[index])
    how = "same decoded samples" if options.decode else "same file bytes"
    for index, digest in train.digests.items():
        if digest in dev_audio:
            other = dev_audio[digest]
            train.add("leak_audio", train.rows[index],
                      f"{how} as {Path(dev.path).name}:{other.where} ({other.audio_path})")


def _byte_digests(train: CheckedManifest, dev: CheckedManifest) -> None:
    """--no-audio: hash the bytes of files whose size occurs in both manifests (the only candidates)."""
    def sizes(checked: CheckedManifest) -> dict[int, int]:
        return {i: f.size for i, f in checked.facts.items() if f.size and not f.problem}

    train_sizes, dev_sizes = sizes(train), sizes(dev)
    shared = set(train_sizes.values()) & set(dev_sizes.values())
    cache: dict[str, str] = {}
    for checked, by_row in ((train, train_sizes), (dev, dev_sizes)):
        for index, size in by_row.items():
            if size in shared:
                path = str(checked.rows[index].audio_path)
                if path not in cache:
                    cache[path] = file_digest(path)
                checked.digests[index] = cache[path]


def sort_key(kind_name: str, severity: str, count: int) -> tuple:
    return SEVERITY_ORDER[severity], -count, kind_name
