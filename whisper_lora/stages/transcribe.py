"""`whisper-lora transcribe`: files, folders and list files -> text or JSON lines."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ..audio import audio_duration, load_audio
from ..audio_ctx import parse_audio_ctx
from ..config import TranscribeConfig
from ..constants import AUDIO_SUFFIXES, CHUNK_SECONDS
from ..decode import Backend, DecodeOptions, Segment, TranscriptionInfo, join_text, load_backend
from ..errors import AudioError, UserError
from ..manifest import language_code
from ..rundir import save_config, save_config_beside
from ..writers import FORMATS, WRITERS, transcript_dict

LIST_SUFFIXES = {".txt", ".lst", ".list"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Audio files as given; folders searched recursively; list files read one path per line."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            paths += [(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
        else:
            paths.append(path)
    if not paths:
        raise UserError(f"no audio files found in {', '.join(inputs)}")
    return list(dict.fromkeys(paths))  # the same file named twice is transcribed once


def decode_options(config: TranscribeConfig) -> DecodeOptions:
    return DecodeOptions(task=config.task, num_beams=config.num_beams, temperature=tuple(config.temperature),
                         compression_ratio_threshold=config.compression_ratio_threshold,
                         log_prob_threshold=config.log_prob_threshold, no_speech_threshold=config.no_speech_threshold,
                         initial_prompt=config.initial_prompt,
                         condition_on_previous_text=config.condition_on_previous_text,
                         # speakers are attached word by word (diarize.py); the words' times come from the alignment
                         # heads, not from timestamp tokens
                         word_timestamps=config.word_timestamps or config.diarize,
                         audio_ctx=parse_audio_ctx(config.audio_ctx),
                         # plain text needs no segment times: a clip of up to 30 s is then one segment (split where
                         # the speaker changes, diarised); decoding timestamp tokens measured 40% slower
                         without_timestamps=config.output_format == "txt" and not config.word_timestamps)


def transcribe_all(backend: Backend, paths: list[Path], config: TranscribeConfig, language: str | None
                   ) -> Iterator[tuple[Path, list[Segment] | None, TranscriptionInfo | str]]:
    """Yield (path, segments, info) in input order, or (path, None, error message) for bad files.

    Clips up to 30 s are decoded together in batches (unless they need VAD); longer files are read and
    decoded block by block from disk, so a three-hour file needs no more memory than a five-minute one.
    """
    options = decode_options(config)
    pending: list[tuple[Path, np.ndarray]] = []

    def flush():
        if not pending:
            return
        decoded = backend.transcribe_batch([a for _, a in pending], [language] * len(pending), options)
        for (path, _), (segments, info) in zip(pending, decoded):
            yield path, segments, info
        pending.clear()

    for path in paths:
        try:
            if config.vad or audio_duration(path) > CHUNK_SECONDS:
                yield from flush()
                segments, info = backend.transcribe(path, language, options, vad=config.vad,
                                                    batch_size=config.batch_size)
                yield path, list(segments), info
                continue
            pending.append((path, load_audio(path)))
        except AudioError as exc:
            yield from flush()
            yield path, None, str(exc)
            continue
        if len(pending) >= config.batch_size:
            yield from flush()
    yield from flush()


def known_voices(diarizer, items: list[str]) -> dict[str, np.ndarray]:
    """--known-speakers NAME=CLIP -> {name: voice print}; a bad clip is reported before any audio is decoded."""
    from ..diarize import reference_voice

    voices = {}
    for item in items:
        name, clip = (part.strip() for part in item.partition("=")[::2])
        audio = load_audio(clip)  # its AudioError names the file
        try:
            voices[name] = reference_voice(diarizer, audio, name)
        except UserError as exc:
            raise UserError(exc.message, clip) from None
    return voices


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names per input: the file stem, made unique when two inputs share one."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in taken:
            n += 1
            stem = f"{path.stem}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


TRANSCRIBE_CONFIG = "transcribe_config.yaml"  # the resolved config, beside the per-file outputs


def run(config: TranscribeConfig) -> int:
    if config.ray:
        from .transcribe_ray import run as run_on_ray

        return run_on_ray(config)
    from tqdm.auto import tqdm

    # ---- set up
    language = language_code(config.language, "--language") if config.language else None
    paths = expand_inputs(config.inputs)
    per_file_formats = FORMATS if config.output_format == "all" else (config.output_format,)
    if config.output_format in ("json", "srt", "vtt", "tsv") and not config.output_dir and len(paths) > 1:
        raise UserError(f"--output-format {config.output_format} with {len(paths)} inputs needs --output-dir "
                        "(one file per input)")
    backend = load_backend(config.model, config.backend, config.compute_type, config.device, config.compile,
                           config.dtype)
    if language and language not in backend.languages:
        raise UserError(f"the model has no language '{language}'" + ("" if backend.multilingual else
                        " (it is English-only)"), config.model or "default")
    out_dir = Path(config.output_dir) if config.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / TRANSCRIBE_CONFIG)
    stems = dict(zip(paths, unique_stems(paths)))
    if config.output:
        if Path(config.output).is_dir():
            raise UserError("--output is a folder; give a file name, or use --output-dir", config.output)
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        save_config_beside(config, config.output)
    sink = open(config.output, "w", encoding="utf-8") if config.output else sys.stdout

    if config.sentiment:
        from ..sentiment import annotate

        if config.sentiment_model:
            from ..sentiment import analyser_for

            analyser_for(None, config.sentiment_model)  # a bad model is reported before any audio is decoded

    if config.diarize:
        from ..diarize import assign_speakers, diarize, load_diarizer

        diarizer = load_diarizer(config.diarizer, config.device)
        known = known_voices(diarizer, config.known_speakers)

    # ---- loop
    failures, notes = 0, set()
    try:
        for path, segments, info in tqdm(transcribe_all(backend, paths, config, language), total=len(paths),
                                         desc="transcribe", unit="file", disable=len(paths) < 2, file=sys.stderr):
            if segments is None:
                failures += 1
                print(f"whisper-lora: error: {info}", file=sys.stderr)
                continue
            if config.diarize:
                try:
                    turns = diarize(diarizer, path, config.num_speakers, config.min_speakers, config.max_speakers,
                                    known)
                except AudioError as exc:
                    failures += 1
                    print(f"whisper-lora: error: {exc}", file=sys.stderr)
                    continue
                segments = assign_speakers(segments, turns.turns)
                if turns.note:
                    print(f"whisper-lora: note: {path}: {turns.note}", file=sys.stderr)
            text = join_text(segments, info.language)
            if config.sentiment:
                segments, overall, note = annotate(segments, text, info.language, config.sentiment_model)
                info = replace(info, sentiment=overall, sentiment_note=note)
                if note and note not in notes:
                    notes.add(note)
                    print(f"whisper-lora: note: {path}: {note}", file=sys.stderr)
            if out_dir:
                for fmt in per_file_formats:
                    with open(out_dir / f"{stems[path]}.{fmt}", "w", encoding="utf-8") as f:
                        WRITERS[fmt](segments, info, text, f)
            elif config.output_format == "jsonl":
                row = {"path": str(path), **transcript_dict(segments, info, text)}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            elif config.output_format == "txt" and config.diarize:  # a line per speaker turn
                if len(paths) > 1:
                    sink.write(f"{path}\n")
                WRITERS["txt"](segments, info, text, sink)
            elif config.output_format == "txt":
                sink.write(text + "\n" if len(paths) == 1 else f"{path}\t{text}\n")
            else:
                WRITERS[config.output_format](segments, info, text, sink)
            sink.flush()
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 1 if failures else 0
