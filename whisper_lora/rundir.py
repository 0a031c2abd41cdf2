"""Run folders: where a stage writes, what it calls its outputs, and the refusal to mix two runs in one."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .errors import UserError

ADAPTER_DIR = "adapter"  # best adapter by dev metric (or the last one without a dev set)
LAST_ADAPTER_DIR = "last"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped_samples.jsonl"


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))


def save_config_beside(config, output: str | Path) -> Path:
    """A stage whose output is one file (transcribe --output, realtime --output) keeps its resolved config
    beside it, as `FILE.config.yaml`."""
    path = Path(output).with_name(Path(output).name + ".config.yaml")
    save_config(config, path)
    return path


RESOLVED_CONFIG = "config.yaml"  # every run's fully resolved config, next to its outputs
_RUN_CONTROL_FIELDS = {"resume", "overwrite"}  # may differ between the first run and its resumption


def clear_output_dir(out: Path, overwrite: bool, what: str) -> None:
    """Refuse a non-empty OUTPUT_DIR (or a file in its place) unless --overwrite, which removes it."""
    import shutil

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{what}; pass --overwrite to replace it", out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def check_run_dir(config, output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to mix two different runs in one folder (reads only: the options' check runs it early too)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a folder", out)
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    saved = out / RESOLVED_CONFIG
    if not saved.is_file():
        raise UserError("output folder is not empty and holds no whisper-lora run; "
                        "choose another --output-dir or pass --overwrite", out)
    previous = yaml.safe_load(saved.read_text()) or {}
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in _RUN_CONTROL_FIELDS and previous.get(k) != current[k])
    if changed:
        raise UserError(f"output folder holds a different run (changed: {', '.join(changed)}); "
                        "pass --overwrite to replace it or choose another --output-dir", out)
    if not resume:
        raise UserError("output folder already holds this run; pass --resume to continue it "
                        "or --overwrite to start again", out)


def prepare_run_dir(config, output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create OUTPUT_DIR (emptied first with `overwrite`) and write the resolved config into it."""
    import shutil

    out = Path(output_dir)
    check_run_dir(config, out, resume, overwrite)
    if overwrite and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / RESOLVED_CONFIG)
    return out
