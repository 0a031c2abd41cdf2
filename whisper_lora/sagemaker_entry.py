"""Inside a SageMaker training container: run `whisper-lora train` on the job's channels, then export.

`whisper-lora sagemaker` (stages/sagemaker.py) ships this package in the job's source_dir and starts
it through a two-line `train_entry.py`, once per GPU under torchrun. Everything it needs comes from
the variables the SageMaker training toolkit sets, so the same code runs on a laptop when they point
at local folders (that is how the tests run it):

* `SM_HPS`: JSON of the `whisper-lora train` options the launcher took from the train YAML. Paths in
  it are relative to a channel (see CHANNEL_OPTIONS) and are resolved against `SM_CHANNEL_<NAME>`.
* `/opt/ml/checkpoints` (or `$WHISPER_LORA_CHECKPOINT_DIR`) is the run folder. SageMaker syncs it to
  S3 while training and restores it when a spot job restarts, so a folder that already holds a run
  means "continue": training then starts with `--resume`.
* At the end, rank 0 copies the best adapter, config.yaml and metrics.json to `SM_MODEL_DIR` (the
  job's model.tar.gz) and the logs to `SM_OUTPUT_DATA_DIR` (output.tar.gz).

Run as `python -m whisper_lora.sagemaker_entry`. Command-line arguments are ignored: the toolkit
also passes the hyperparameters as `--name value` pairs, but SM_HPS keeps their JSON types.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

from .config import TrainConfig, build_config
from .errors import UserError
from .rundir import ADAPTER_DIR, RESOLVED_CONFIG
from .sagemaker_rules import (CHANNEL_OPTIONS, CHECKPOINT_DIR, CHECKPOINT_DIR_ENV, CODE_DIR_ENV, JOB_CONTROLLED_OPTIONS,
                              MODEL_FILES, OUTPUT_DATA_FILES, SHIPPED_OPTIONS)



def channel_env(channel: str) -> str:
    return f"SM_CHANNEL_{channel.upper()}"


def train_options(env: Mapping[str, str]) -> dict:
    """SM_HPS -> `whisper-lora train` options, with channel paths made absolute."""
    try:
        hps = json.loads(env.get("SM_HPS") or "{}")
    except json.JSONDecodeError as exc:
        raise UserError(f"SM_HPS is not JSON ({exc.msg})") from None
    options = {k: v for k, v in hps.items() if not k.startswith("sagemaker_") and k not in JOB_CONTROLLED_OPTIONS}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown train options in the job's hyperparameters: {', '.join(unknown)}")
    for channel, names in CHANNEL_OPTIONS.items():
        folder = env.get(channel_env(channel))
        for name in names:
            value = options.get(name)
            if channel == "model":
                # With the channel, the base model is (a folder inside) it; without, `model` is a hub
                # id or an embedded model's name and is used as it is.
                if folder:
                    options[name] = str(Path(folder) / (value or ""))
                continue
            if value is None or Path(value).is_absolute():
                continue
            if not folder:
                raise UserError(f"{name} {value!r} is a path inside channel '{channel}', but the job has "
                                f"no such channel ({channel_env(channel)} is not set)")
            options[name] = str(Path(folder) / value)
    code_dir = Path(env.get(CODE_DIR_ENV) or ".")
    for name in SHIPPED_OPTIONS:
        if options.get(name) and not Path(options[name]).is_absolute():
            options[name] = str(code_dir / options[name])
    if "run_name" in known and not options.get("run_name") and env.get("TRAINING_JOB_NAME"):
        options["run_name"] = env["TRAINING_JOB_NAME"]  # not "checkpoints", the run folder's name
    return options


def is_rank_zero(env: Mapping[str, str]) -> bool:
    """Global rank 0 under torchrun; a plain `python` launch (no RANK) is rank 0 too."""
    rank = env.get("RANK") or env.get("LOCAL_RANK") or "0"
    return int(rank) == 0


def _replace(source: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def export_outputs(run_dir: Path, model_dir: Path, output_data_dir: Path | None) -> list[str]:
    """Best adapter + config + metrics -> model dir; logs -> output data dir. Returns what was exported."""

    exported = []
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_DIR, *MODEL_FILES):
        if (run_dir / name).exists():
            _replace(run_dir / name, model_dir / name)
            exported.append(f"{model_dir / name}")
    if output_data_dir is not None:
        output_data_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_DATA_FILES:
            if (run_dir / name).exists():
                _replace(run_dir / name, output_data_dir / name)
                exported.append(f"{output_data_dir / name}")
    return exported


def run(env: Mapping[str, str]) -> dict:
    """Train on the channels named in `env`, resuming a run found in the checkpoint folder; export on rank 0."""
    from .stages import train

    if not env.get("SM_MODEL_DIR"):
        raise UserError("SM_MODEL_DIR is not set: this entry runs inside a SageMaker training job "
                        "(locally, set SM_MODEL_DIR, SM_CHANNEL_TRAIN and SM_HPS)")
    options = train_options(env)
    run_dir = Path(env.get(CHECKPOINT_DIR_ENV) or CHECKPOINT_DIR)
    resume = (run_dir / RESOLVED_CONFIG).is_file()  # restored from checkpoint_s3_uri after a spot restart
    config = build_config(TrainConfig, None, {**options, "output_dir": str(run_dir), "resume": resume,
                                              "overwrite": False})
    if is_rank_zero(env):
        print(f"whisper-lora sagemaker: {'continuing the run in' if resume else 'new run in'} {run_dir}", flush=True)
    summary = train.run(config)
    if is_rank_zero(env):
        output_data = Path(env["SM_OUTPUT_DATA_DIR"]) if env.get("SM_OUTPUT_DATA_DIR") else None
        for path in export_outputs(run_dir, Path(env["SM_MODEL_DIR"]), output_data):
            print(f"whisper-lora sagemaker: exported {path}", flush=True)
    return summary


def main() -> int:
    try:
        run(os.environ)
    except UserError as exc:
        print(f"whisper-lora: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
