"""`whisper-lora prepare`: a dataset as users have it -> one JSON-lines manifest per split.

Training starts from a manifest, but nobody has one: they have a Common Voice release, AISHELL-1, a
Hugging Face dataset, clips with .txt transcripts, or long recordings with subtitles. This stage
recognises the layout, converts it with the readers in `sources`, and writes OUTPUT_DIR/SPLIT.jsonl
(train.jsonl for sources without splits). Rows it cannot use are skipped, counted in the table and
listed with their reason in OUTPUT_DIR/prepare_skipped.jsonl, so a few broken clips never stop a
conversion and never disappear unseen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ..config import PrepareConfig
from ..rundir import RESOLVED_CONFIG, clear_output_dir, save_config
from ..errors import UserError
from ..manifest import language_code
from ..report import format_table
from ..sources import (Converted, detect_format, looks_like_hub_id, read_aishell, read_commonvoice,
                       read_existing_manifest, read_folder, read_hf, read_subtitles, write_manifest)

SKIPPED_FILE = "prepare_skipped.jsonl"
HF_AUDIO_DIR = "audio"  # OUTPUT_DIR/audio/SPLIT/INDEX.EXT: audio extracted from a Hugging Face dataset
SHOWN_SKIPPED = 5  # skipped rows printed on the terminal; the file lists every one
SPLIT_FORMATS = ("commonvoice", "aishell", "hf")  # layouts that have splits for --splits to choose from
FOLDER_FORMATS = ("commonvoice", "aishell", "folder", "subtitles")
SECONDS_PER_HOUR = 3600


def _check_source(config: PrepareConfig, fmt: str, out: Path) -> None:
    """Option and path mistakes, found before OUTPUT_DIR is touched."""
    source = Path(config.source)
    if fmt in FOLDER_FORMATS and not source.is_dir():
        raise UserError(f"--format {fmt} needs a folder", source)
    if fmt == "manifest" and not source.is_file():
        raise UserError("--format manifest needs a manifest file", source)
    if fmt == "hf" and not source.exists() and not looks_like_hub_id(config.source):
        raise UserError("not a saved Hugging Face dataset folder nor a hub id", source)
    if config.splits and fmt not in SPLIT_FORMATS:
        raise UserError(f"--splits applies to Common Voice, AISHELL and Hugging Face sources, not {fmt}")
    if config.transcript and fmt != "aishell":
        raise UserError(f"--transcript applies to AISHELL sources, not {fmt}")
    # --overwrite removes OUTPUT_DIR: it must never be the source or a folder holding it.
    if source.exists() and (out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve())):
        raise UserError("output folder is, or contains, the source; choose another --output-dir", out)


def _read(config: PrepareConfig, fmt: str, out: Path, language: str | None) -> Converted:
    if fmt == "commonvoice":
        return read_commonvoice(config.source, config.splits, language)
    if fmt == "aishell":
        return read_aishell(config.source, config.splits, config.transcript, language)
    if fmt == "hf":
        return read_hf(config.source, out / HF_AUDIO_DIR, config.splits, config.audio_column, config.text_column,
                       language)
    if fmt == "folder":
        return read_folder(config.source, language)
    if fmt == "subtitles":
        return read_subtitles(config.source, config.max_window, language)
    return read_existing_manifest(config.source, language)


def _hours(durations: list[float | None]) -> str:
    known = [d for d in durations if d is not None]
    if not known:
        return "?" if durations else "0.00"
    # A "+" says some rows' durations are unknown, so the true total is larger.
    return f"{sum(known) / SECONDS_PER_HOUR:.2f}" + ("+" if len(known) < len(durations) else "")


def run(config: PrepareConfig) -> dict:
    # ---- set up: what the source is, where it goes
    fmt = detect_format(config.source) if config.format == "auto" else config.format
    out = Path(config.output_dir)
    _check_source(config, fmt, out)
    language = language_code(config.language, "--language") if config.language else None
    clear_output_dir(out, config.overwrite, "output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)

    # ---- read
    converted = _read(config, fmt, out, language)
    total = sum(len(samples) for samples in converted.splits.values())
    if total == 0:
        first = f"; first: {converted.skipped[0].where}: {converted.skipped[0].reason}" if converted.skipped else ""
        raise UserError(f"no usable rows found as {fmt} ({len(converted.skipped)} skipped{first})", config.source)

    # ---- write: one manifest per split, the skipped rows, the resolved config
    summary: dict = {"source": config.source, "format": fmt, "output_dir": str(out), "rows": total,
                     "skipped": len(converted.skipped), "skipped_file": str(out / SKIPPED_FILE), "splits": {}}
    for split, samples in converted.splits.items():
        manifest = out / f"{split}.jsonl"
        if samples:
            write_manifest(samples, manifest)
        summary["splits"][split] = {
            "manifest": str(manifest) if samples else None, "rows": len(samples),
            "seconds": round(sum(s.duration for s in samples if s.duration is not None), 3),
            "skipped": sum(1 for s in converted.skipped if s.split == split)}
    with open(out / SKIPPED_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in converted.skipped)
    save_config(replace(config, format=fmt), out / RESOLVED_CONFIG)

    # ---- report
    rows = [[split, len(samples), _hours([s.duration for s in samples]), summary["splits"][split]["skipped"]]
            for split, samples in converted.splits.items()]
    if len(rows) > 1:
        rows.append(["total", total, _hours([s.duration for v in converted.splits.values() for s in v]),
                     len(converted.skipped)])
    print(f"{config.source} ({fmt}) -> {out}")
    print(format_table(["split", "rows", "hours", "skipped"], rows))
    for s in converted.skipped[:SHOWN_SKIPPED]:
        print(f"skipped {s.where}: {s.reason}")
    if converted.skipped:
        more = f" ({len(converted.skipped) - SHOWN_SKIPPED} more)" if len(converted.skipped) > SHOWN_SKIPPED else ""
        count = len(converted.skipped)
        print(f"{count} row{'s' if count > 1 else ''} skipped{more}; all listed in {out / SKIPPED_FILE}")

    # ---- optional: shards for streaming, features for repeated epochs (one folder per split)
    if config.shards:
        from ..shards import write_shards

        for split, samples in converted.splits.items():
            index, rejected = write_shards(samples, out / "shards" / split, config.shard_size)
            summary["splits"][split]["shards"] = {"folder": str(out / "shards" / split),
                                                  "files": len(index["shards"]), "rejected": len(rejected)}
            print(f"{split}: {index['samples']} samples in {len(index['shards'])} shards -> {out / 'shards' / split}"
                  + (f" ({len(rejected)} rejected, first: {rejected[0][1]})" if rejected else ""))
    if config.cache_features:
        from ..features import write_feature_cache
        from ..models import load_processor, resolve_model

        processor = load_processor(resolve_model(config.model))
        for split, samples in converted.splits.items():
            stats = write_feature_cache(samples, processor, out / "features" / split)
            summary["splits"][split]["features"] = {"folder": str(out / "features" / split), **stats}
            print(f"{split}: features of {stats['clips']} clips ({stats['megabytes']} MB) -> {out / 'features' / split}"
                  + (f"; {stats['errors']} unreadable, listed in index.json" if stats["errors"] else ""))
    return summary
