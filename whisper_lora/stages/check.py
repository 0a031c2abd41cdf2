"""`whisper-lora check MANIFEST [--dev DEV] [--fix]`: the data doctor.

Users' data always has broken rows, and a trainer that meets them hours into a GPU run either crashes
or quietly skips them. This stage finds every problem first (the checks live in `doctor`), prints one
table of problem kinds with counts and examples, and exits 1 while errors remain, 0 otherwise
(warnings alone do not fail a check; a bad option or a missing manifest exits 2).

--fix writes the rows without errors as a JSON-lines manifest (every field of each row kept, audio
paths rewritten relative to the new file's folder, so it is used without --audio-dir) and a rejects
file with each rejected row, its line and every reason. Rows with warnings only are kept: duplicates
may be deliberate upsampling, and leakage is for the user to resolve. Only MANIFEST is fixed: DEV is reported, never
rewritten, because a dev set that silently changes makes scores incomparable.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import CheckConfig
from ..doctor import (ERROR, INFO, KINDS, WARNING, CheckedManifest, CheckOptions, Finding, check_audio,
                      check_duplicates, check_leakage, check_rows, check_text, sort_key)
from ..errors import UserError
from ..manifest import ManifestRow, iter_rows, language_code
from ..report import format_table


@dataclass(frozen=True)
class ProblemSummary:
    kind: str
    title: str
    severity: str
    count: int  # rows with this problem
    examples: list[Finding]


@dataclass(frozen=True)
class FixResult:
    clean: str  # path of the clean manifest
    rejects: str  # path of the rejects file
    kept: int  # rows written to the clean manifest
    rejected: int  # rows written to the rejects file


def run(config: CheckConfig) -> int:
    # ---- set up: options, rows, tokenizer (before any slow pass, so that mistakes fail fast) ---------------
    language = language_code(config.language, "--language") if config.language else None
    options = CheckOptions(
        decode=config.audio, workers=config.workers or os.cpu_count() or 1, max_duration=config.max_duration,
        min_duration=config.min_duration, duration_tolerance=config.duration_tolerance,
        empty_text_ok=config.timestamps, timestamp_labels=config.timestamps or config.timestamp_fraction > 0,
        default_language=language)
    # Training reads DEV strictly and builds its labels without timestamps: check it the same way.
    dev_options = replace(options, empty_text_ok=False, timestamp_labels=False)
    clean_path, rejects_path = fix_paths(config) if config.fix else (None, None)
    train = CheckedManifest(config.manifest, "train",
                            list(iter_rows(config.manifest, config.audio_dir, allow_empty_text=True)))
    dev = None
    if config.dev:
        dev = CheckedManifest(config.dev, "dev", list(iter_rows(config.dev, config.audio_dir, allow_empty_text=True)))
    train_builder, dev_builder = label_builders(config, language)

    # ---- check -------------------------------------------------------------------------------------------
    for checked, opts, builder in ((train, options, train_builder), (dev, dev_options, dev_builder)):
        if checked is None:
            continue
        check_rows(checked)
        check_audio(checked, opts)
        check_text(checked, opts, builder)
        check_duplicates(checked)
    if dev is not None:
        check_leakage(train, dev, options)
    manifests = [m for m in (train, dev) if m is not None]

    # ---- report ------------------------------------------------------------------------------------------
    summaries = summarise([f for m in manifests for f in m.findings], config.examples)
    print(render(manifests, summaries, config))

    # ---- fix ---------------------------------------------------------------------------------------------
    fixed = write_fix(train, clean_path, rejects_path) if config.fix else None
    if fixed:
        print(f"--fix: {fixed.kept} rows written to {fixed.clean}, {fixed.rejected} rejected to {fixed.rejects}")

    # After --fix the clean manifest holds no row with an error; DEV's errors remain until fixed by hand.
    remaining = sum(1 for m in manifests if not (fixed and m is train) for f in m.findings if f.severity == ERROR)
    exit_code = 1 if remaining else 0
    if exit_code:
        where = f" in {Path(dev.path).name} (--fix cleans MANIFEST only)" if fixed else ""
        print(f"check failed: {remaining} {'error remains' if remaining == 1 else 'errors remain'}{where}")
    else:
        print("check passed: the clean manifest has no errors" if fixed else "check passed: no errors")
    if config.report:
        write_report(Path(config.report), config, manifests, summaries, fixed, exit_code)
    return exit_code


# ---- set up --------------------------------------------------------------------------------------

def fix_paths(config: CheckConfig) -> tuple[Path, Path]:
    manifest = Path(config.manifest)
    clean = Path(config.fix_output) if config.fix_output else manifest.with_name(f"{manifest.stem}.clean.jsonl")
    rejects = clean.parent / f"{manifest.stem}.rejects.jsonl"
    for path in (clean, rejects):
        if path.resolve() == manifest.resolve() or (config.dev and path.resolve() == Path(config.dev).resolve()):
            raise UserError("--fix would overwrite the manifest being checked; choose another --fix-output", path)
        if path.is_dir():
            raise UserError("--fix output is a folder; give a file name", path)
    return clean, rejects


def label_builders(config: CheckConfig, language: str | None):
    """LabelBuilders for train (as `train` builds its labels) and dev, from the tokenizer alone."""
    from transformers import GenerationConfig, WhisperTokenizer

    from ..data import LabelBuilder
    from ..models import resolve_model

    resolved = resolve_model(config.model)
    # The tokenizer models.load_processor would pick (an adapter may carry its own), but neither weights
    # nor feature extractor: importing the processor machinery alone costs seconds.
    adapter_has_tokenizer = resolved.adapter is not None and (resolved.adapter / "tokenizer.json").is_file()
    try:
        tokenizer = WhisperTokenizer.from_pretrained(resolved.adapter if adapter_has_tokenizer else resolved.location)
        generation = GenerationConfig.from_pretrained(resolved.location)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise UserError(f"cannot load the model's tokenizer ({reason}); for a hub id this machine needs a network "
                        "or the model in the Hugging Face cache", resolved.spec) from None
    train = LabelBuilder(tokenizer, generation, language, config.task, timestamps=config.timestamps,
                         timestamp_fraction=config.timestamp_fraction)
    return train, LabelBuilder(tokenizer, generation, language, config.task)


# ---- fix -----------------------------------------------------------------------------------------

def _audio_string(row: dict) -> str | None:
    audio = row.get("audio", row.get("audio_path", row.get("path")))
    return audio.get("path") if isinstance(audio, dict) else audio


def _relocated(row: ManifestRow, folder: Path) -> dict:
    """The row as a JSON-lines object whose audio path still points at the same file from `folder`."""
    if row.format == "dict":
        ((audio, text),) = row.raw.items()
        out, original = {"audio": {"path": audio}, "sentence": text}, audio
    else:
        out, original = dict(row.raw), _audio_string(row.raw)
    if os.path.isabs(original):
        return out
    new = os.path.relpath(row.audio_path, folder)
    if isinstance(out.get("audio"), dict):
        out["audio"] = {**out["audio"], "path": new}
    elif "audio" in out:
        out["audio"] = new
    elif "audio_path" in out:
        out["audio_path"] = new
    else:
        out["path"] = new
    return out


def write_fix(checked: CheckedManifest, clean: Path, rejects: Path) -> FixResult:
    """Rows without errors -> `clean`; the others, with their line and every reason, -> `rejects`."""
    by_row: dict[int, list[Finding]] = defaultdict(list)
    for f in checked.findings:
        by_row[f.row].append(f)
    bad = checked.error_rows()
    clean.parent.mkdir(parents=True, exist_ok=True)
    folder = clean.parent.resolve()
    kept = rejected = 0
    # errors="replace": a rejected row may hold bytes that were not UTF-8; the rejects file must still be.
    with open(clean, "w", encoding="utf-8") as good, open(rejects, "w", encoding="utf-8", errors="replace") as out:
        for row in checked.rows:
            if row.index in bad:
                reasons = [{"problem": f.kind, "severity": f.severity, "message": f.message} for f in by_row[row.index]]
                out.write(json.dumps({"line": row.line, "where": row.where, "row": row.raw, "reasons": reasons},
                                     ensure_ascii=False) + "\n")
                rejected += 1
            else:
                good.write(json.dumps(_relocated(row, folder), ensure_ascii=False) + "\n")
                kept += 1
    return FixResult(str(clean), str(rejects), kept, rejected)


# ---- report --------------------------------------------------------------------------------------

def summarise(findings: list[Finding], examples: int) -> list[ProblemSummary]:
    groups: dict[tuple[str, str], list[Finding]] = defaultdict(list)
    for f in findings:
        groups[(f.kind, f.severity)].append(f)
    summaries = [ProblemSummary(kind, KINDS[kind].title, severity, len(items), items[:examples])
                 for (kind, severity), items in groups.items()]
    return sorted(summaries, key=lambda s: sort_key(s.kind, s.severity, s.count))


def _counts(findings: list[Finding]) -> dict[str, int]:
    return {name: sum(1 for f in findings if f.severity == severity)
            for name, severity in (("errors", ERROR), ("warnings", WARNING), ("info", INFO))}


def render(manifests: list[CheckedManifest], summaries: list[ProblemSummary], config: CheckConfig) -> str:
    lines = []
    if summaries:
        table = [[s.title, s.severity, s.count,
                  ", ".join(f.location for f in s.examples) + (", …" if s.count > len(s.examples) else "")]
                 for s in summaries]
        lines += [format_table(["problem", "severity", "count", "first examples"], table), ""]
        for s in summaries:
            if s.examples:
                lines.append(f"{s.title} ({s.kind}, {s.severity}, {s.count}):")
                lines += [f"  {f.location}  {f.audio or '-'}  {f.message}" for f in s.examples]
        lines.append("")
    else:
        lines.append("no problems found")
    parts = []
    for m in manifests:
        counts = _counts(m.findings)
        parts.append(f"{Path(m.path).name}: {len(m.rows)} rows, {len(m.error_rows())} with errors "
                     f"({counts['errors']} errors, {counts['warnings']} warnings, {counts['info']} info)")
    how = "audio decoded" if config.audio else "audio not decoded (--no-audio)"
    lines.append("; ".join(parts) + f"; {how}")
    return "\n".join(lines)


def write_report(path: Path, config: CheckConfig, manifests: list[CheckedManifest], summaries: list[ProblemSummary],
                 fixed: FixResult | None, exit_code: int) -> None:
    report = {
        "exit_code": exit_code,
        "options": asdict(config),
        "manifests": [{"path": m.path, "role": m.role, "rows": len(m.rows), "rows_with_errors": len(m.error_rows()),
                       **_counts(m.findings)} for m in manifests],
        "problems": [{"kind": s.kind, "title": s.title, "severity": s.severity, "count": s.count,
                      "examples": [asdict(f) for f in s.examples]} for s in summaries],
        "findings": [asdict(f) for m in manifests for f in m.findings],
        "fix": asdict(fixed) if fixed else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
