"""Dataset layouts users already have -> `Sample` records, and `Sample`s -> a JSON-lines manifest.

Nobody starts with a manifest: they have a Common Voice release, AISHELL-1, a Hugging Face dataset,
a folder of clips with transcripts beside them, or long recordings with subtitles. One reader per
layout turns it into Samples split by split; `write_manifest` writes the project's JSON-lines format,
which `manifest.read_manifest` reads back unchanged.

Rows that cannot be used (a clip that is missing, audio without a transcript, a subtitle cue that
overlaps another) are *skipped and listed*, never silently dropped: one bad row in a million must not
stop a conversion, and the user must still be able to see every one. A file that cannot be read at
all (a TSV without its `sentence` column, a subtitle file whose timestamps make no sense) is a
`ManifestError`: nothing converted from it could be trusted.
"""
from __future__ import annotations

import csv
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .audio import audio_duration
from .constants import AUDIO_SUFFIXES
from .errors import AudioError, ManifestError, UserError
from .manifest import Sample, TimedText, language_code, read_manifest

SUBTITLE_SUFFIXES = (".srt", ".vtt")  # tried in this order when a recording has both
MANIFEST_SUFFIXES = (".json", ".jsonl")
DEFAULT_SPLIT = "train"  # the one split of sources that have none
KNOWN_SPLITS = ("train", "dev", "test", "validation", "valid", "eval")  # a manifest named so keeps its name

COMMONVOICE_SPLITS = ("train", "dev", "test")  # converted by default; validated/other/invalidated on request
COMMONVOICE_COLUMNS = ("path", "sentence")  # the columns a TSV cannot do without
COMMONVOICE_DURATIONS = "clip_durations.tsv"  # newer releases: clip -> duration[ms], saves opening every MP3
AISHELL_SPLITS = ("train", "dev", "test")
AISHELL_LANGUAGE = "zh"
HF_TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript")  # tried in order when --text-column is default
HF_LANGUAGE_COLUMNS = ("language", "locale")  # per-row language when --language is not given
OVERLAP_TOLERANCE = 0.1  # seconds; subtitle editors round cue times, a 0.1 s overlap is not a broken file
ROUND = 3  # decimals kept for times in seconds (milliseconds, as subtitles have)

# Scripts written without spaces between words: a space is never put next to one of these when
# words or cues are joined (Han, kana, Bopomofo, CJK punctuation and full-width forms, Thai, Lao,
# Tibetan, Myanmar, Khmer). Hangul is not here: Korean puts spaces between words.
_NO_SPACE_CHAR = re.compile("[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fff\u3000-\u312f"
                            "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]")
_MARKUP = re.compile(r"<[^>\n]*>|\{\\[^}\n]*\}")  # <i>, </font>, <c.yellow>, <v Bob>, {\an8}
_TIMESTAMP = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{1,2})[,.](\d{1,3})")  # [HH:]MM:SS,mmm (SRT) or .mmm (VTT)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class Skipped:
    """A row that was not converted, and why; written to prepare_skipped.jsonl."""

    split: str
    where: str  # "SOURCE/train.tsv:12", "SOURCE/talk.srt: cue 7 (line 29)", a file path
    reason: str


@dataclass
class Converted:
    """What a reader found: Samples per split, in source order, and every row it had to skip."""

    splits: dict[str, list[Sample]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def duration(self, split: str, where: str, audio: Path) -> float | None:
        """The clip's length in seconds, or None after recording why it cannot be read."""
        try:
            return round(audio_duration(audio), ROUND)
        except AudioError as exc:
            self.skipped.append(Skipped(split, where, str(exc)))
            return None


# ---- shared helpers ---------------------------------------------------------------------------------

def join_words(parts: Iterable[str]) -> str:
    """Join words, lines or cues with a space, except next to a character of a script without spaces.

    AISHELL's "而 对 楼市" becomes "而对楼市", "苹果 iphone six" becomes "苹果iphone six", and English
    subtitle lines keep their spaces.
    """
    out = ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if out and not (_NO_SPACE_CHAR.match(out[-1]) or _NO_SPACE_CHAR.match(part[0])):
            out += " "
        out += part
    return out


def locale_language(locale: str, where: str) -> str:
    """Whisper's code for a dataset locale: 'zh-CN' -> 'zh', 'pt_BR' -> 'pt', 'mr' -> 'mr'.

    Common Voice names its locales with region suffixes that Whisper does not have; the base language
    is what the language token means. Raises UserError naming `where` for a language Whisper lacks.
    """
    try:
        return language_code(locale, where)
    except UserError:
        base = re.split(r"[-_]", locale.strip(), maxsplit=1)[0]
        try:
            return language_code(base, where)
        except UserError:
            raise UserError(f"locale {locale!r} is not a language Whisper knows; pass --language to choose "
                            "the language token", where) from None


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _sidecar(audio: Path, suffixes: Iterable[str]) -> Path | None:
    return next((audio.with_suffix(s) for s in suffixes if audio.with_suffix(s).is_file()), None)


# ---- the JSON-lines manifest --------------------------------------------------------------------------

def sample_to_row(sample: Sample, base: Path) -> dict:
    """One manifest row; audio paths inside `base` are written relative to it, others absolute.

    Relative inside the output folder, so the folder and the audio extracted into it can move
    together; absolute outside it, because a "../../corpus/clips" path breaks as soon as either
    folder moves.
    """
    audio_path = Path(sample.audio_path).resolve()
    try:
        written = audio_path.relative_to(base.resolve()).as_posix()
    except ValueError:
        written = str(audio_path)
    audio: dict = {"path": written}
    if sample.start is not None:
        audio["start_time"] = sample.start
    if sample.end is not None:
        audio["end_time"] = sample.end
    row: dict = {"audio": audio, "sentence": sample.text}
    if sample.language is not None:
        row["language"] = sample.language
    if sample.duration is not None:
        row["duration"] = sample.duration
    if sample.sentences:
        row["sentences"] = [{"start": s.start, "end": s.end, "text": s.text} for s in sample.sentences]
    return row


def write_manifest(samples: Iterable[Sample], path: str | Path) -> int:
    """Write Samples as JSON lines (the format `read_manifest` reads back); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample_to_row(sample, path.parent), ensure_ascii=False) + "\n")
            count += 1
    return count


# ---- layout detection -------------------------------------------------------------------------------

def _is_hf_dataset_dir(path: Path) -> bool:
    # What Dataset.save_to_disk / DatasetDict.save_to_disk write.
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                     and (path / "dataset_info.json").is_file())


def _aishell_root(path: Path) -> Path:
    """AISHELL-1 unpacks to data_aishell/{wav,transcript}; accept the folder above it too."""
    return path / "data_aishell" if (path / "data_aishell" / "wav").is_dir() else path


def looks_like_hub_id(source: str) -> bool:
    return not Path(source).exists() and bool(_HUB_ID.fullmatch(source))


def detect_format(path: str | Path) -> str:
    """Recognise a source layout from its files: commonvoice, aishell, hf, folder, subtitles or manifest."""
    source = str(path)
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest"
        raise UserError(f"cannot tell what this file is; a source file must be a manifest "
                        f"({', '.join(MANIFEST_SUFFIXES)}), otherwise pass a folder", path)
    if not path.exists():
        if looks_like_hub_id(source):
            return "hf"
        raise UserError("source not found (not a file, a folder or a Hugging Face hub id)", path)
    if _is_hf_dataset_dir(path):
        return "hf"
    if (path / "clips").is_dir() and any((path / f"{s}.tsv").is_file() for s in COMMONVOICE_SPLITS + ("validated",)):
        return "commonvoice"
    root = _aishell_root(path)
    if (root / "wav").is_dir() and (root / "transcript").is_dir():
        return "aishell"
    audio = _audio_files(path)
    with_text = sum(1 for a in audio if a.with_suffix(".txt").is_file())
    with_subtitles = sum(1 for a in audio if _sidecar(a, SUBTITLE_SUFFIXES))
    if with_text and with_subtitles:
        raise UserError(f"holds audio with .txt transcripts ({with_text}) and with subtitles ({with_subtitles}); "
                        "pass --format folder or --format subtitles", path)
    if with_subtitles:
        return "subtitles"
    if with_text:
        return "folder"
    raise UserError(f"cannot recognise the layout ({len(audio)} audio files, none with a .txt, .srt or .vtt of the "
                    "same name beside it; no Common Voice TSVs, AISHELL wav/ + transcript/, or saved Hugging Face "
                    "dataset); pass --format", path)


# ---- Common Voice -----------------------------------------------------------------------------------

def _commonvoice_durations(root: Path) -> dict[str, float]:
    table = root / COMMONVOICE_DURATIONS
    if not table.is_file():
        return {}
    durations = {}
    with table.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            try:
                durations[row[0]] = round(float(row[1]) / 1000, ROUND)  # milliseconds in the file
            except (IndexError, ValueError):
                continue  # the header, or a damaged line: that clip's header is read instead
    return durations


def _tsv_names(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("*.tsv") if p.name != COMMONVOICE_DURATIONS)


def _commonvoice_clip(clips: Path, name: str) -> Path | None:
    clip = clips / name
    if clip.is_file():
        return clip
    # The earliest releases wrote the path column without its extension.
    return clips / f"{name}.mp3" if (clips / f"{name}.mp3").is_file() else None


def read_commonvoice(root: str | Path, splits: Iterable[str] = (), language: str | None = None) -> Converted:
    """A Common Voice release folder (clips/*.mp3 + SPLIT.tsv) -> one split per TSV.

    Without `splits`, train/dev/test (those that exist). The language comes from the `locale` column
    unless `language` is given. A row whose clip is missing or unreadable is skipped.
    """
    root = Path(root)
    splits = list(splits)
    if not splits:
        splits = [s for s in COMMONVOICE_SPLITS if (root / f"{s}.tsv").is_file()]
        if not splits:
            raise UserError(f"no train.tsv, dev.tsv or test.tsv (found: {', '.join(_tsv_names(root)) or 'none'}); "
                            "pass --splits", root)
    for split in splits:
        if not (root / f"{split}.tsv").is_file():
            raise UserError(f"split {split!r} not found: no {split}.tsv (available: {', '.join(_tsv_names(root))})",
                            root)
    durations = _commonvoice_durations(root)
    locales: dict[str, str] = {}
    result = Converted()
    for split in splits:
        tsv = root / f"{split}.tsv"
        samples = result.splits.setdefault(split, [])
        # QUOTE_NONE: sentences contain quotes ("It's", '"Yes," she said') that are text, not CSV quoting.
        with tsv.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            columns = reader.fieldnames or []
            for column in COMMONVOICE_COLUMNS:
                if column not in columns:
                    raise ManifestError(f"missing column '{column}' (columns: {', '.join(columns) or 'none'})", tsv)
            for row in reader:
                where = f"{tsv}:{reader.line_num}"
                name, sentence = row.get("path"), row.get("sentence")
                if name is None or sentence is None or None in row:
                    result.skipped.append(Skipped(split, where, f"row does not have the {len(columns)} columns "
                                                                "of the header"))
                    continue
                if not sentence.strip():
                    result.skipped.append(Skipped(split, where, "empty sentence"))
                    continue
                clip = _commonvoice_clip(root / "clips", name)
                if clip is None:
                    result.skipped.append(Skipped(split, where, f"clip not found: clips/{name}"))
                    continue
                duration = durations.get(clip.name)
                if duration is None and (duration := result.duration(split, where, clip)) is None:
                    continue
                row_language = language
                locale = (row.get("locale") or "").strip()
                if row_language is None and locale:
                    if locale not in locales:
                        locales[locale] = locale_language(locale, where)
                    row_language = locales[locale]
                samples.append(Sample(audio_path=clip.resolve(), text=sentence.strip(), language=row_language,
                                      duration=duration, source=where))
    return result


# ---- AISHELL-1 --------------------------------------------------------------------------------------

def _aishell_transcript(root: Path, transcript: str | Path | None) -> Path:
    if transcript is not None:
        if not Path(transcript).is_file():
            raise UserError("transcript file not found", transcript)
        return Path(transcript)
    candidates = sorted((root / "transcript").glob("*.txt"))
    preferred = [c for c in candidates if c.name.startswith("aishell_transcript")]
    if not candidates:
        raise UserError("no transcript/*.txt (AISHELL-1's aishell_transcript_v0.8.txt); pass --transcript", root)
    return (preferred or candidates)[0]


def read_aishell(root: str | Path, splits: Iterable[str] = (), transcript: str | Path | None = None,
                 language: str | None = None) -> Converted:
    """AISHELL-1 (wav/SPLIT/SPEAKER/UTT.wav + one transcript file) -> train/dev/test.

    Transcripts are words separated by spaces; the spaces are removed (Chinese is written without
    them) except between two Latin-script words. Utterances without a transcript are skipped.
    """
    root = _aishell_root(Path(root))
    wav = root / "wav"
    splits = list(splits) or [s for s in AISHELL_SPLITS if (wav / s).is_dir()]
    if not splits:
        if any(wav.glob("*.tar.gz")):
            raise UserError("holds only per-speaker .tar.gz archives; extract them first: "
                            "cd wav && for f in *.tar.gz; do tar -xzf \"$f\"; done", wav)
        raise UserError("no wav/train, wav/dev or wav/test folder", root)
    for split in splits:
        if not (wav / split).is_dir():
            raise UserError(f"split {split!r} not found: no wav/{split} folder", root)

    transcript_path = _aishell_transcript(root, transcript)
    texts: dict[str, str] = {}
    with transcript_path.open(encoding="utf-8") as f:
        for line in f:
            utt, *words = line.split()
            if words:
                texts[utt] = join_words(words)

    result = Converted()
    for split in splits:
        samples = result.splits.setdefault(split, [])
        files = sorted((wav / split).rglob("*.wav"))
        if not files and any((wav / split).rglob("*.tar.gz")):
            raise UserError("holds only .tar.gz archives; extract them first (tar -xzf FILE in that folder)",
                            wav / split)
        for audio in files:
            text = texts.get(audio.stem)
            if text is None:
                result.skipped.append(Skipped(split, str(audio), f"no transcript for {audio.stem} in "
                                                                 f"{transcript_path.name}"))
                continue
            if (duration := result.duration(split, str(audio), audio)) is None:
                continue
            samples.append(Sample(audio_path=audio.resolve(), text=text, language=language or AISHELL_LANGUAGE,
                                  duration=duration, source=str(audio)))
    return result


# ---- Hugging Face datasets --------------------------------------------------------------------------

def _sniff_suffix(data: bytes) -> str | None:
    """The container of encoded audio bytes, from its magic number."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:4] == b"OggS":
        return ".ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return ".mp3"
    if data[4:8] == b"ftyp":
        return ".m4a"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm"
    return None


def _load_hf(source: str, splits: list[str]):
    """A DatasetDict-like {split: Dataset} from a save_to_disk folder or the hub."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the datasets package: "
                        "pip install 'whisper-lora[hf]'", source) from None
    if Path(source).exists():
        try:
            loaded = datasets.load_from_disk(source)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"not a dataset written by save_to_disk ({exc})", source) from None
        if isinstance(loaded, datasets.Dataset):
            return {str(loaded.split) if loaded.split else DEFAULT_SPLIT: loaded}
        return dict(loaded)
    try:
        if splits:
            return {split: datasets.load_dataset(source, split=split) for split in splits}
        return dict(datasets.load_dataset(source))
    except Exception as exc:  # noqa: BLE001
        # The hub fails in many ways (offline, not found, gated, needs a config name, needs login);
        # all are for the user to fix, so each becomes one line rather than a traceback.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"cannot load this Hugging Face dataset: no such local folder, and the hub said "
                        f"{type(exc).__name__}: {message}", source) from None


def _hf_text_column(columns: list[str], text_column: str, where: str) -> str:
    candidates = HF_TEXT_COLUMNS if text_column == HF_TEXT_COLUMNS[0] else (text_column,)
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise UserError(f"no text column {' / '.join(repr(c) for c in candidates)} (columns: {', '.join(columns)}); "
                        "pass --text-column", where)
    return found


def _write_hf_audio(value: object, source_dir: Path | None, target: Path) -> Path:
    """One example's audio as a file the project's loader reads; raises ValueError with the reason."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict):
        raise ValueError(f"audio value is a {type(value).__name__}, not an audio file")
    data, original = value.get("bytes"), value.get("path")
    if data:
        suffix = Path(original).suffix.lower() if original else ""
        suffix = suffix if suffix in AUDIO_SUFFIXES else _sniff_suffix(data)
        if suffix is None:
            raise ValueError("cannot tell the audio format of the stored bytes")
        target = target.with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target
    if value.get("array") is not None and value.get("sampling_rate"):
        import numpy as np
        import soundfile as sf

        # Already-decoded samples: stored as 32-bit float WAV, so nothing is lost to re-encoding.
        target = target.with_suffix(".wav")
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]), subtype="FLOAT")
        return target
    if original:
        for candidate in (Path(original), *([source_dir / original] if source_dir else [])):
            if candidate.is_file():
                return candidate.resolve()
        raise ValueError(f"audio has no bytes and its path does not exist: {original}")
    raise ValueError("audio has neither bytes nor a path")


def read_hf(source: str, audio_out: str | Path, splits: Iterable[str] = (), audio_column: str = "audio",
            text_column: str = HF_TEXT_COLUMNS[0], language: str | None = None) -> Converted:
    """A Hugging Face dataset (save_to_disk folder or hub id) -> one split per dataset split.

    Audio is never decoded by datasets (whose decoders differ from ours): the stored bytes are written
    to AUDIO_OUT/SPLIT/INDEX.EXT, or a stored path that exists on disk is used as it is. With the
    default --text-column, 'text', 'transcription' and 'transcript' are tried after 'sentence'.
    """
    splits = list(splits)
    loaded = _load_hf(source, splits)
    source_dir = Path(source) if Path(source).is_dir() else None
    for split in splits:
        if split not in loaded:
            raise UserError(f"split {split!r} not found (splits: {', '.join(loaded)})", source)
    import datasets

    result = Converted()
    locales: dict[str, str] = {}
    for split in splits or list(loaded):
        dataset = loaded[split]
        where = f"{source} [{split}]"
        columns = list(dataset.column_names)
        if audio_column not in columns:
            raise UserError(f"no audio column {audio_column!r} (columns: {', '.join(columns)}); pass --audio-column",
                            where)
        text = _hf_text_column(columns, text_column, where)
        language_column = next((c for c in HF_LANGUAGE_COLUMNS if c in columns), None) if language is None else None
        if isinstance(dataset.features[audio_column], datasets.Audio):
            dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
        dataset = dataset.select_columns([audio_column, text] + ([language_column] if language_column else []))
        samples = result.splits.setdefault(split, [])
        for index, example in enumerate(dataset):
            row_where = f"{where}[{index}]"
            transcript = example[text]
            if not isinstance(transcript, str):
                result.skipped.append(Skipped(split, row_where, f"{text!r} is {type(transcript).__name__}, not text"))
                continue
            try:
                audio = _write_hf_audio(example[audio_column], source_dir, Path(audio_out) / split / str(index))
            except ValueError as exc:
                result.skipped.append(Skipped(split, row_where, str(exc)))
                continue
            if (duration := result.duration(split, row_where, audio)) is None:
                continue
            row_language = language
            if language_column and example[language_column]:
                value = str(example[language_column])
                if value not in locales:
                    locales[value] = locale_language(value, row_where)
                row_language = locales[value]
            samples.append(Sample(audio_path=audio, text=transcript.strip(), language=row_language,
                                  duration=duration, source=row_where))
    return result


# ---- a folder of clips with .txt transcripts --------------------------------------------------------

def read_folder(root: str | Path, language: str | None = None) -> Converted:
    """Every audio file under `root` with a NAME.txt beside it -> one 'train' split.

    An empty .txt is kept as a row with empty text (a clip known to hold no speech); audio without a
    .txt is skipped.
    """
    root = Path(root)
    result = Converted(splits={DEFAULT_SPLIT: []})
    for audio in _audio_files(root):
        sidecar = audio.with_suffix(".txt")
        if not sidecar.is_file():
            result.skipped.append(Skipped(DEFAULT_SPLIT, str(audio), f"no transcript {sidecar.name} beside it"))
            continue
        try:
            # utf-8-sig: Windows editors start UTF-8 files with a byte-order mark.
            lines = sidecar.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            result.skipped.append(Skipped(DEFAULT_SPLIT, str(sidecar), f"not valid UTF-8 (byte {exc.start})"))
            continue
        if (duration := result.duration(DEFAULT_SPLIT, str(audio), audio)) is None:
            continue
        result.splits[DEFAULT_SPLIT].append(Sample(audio_path=audio.resolve(), text=join_words(lines),
                                                   language=language, duration=duration, source=str(sidecar)))
    return result


# ---- long recordings with subtitles -----------------------------------------------------------------

@dataclass(frozen=True)
class Cue:
    number: int  # the cue's number in the file (SRT's index line, else its position), for messages
    line: int  # line of its timing line in the file
    start: float  # seconds from the start of the recording
    end: float  # seconds
    text: str


def _seconds(stamp: str, number: int, line: int, path: Path) -> float:
    match = _TIMESTAMP.fullmatch(stamp)
    if match is None or int(match.group(2)) > 59 or int(match.group(3)) > 59:
        raise ManifestError(f"cue {number} (line {line}): cannot read timestamp {stamp!r}", path)
    hours, minutes, seconds, fraction = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(fraction) / 10 ** len(fraction)


def parse_subtitles(path: str | Path) -> list[Cue]:
    """Cues of an .srt or .vtt file, in file order, markup removed, times as written.

    Raises ManifestError (file, cue number and line) for anything that makes the file's timing
    unreadable: a block without a 'start --> end' line, a timestamp that is not one, a .vtt that does
    not start with WEBVTT. Cues that are readable but wrong (end before start, overlaps) are returned
    as they are; `cut_windows` skips and reports them.
    """
    path = Path(path)
    vtt = path.suffix.lower() == ".vtt"
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not valid UTF-8 (byte {exc.start})", path) from None
    blocks: list[list[tuple[int, str]]] = [[]]
    for number, line in enumerate(lines, start=1):
        if line.strip():
            blocks[-1].append((number, line.rstrip()))
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    if vtt:
        if not blocks or not blocks[0][0][1].startswith("WEBVTT"):
            raise ManifestError("line 1: a WebVTT file must start with 'WEBVTT'", path)
        # The header block, and comment/style/region blocks, hold no cues.
        blocks = [b for b in blocks[1:] if not re.match(r"(NOTE|STYLE|REGION)\b", b[0][1])]
    cues = []
    for position, block in enumerate(blocks, start=1):
        timing = next((i for i, (_, text) in enumerate(block[:2]) if "-->" in text), None)
        if timing is None:
            raise ManifestError(f"cue {position} (line {block[0][0]}): expected a timing line 'start --> end', "
                                f"got {block[0][1][:60]!r}", path)
        number = int(block[0][1]) if timing == 1 and block[0][1].strip().isdigit() else position
        line, text = block[timing]
        start_text, _, rest = text.partition("-->")
        end_text = rest.split()[0] if rest.split() else ""  # VTT cue settings follow the end time
        start = _seconds(start_text.strip(), number, line, path)
        end = _seconds(end_text, number, line, path)
        body = _MARKUP.sub("", "\n".join(t for _, t in block[timing + 1:]))
        if vtt:
            body = html.unescape(body)  # WebVTT escapes &, < and > as entities
        cues.append(Cue(number, line, start, end, join_words(body.splitlines())))
    return cues


def cut_windows(audio: Path, subtitles: Path, cues: list[Cue], duration: float, max_window: float,
                language: str | None, split: str = DEFAULT_SPLIT) -> tuple[list[Sample], list[Skipped]]:
    """Pack consecutive cues greedily into windows of at most `max_window` seconds; never cut a cue.

    A window starts at its first cue's start and ends at its last cue's end. A cue that would cross
    the edge starts the next window. Cues that cannot be used — end not after start, overlapping an
    earlier cue, longer than a window, starting after the audio ends — are skipped and reported, and
    no window spans one of them: the words spoken there would be in the audio but not in the text.
    Cues without text (markup only) carry no words and are dropped silently.
    """
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    current: list[Cue] = []
    reached = 0.0  # latest end of any cue so far: a cue starting before it overlaps an earlier one

    def flush() -> None:
        if not current:
            return
        start, end = current[0].start, current[-1].end
        sentences = tuple(TimedText(round(c.start - start, ROUND), round(c.end - start, ROUND), c.text)
                          for c in current)
        samples.append(Sample(audio_path=audio.resolve(), text=join_words(c.text for c in current),
                              language=language, start=round(start, ROUND), end=round(end, ROUND),
                              duration=round(end - start, ROUND), sentences=sentences,
                              source=f"{subtitles}: cues {current[0].number}-{current[-1].number}"))
        current.clear()

    for cue in cues:
        if not cue.text:
            continue
        if cue.end > duration and cue.start < duration:
            cue = Cue(cue.number, cue.line, cue.start, duration, cue.text)  # subtitles often outlast the audio
        problem = None
        if cue.end <= cue.start:
            problem = f"end {cue.end:.3f} s is not after start {cue.start:.3f} s"
        elif cue.start >= duration:
            problem = f"starts at {cue.start:.3f} s, after the audio ends ({duration:.3f} s)"
        elif cue.start < reached - OVERLAP_TOLERANCE:
            problem = f"starts at {cue.start:.3f} s, before an earlier cue ends ({reached:.3f} s)"
        elif cue.end - cue.start > max_window:
            problem = f"lasts {cue.end - cue.start:.3f} s, longer than --max-window {max_window:g} s"
        if cue.end > cue.start:
            reached = max(reached, cue.end)
        if problem:
            skipped.append(Skipped(split, f"{subtitles}: cue {cue.number} (line {cue.line})", problem))
            flush()
            continue
        if current and cue.end - current[0].start > max_window:
            flush()
        current.append(cue)
    flush()
    return samples, skipped


def read_subtitles(root: str | Path, max_window: float = 30.0, language: str | None = None) -> Converted:
    """Recordings under `root` with a NAME.srt or NAME.vtt beside them -> windows of <= max_window s.

    Each window is a span of the original file (start_time/end_time) with its cues as `sentences`,
    timed from the window's start. Policy: a subtitle file that cannot be parsed stops the conversion
    (ManifestError); a bad cue inside a readable file is skipped and reported.
    """
    root = Path(root)
    result = Converted(splits={DEFAULT_SPLIT: []})
    for audio in _audio_files(root):
        subtitles = _sidecar(audio, SUBTITLE_SUFFIXES)
        if subtitles is None:
            result.skipped.append(Skipped(DEFAULT_SPLIT, str(audio), "no .srt or .vtt subtitles beside it"))
            continue
        cues = parse_subtitles(subtitles)
        if (duration := result.duration(DEFAULT_SPLIT, str(audio), audio)) is None:
            continue
        if not cues:
            result.skipped.append(Skipped(DEFAULT_SPLIT, str(subtitles), "no cues"))
            continue
        samples, skipped = cut_windows(audio, subtitles, cues, duration, max_window, language)
        result.splits[DEFAULT_SPLIT] += samples
        result.skipped += skipped
    return result


# ---- an existing manifest ---------------------------------------------------------------------------

def read_existing_manifest(path: str | Path, language: str | None = None) -> Converted:
    """Any manifest `read_manifest` reads -> the same rows, to be re-written as JSON lines.

    Named train/dev/test/… it keeps that split name, otherwise it becomes 'train'. Rows whose audio
    is missing or unreadable are skipped; a missing duration is filled in from the audio's header.
    """
    path = Path(path)
    split = path.stem if path.stem in KNOWN_SPLITS else DEFAULT_SPLIT
    result = Converted(splits={split: []})
    for sample in read_manifest(path):
        duration = sample.duration
        try:
            if not sample.audio_path.is_file():
                raise AudioError("audio file not found", sample.audio_path, kind="missing_audio")
            if duration is None:
                end = sample.end if sample.end is not None else audio_duration(sample.audio_path)
                duration = round(end - (sample.start or 0.0), ROUND)
        except AudioError as exc:
            result.skipped.append(Skipped(split, sample.source, str(exc)))
            continue
        result.splits[split].append(Sample(audio_path=sample.audio_path, text=sample.text,
                                           language=language or sample.language, start=sample.start,
                                           end=sample.end, duration=duration, sentences=sample.sentences,
                                           source=sample.source))
    return result

