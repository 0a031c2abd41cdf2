"""Transcribing a corpus on Ray Data: inputs to rows, one transcriber actor per worker, shards that resume.

The job is Ray Data's batch-inference shape (read -> `map_batches` with an actor class -> write): each
actor loads the model pool and batcher once (`TranscriptionService`, as the server does) and transcribes
the rows of a call on threads, so the batcher decodes the windows of several files together. Ray Data
restarts a lost actor and retries its rows; write tasks name their files deterministically, so a retried
write replaces its file instead of adding rows twice. A re-run reads the shards already in the output
folder and skips every (path, model) row they hold.

Nothing here imports Ray: the stage (`stages/transcribe.py`) does, only with `--ray`.
"""
from __future__ import annotations

import csv
import glob as globbing
import io
import json
import os
import re
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .audio import audio_duration
from .constants import AUDIO_SUFFIXES, CHUNK_SECONDS
from .decode import DecodeOptions, join_text
from .errors import UserError
from .manifest import AUDIO_KEYS, language_code
from .writers import transcript_dict

MANIFEST_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
SHARD_FORMATS = ("jsonl", "parquet")
SHARD_PREFIX = "part-"  # every shard this job writes; other files in the folder are left alone
INCOMPLETE_SUFFIX = ".incomplete"  # a shard a crash cut short, set aside by the next run
BASE = "base"  # the `model` of rows that name none and of a job without --model: the pool's base model


def is_uri(value: str) -> bool:
    return "://" in value


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, file://, s3://, gs://, hdfs:// ... URI."""
    from pyarrow import fs

    if not is_uri(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)


def _join(base: str, relative: str) -> str:
    """A manifest's relative audio path, made absolute against the manifest's own folder (local or URI)."""
    if is_uri(relative) or os.path.isabs(relative):
        return relative
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{PurePosixPath(rest).parent / relative}"
    return str(Path(base).resolve().parent / relative)


def _read_text(location: str) -> str:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot read it: {exc}", location) from None


def _manifest_rows(location: str) -> list[dict]:
    """Rows of a JSON-lines or CSV/TSV manifest: the audio path (first of AUDIO_KEYS), and `model` and
    `language` when the row has them. Unlabelled manifests are fine: this job writes the text."""
    text = _read_text(location)
    suffix = PurePosixPath(location).suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"line {number} is not JSON ({exc.msg})", location) from None
    rows = []
    for number, record in enumerate(records, start=1):
        audio = next((record[k] for k in AUDIO_KEYS if isinstance(record, dict) and record.get(k)), None)
        if not isinstance(audio, str):
            raise UserError(f"row {number} has no audio path (expected one of {', '.join(AUDIO_KEYS)})", location)
        row = {"path": _join(location, audio)}
        if record.get("model"):
            row["model"] = str(record["model"])
        if record.get("language"):
            row["language"] = language_code(str(record["language"]), f"{location}: row {number}")
        rows.append(row)
    return rows


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as the shell reads it (`*` and `?` within a folder, `**/` across any number of them), for
    paths listed from object storage, where fnmatch's `*` would cross folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _listed(location: str, pattern: str | None = None) -> list[str]:
    """Audio files under a folder (recursively), or matching a glob, on any pyarrow filesystem; URIs come
    back with the location's own host and query (an HDFS name node, a MinIO endpoint_override)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot list it: {exc}", location) from None
    matcher = glob_regex(pattern) if pattern else None
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and PurePosixPath(i.path).suffix.lower() in AUDIO_SUFFIXES
                   and (matcher is None or matcher.match(i.path)))
    if not is_uri(location):
        return found
    base, _, query = location.partition("?")
    root = path.rstrip("/")
    return [f"{base.rstrip('/')}{p[len(root):]}" + (f"?{query}" if query else "") for p in found]


def list_rows(inputs: list[str], model: str | None = None, language: str | None = None) -> list[dict]:
    """The job's rows, {path, model[, language]}, from files, folders, globs, list files and manifests,
    local or URIs; a (path, model) pair named twice is transcribed once."""
    rows: list[dict] = []
    for item in inputs:
        suffix = PurePosixPath(item).suffix.lower()
        if any(c in item for c in "*?["):
            if is_uri(item):
                scheme, rest = item.split("://", 1)
                root = rest.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                rows += [{"path": p} for p in _listed(f"{scheme}://{root}", pattern=rest)]
            else:
                rows += [{"path": str(Path(p).resolve())} for p in sorted(globbing.glob(item, recursive=True))
                         if Path(p).suffix.lower() in AUDIO_SUFFIXES]
        elif suffix in MANIFEST_SUFFIXES:
            rows += _manifest_rows(item)
        elif suffix in LIST_SUFFIXES:
            lines = [ln.strip() for ln in _read_text(item).splitlines()]
            rows += [{"path": _join(item, ln)} for ln in lines if ln and not ln.startswith("#")]
        elif not is_uri(item) and Path(item).is_dir():
            rows += [{"path": p} for p in _listed(item)]
        elif is_uri(item) and not suffix:
            rows += [{"path": p} for p in _listed(item)]
        else:
            rows.append({"path": item if is_uri(item) else str(Path(item).resolve())})
    for row in rows:
        row.setdefault("model", model or BASE)
        row.setdefault("language", language)
    unique = list({(r["path"], r["model"]): r for r in rows}.values())
    if not unique:
        raise UserError(f"no audio files found in {', '.join(inputs)}")
    return unique


# ---- the shards ------------------------------------------------------------------------------------------

def shard_schema(words: bool):
    """One Arrow schema for every shard, so a block of failures and a block of transcripts agree (pyarrow
    would infer list<null> for the first) and Parquet readers see one table."""
    import pyarrow as pa

    word = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("word", pa.string()),
                      ("probability", pa.float64())])
    segment = [("id", pa.int32()), ("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
               ("avg_logprob", pa.float64()), ("no_speech_prob", pa.float64()),
               ("compression_ratio", pa.float64()), ("temperature", pa.float64())]
    if words:
        segment.append(("words", pa.list_(word)))
    return pa.schema([
        ("path", pa.string()), ("model", pa.string()), ("text", pa.string()), ("language", pa.string()),
        ("language_probability", pa.float64()), ("duration", pa.float64()),
        ("avg_logprob", pa.float64()),  # duration-weighted over the segments: what pseudo-labelling filters on
        ("no_speech_prob", pa.float64()),  # the highest of any segment
        ("segments", pa.list_(pa.struct(segment))), ("error", pa.string()), ("worker", pa.string()),
    ])


def shard_files(out_dir: str, prefix: str = SHARD_PREFIX) -> list[tuple[str, str]]:
    """(pyarrow path, format) of every shard in an output folder (local or URI) whose name starts with
    `prefix` (one run's: SHARD_PREFIX + its id); none when the folder is new."""
    from pyarrow import fs as pafs

    fs, root = filesystem(out_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        name = PurePosixPath(info.path).name
        if info.type == pafs.FileType.File and name.startswith(prefix):
            fmt = "jsonl" if name.endswith(".jsonl") else "parquet" if name.endswith(".parquet") else None
            if fmt:
                found.append((info.path, fmt))
    return sorted(found)


def read_shards(out_dir: str, set_aside: bool = True, prefix: str = SHARD_PREFIX) -> tuple[list[dict], list[str]]:
    """Every row the shards hold (those named with `prefix`), and notes on shards a crash cut short (set
    aside as *.incomplete, so the rows they held are transcribed again and no reader trips on them)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(out_dir)
    rows, notes = [], []
    for path, fmt in shard_files(out_dir, prefix):
        try:
            if fmt == "parquet":
                with fs.open_input_file(path) as f:
                    rows += pq.read_table(f).to_pylist()
            else:
                with fs.open_input_stream(path) as f:
                    lines = f.read().decode("utf-8").splitlines()
                parsed = [json.loads(line) for line in lines if line.strip()]
                rows += parsed
        except Exception as exc:  # noqa: BLE001  (a truncated shard: pyarrow and json raise many kinds)
            notes.append(f"{path}: unreadable ({type(exc).__name__}), set aside; its rows run again")
            if set_aside:
                fs.move(path, path + INCOMPLETE_SUFFIX)
    return rows, notes


def pending_rows(rows: list[dict], done: list[dict]) -> list[dict]:
    """The rows no shard holds yet: a re-run transcribes only these."""
    written = {(r.get("path"), r.get("model")) for r in done}
    return [r for r in rows if (r["path"], r["model"]) not in written]


@dataclass
class Summary:
    files: int = 0
    failures: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped: int = 0  # written by an earlier run
    workers: dict[str, int] = field(default_factory=dict)  # rows per worker (node:pid)

    @property
    def audio_hours_per_wall_hour(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        return (f"{self.files} files ({self.skipped} already written), {self.audio_seconds / 3600:.2f} h of audio "
                f"in {self.wall_seconds:.0f} s: {self.audio_hours_per_wall_hour:.1f} audio-hours per wall-hour, "
                f"{self.failures} failed, on {len(self.workers)} workers")


def summarise(rows: list[dict], wall_seconds: float, skipped: int) -> Summary:
    summary = Summary(files=len(rows), wall_seconds=wall_seconds, skipped=skipped)
    for row in rows:
        summary.failures += bool(row.get("error"))
        summary.audio_seconds += row.get("duration") or 0.0
        summary.workers[row.get("worker") or "?"] = summary.workers.get(row.get("worker") or "?", 0) + 1
    return summary


# ---- the actor -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TranscriberSpec:
    """What every actor needs to build its model pool: picklable, sent once per actor."""
    model: str | None
    adapters: str | None
    backend: str
    compute_type: str
    device: str
    dtype: str
    options: DecodeOptions
    vad: bool
    max_adapters: int = 8
    threads: int = 1  # torch compute threads: the CPUs Ray gives the actor


class Transcriber:
    """Ray Data's callable class: loaded once per actor, called with a batch of rows, returns a table."""

    def __init__(self, spec: TranscriberSpec):
        import torch

        from .serve.service import ModelPool, TranscriptionService

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.pool = ModelPool(spec.model, spec.adapters, spec.max_adapters, spec.backend, spec.compute_type,
                              None if spec.device == "auto" else spec.device, None if spec.dtype == "auto" else spec.dtype)
        # max_wait: rows of a call arrive together, so the batcher need not wait for stragglers
        self.service = TranscriptionService(self.pool, max_wait=0.05, max_queue=1024)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        try:  # the Ray node too: two nodes of one test machine share a host name
            import ray
        except ImportError:  # outside Ray: the host and process name it
            ray = None
        # (asked outside a Ray session, the runtime context starts a whole local Ray instance: 8 s, and its
        # daemons then slowed this process's decoding by ~15%)
        if ray is not None and ray.is_initialized():
            self.worker = f"{ray.get_runtime_context().get_node_id()[:8]}:{self.worker}"
        self.schema = shard_schema(spec.options.word_timestamps)

    def __call__(self, batch: "pyarrow.Table") -> "pyarrow.Table":  # noqa: F821
        import pyarrow as pa

        rows = batch.to_pylist()
        results: list[dict | None] = [None] * len(rows)
        local: dict[int, str] = {}
        clips: dict[tuple, list[int]] = {}  # (model, language) -> rows of at most 30 s
        whole: list[int] = []  # longer files, or any file with --vad
        try:
            for i, row in enumerate(rows):
                try:
                    local[i] = fetch(row["path"])
                    short = not self.spec.vad and audio_duration(local[i]) <= CHUNK_SECONDS
                except Exception as exc:  # noqa: BLE001  (a row's error, never the job's)
                    results[i] = self.failed(row, exc)
                    continue
                (clips.setdefault((row["model"], row.get("language") or None), []) if short else whole).append(i)
            # Clips as `transcribe` decodes a folder of them: batched. Long files on threads, each through
            # the service, whose batcher decodes their windows together.
            for (model, language), members in clips.items():
                self.transcribe_clips(rows, local, members, model, language, results)
            with ThreadPoolExecutor(max_workers=max(1, len(whole))) as pool:
                for i, result in zip(whole, pool.map(lambda i: self.transcribe_file(rows[i], local[i]), whole)):
                    results[i] = result
        finally:
            for i, path in local.items():
                if path not in (rows[i]["path"], rows[i]["path"].removeprefix("file://")):
                    os.unlink(path)
        return pa.Table.from_pylist(results, schema=self.schema)

    def transcribe_clips(self, rows, local, members, model, language, results) -> None:
        from .audio import load_audio

        audios, kept = [], []
        for i in members:
            try:
                audios.append(load_audio(local[i]))
                kept.append(i)
            except Exception as exc:  # noqa: BLE001
                results[i] = self.failed(rows[i], exc)
        if not kept:
            return
        try:
            decoded = self.service.transcribe_clips(audios, None if model == BASE else model, language,
                                                    self.spec.options)
        except Exception as exc:  # noqa: BLE001  (an unknown model, a language it lacks: every row of it)
            for i in kept:
                results[i] = self.failed(rows[i], exc)
            return
        for i, (segments, info) in zip(kept, decoded):
            results[i] = self.transcribed(rows[i], segments, info)

    def transcribe_file(self, row: dict, local: str) -> dict:
        try:
            model = row["model"]
            segments, info = self.service.transcribe(local, None if model == BASE else model,
                                                     row.get("language") or None, self.spec.options, vad=self.spec.vad)
            return self.transcribed(row, list(segments), info)
        except Exception as exc:  # noqa: BLE001
            return self.failed(row, exc)

    def failed(self, row: dict, exc: Exception) -> dict:
        path = row["path"]
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return {"path": path, "model": row["model"], "worker": self.worker, "segments": [],
                "error": message if path in message else f"{path}: {message}"}

    def transcribed(self, row: dict, segments: list, info) -> dict:
        """`transcribe --output-format json`'s object, plus the row and what pseudo-labelling filters on (the
        shard schema keeps its columns and drops the rest: tokens, seek)."""
        spoken = sum(s.end - s.start for s in segments) or 1.0
        return {
            **transcript_dict(segments, info, join_text(segments, info.language)),
            "path": row["path"], "model": row["model"], "worker": self.worker, "error": None,
            "avg_logprob": (sum((s.avg_logprob or 0.0) * (s.end - s.start) for s in segments) / spoken
                            if segments else None),
            "no_speech_prob": max((s.no_speech_prob or 0.0 for s in segments), default=None),
        }


def fetch(path: str) -> str:
    """A local file for `path`: itself, or a URI or a named pipe copied to a temporary file (the decoder
    reads long files block by block, seeking, from disk, so a remote hour of audio never sits in memory
    whole)."""
    given = path[len("file://"):] if path.startswith("file://") else path
    if not is_uri(given):
        if not Path(given).exists() or Path(given).is_file():
            return given  # (a missing file: the decoder names it)
        source = open(given, "rb")  # a named pipe or a device: read as a stream
    else:
        fs, inner = filesystem(given)
        source = fs.open_input_stream(inner)
    handle, copy = tempfile.mkstemp(suffix=PurePosixPath(given).suffix, prefix="whisper-lora-")
    try:
        with os.fdopen(handle, "wb") as out, source:
            while chunk := source.read(1 << 22):
                out.write(chunk)
    except BaseException:
        os.unlink(copy)
        raise
    return copy
