"""`whisper-lora`: parse arguments, build the stage's config, call `stages.<name>.run(config)`.

No logic lives here: flags are generated from the config dataclasses, so an option is declared once.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
import warnings

from . import __version__
from .config import (CheckConfig, DemoConfig, EvaluateConfig, ExportConfig, MergeConfig, PrepareConfig,
                     PushConfig, RealtimeConfig, SageMakerConfig, ServeConfig, TrainConfig, TranscribeConfig, UIConfig,
                     build_config)
from .errors import UserError

STAGES = {
    "prepare": (PrepareConfig, "convert a dataset (Common Voice, AISHELL, HF datasets, folders, subtitles) to manifests"),
    "check": (CheckConfig, "find every problem in a manifest before training: audio, text, labels, leakage"),
    "train": (TrainConfig, "fine-tune Whisper with LoRA on a manifest"),
    "merge": (MergeConfig, "merge an adapter into its base model (a standalone transformers folder)"),
    "evaluate": (EvaluateConfig, "CER/WER of one or more models on a manifest, side by side"),
    "transcribe": (TranscribeConfig, "transcribe audio files, folders or list files"),
    "serve": (ServeConfig, "serve models and LoRA adapters over OpenAI's audio API (dynamic batching)"),
    "ui": (UIConfig, "the web UI alone: try, compare and talk to the embedded model (and --adapters)"),
    "realtime": (RealtimeConfig, "live transcription from the microphone or a file, locally or on a server"),
    "export": (ExportConfig, "export to faster-whisper, whisper.cpp or openai-whisper, gated on CER/WER parity"),
    "push": (PushConfig, "upload a model folder and its model card to the Hugging Face Hub"),
    "sagemaker": (SageMakerConfig, "launch `whisper-lora train` as an Amazon SageMaker training job (multi-node, spot)"),
    "demo": (DemoConfig, "fine-tune the embedded whisper-base on the Mandarin demo corpus and report"),
}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint) -> None:
    meta = f.metadata
    origin = typing.get_origin(hint)
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if origin in (typing.Union, type(int | None)) else [hint]
    base = inner[0]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    help_text = meta["help"] + (f" (default: {default})" if default not in (None, [], "") else "")
    kwargs: dict = {"help": help_text, "default": argparse.SUPPRESS}
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if typing.get_origin(base) is list:
        kwargs["nargs"] = "*" if meta.get("positional") else "+"
    elif base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    if meta.get("positional"):
        kwargs.setdefault("nargs", "?")
        parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
    else:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-lora", description="Fine-tune Whisper with LoRA, offline, from data to deployment.",
        epilog="Each command takes --config FILE.yaml with the same option names; flags override the file.")
    parser.add_argument("--version", action="version", version=f"whisper-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", dest="_config", metavar="YAML", help="YAML file of options for this command")
        p.add_argument("--verbose", dest="_verbose", action="store_true",
                       help="let libraries (transformers, CTranslate2, peft) print their own warnings")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(p, f, hints[f.name])
    return parser


def _quiet_libraries() -> None:
    """Library chatter that users cannot act on stays out of the terminal (`--verbose` lets it through);
    real errors still show. Only environment and warning filters here: each library reads its setting
    when it is first imported, by the command that needs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CT2_VERBOSE", "-1")  # CTranslate2: errors only (not its float16 notice on every CPU run)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # generation-config deprecations and the like
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-file "Loading weights" bars; ours remain
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command, yaml_path, verbose = args.pop("command"), args.pop("_config", None), args.pop("_verbose", False)
    cls = STAGES[command][0]
    try:
        config = build_config(cls, yaml_path, args)
        if not verbose:
            _quiet_libraries()
        result = importlib.import_module(f"whisper_lora.stages.{command}").run(config)
    except UserError as exc:
        print(f"whisper-lora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("whisper-lora: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
