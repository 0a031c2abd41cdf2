"""One frozen config dataclass per stage. Defaults live here and nowhere else.

Each field is declared once with `option(...)`: its default, its help text and (optionally) its
choices. The CLI builds its flags from these declarations, YAML files use the same names, and every
stage writes the fully resolved config next to its outputs. Precedence: defaults < YAML < flags.
Cross-option checks run once, in `validate()`, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def option(default: Any = None, help: str = "", *, choices: tuple | None = None, positional: bool = False,
           short: str | None = None):
    metadata = {"help": help, "choices": choices, "positional": positional, "short": short}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata)
    return field(default=default, metadata=metadata)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_NEW_TOKENS = 444  # 448-token decoder context minus the 4 prompt tokens


def check_max_new_tokens(value: int) -> None:
    if value > MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS} (Whisper's 448-token context "
                        f"minus the prompt), got {value}")
METRICS = ("auto", "cer", "wer")
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class TrainConfig:
    train_manifest: str = option(None, "training manifest (JSON dict, JSON list or JSON lines)")
    dev_manifest: str | None = option(None, "dev manifest, scored by generation during training; the best "
                                            "checkpoint by its CER/WER becomes the output adapter")
    model: str | None = option(None, "hub id, transformers folder, CTranslate2 folder, or empty for the "
                                     "embedded whisper-base")
    output_dir: str = option("runs/whisper-lora", "folder for the adapter, checkpoints, logs and metrics")
    audio_dir: str | None = option(None, "folder that relative audio paths start from (default: the manifest's folder)")
    language: str | None = option(None, "language of rows that do not name one (code like 'zh' or a name)")
    task: str = option("transcribe", "Whisper task token to train", choices=TASKS)
    lora_r: int = option(32, "LoRA rank")
    lora_alpha: int = option(64, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA path")
    target_modules: list[str] = option(["q_proj", "v_proj"], "module names to adapt, in encoder and decoder")
    freeze_encoder: bool = option(False, "adapt the decoder only; encoder outputs are then computed once per "
                                         "clip and cached on disk, making steps several times cheaper")
    learning_rate: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value (0 = no clipping)")
    warmup_steps: int = option(10, "linear warm-up steps before linear decay")
    epochs: float = option(3.0, "passes over the training set (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "total optimizer steps; overrides --epochs")
    batch_size: int = option(8, "samples per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    precision: str = option("auto", "auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU",
                            choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    eval_steps: int | None = option(None, "evaluate (and checkpoint) every N steps; default: once per epoch")
    save_steps: int | None = option(None, "checkpoint every N steps for --resume; default: --eval-steps")
    keep_checkpoints: int = option(2, "resume checkpoints kept on disk (the best adapter is kept apart)")
    metric: str = option("auto", "dev metric: auto = CER for zh/ja/th/…, WER otherwise", choices=METRICS)
    eval_batch_size: int = option(16, "samples per generation batch when evaluating")
    max_new_tokens: int = option(128, "generation limit per clip when evaluating")
    logging_steps: int = option(5, "log loss and learning rate every N steps")
    num_workers: int = option(0, "DataLoader worker processes for audio decoding and features")
    tensorboard: bool = option(True, "write TensorBoard logs under OUTPUT_DIR/tensorboard")
    seed: int = option(42, "seed for data order, dropout and LoRA initialisation")
    resume: bool = option(False, "continue from the last checkpoint in OUTPUT_DIR")
    overwrite: bool = option(False, "replace an OUTPUT_DIR that holds a different run")

    def validate(self) -> None:
        if not self.train_manifest:
            raise UserError("--train-manifest is required (or train_manifest in the --config YAML)")
        positive = ["lora_r", "lora_alpha", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens",
                    "logging_steps", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite conflict: one continues OUTPUT_DIR, the other replaces it")
        if not self.target_modules:
            raise UserError("--target-modules needs at least one module name")
        if not math.isfinite(self.epochs) or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise UserError("--epochs and --learning-rate must be finite and positive")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        check_max_new_tokens(self.max_new_tokens)


@dataclass(frozen=True)
class MergeConfig:
    adapter: str = option(None, "adapter folder written by `whisper-lora train` (or any peft adapter)", positional=True)
    output_dir: str = option(None, "folder for the standalone transformers model")
    model: str | None = option(None, "base model; default: the one recorded in the adapter")
    overwrite: bool = option(False, "replace OUTPUT_DIR if it exists")

    def validate(self) -> None:
        if not self.adapter:
            raise UserError("merge needs an ADAPTER folder")
        if not self.output_dir:
            raise UserError("--output-dir is required for merge")


@dataclass(frozen=True)
class EvaluateConfig:
    manifest: str = option(None, "manifest to score", positional=True)
    models: list[str] = option(["default"], "models to compare: hub ids, folders, adapter folders; 'default' "
                                            "is the embedded whisper-base")
    audio_dir: str | None = option(None, "folder that relative audio paths start from")
    language: str | None = option(None, "language of rows that do not name one; empty = detect")
    task: str = option("transcribe", "Whisper task", choices=TASKS)
    metric: str = option("auto", "headline metric; both CER and WER are always reported", choices=METRICS)
    batch_size: int = option(16, "clips per generation batch")
    num_beams: int = option(1, "beam size (1 = greedy)")
    max_new_tokens: int = option(128, "generation limit per clip")
    output: str | None = option(None, "JSON file for every hypothesis, reference and score")

    def validate(self) -> None:
        if not self.manifest:
            raise UserError("evaluate needs a MANIFEST")
        if not self.models:
            raise UserError("--models needs at least one model")
        if self.batch_size <= 0 or self.num_beams <= 0 or self.max_new_tokens <= 0:
            raise UserError("--batch-size, --num-beams and --max-new-tokens must be positive")
        check_max_new_tokens(self.max_new_tokens)


OUTPUT_FORMATS = ("txt", "jsonl", "json", "srt", "vtt", "tsv", "all")


@dataclass(frozen=True)
class TranscribeConfig:
    inputs: list[str] = option([], "audio files, folders, or .txt/.lst files listing one audio path per line",
                               positional=True)
    model: str | None = option(None, "hub id, folder, CTranslate2 folder, adapter folder; empty = embedded whisper-base")
    backend: str = option("transformers", "transformers (any model, adapters too) or ct2 (CTranslate2 through "
                                          "faster-whisper; needs a CTranslate2 folder such as `export` writes)",
                          choices=("transformers", "ct2"))
    compute_type: str = option("default", "ct2 backend weight type; default = as stored in the model",
                               choices=("default", "int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32"))
    language: str | None = option(None, "spoken language; empty = detect per file")
    task: str = option("transcribe", "transcribe, or translate into English", choices=TASKS)
    batch_size: int = option(8, "30 s windows decoded together")
    num_beams: int = option(1, "beam size (1 = greedy)")
    vad: bool = option(False, "decode only speech found by Silero VAD (batched; silence yields no text); "
                              "default: sequential 30 s windows with timestamps")
    temperature: list[float] = option([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "temperature ladder: retry a window hotter "
                                      "when it loops or has low confidence (one value = no fallback)")
    compression_ratio_threshold: float | None = option(2.4, "gzip compression ratio above which a window counts "
                                                            "as a repetition loop and is retried")
    log_prob_threshold: float | None = option(-1.0, "average log-probability below which a window is retried")
    no_speech_threshold: float | None = option(0.6, "no-speech probability above which a low-confidence window "
                                                    "is treated as silence and gives no text")
    initial_prompt: str | None = option(None, "text that primes the decoder (spelling, names, style)")
    condition_on_previous_text: bool = option(False, "feed the previous window's text as a prompt (more "
                                                     "context, but a loop can carry over)")
    word_timestamps: bool = option(False, "word-level timestamps from the alignment heads (ct2 backend)")
    compile: bool = option(False, "torch.compile the transformers model (slow start, faster long runs)")
    output_format: str = option("txt", "txt (to stdout: 'path<TAB>text' per file), jsonl (one JSON object per "
                                       "file), or per-file json/srt/vtt/tsv, or all of these with --output-dir",
                                choices=OUTPUT_FORMATS)
    output: str | None = option(None, "write txt/jsonl results to this file instead of standard output")
    output_dir: str | None = option(None, "write one file per input and format here (NAME.txt, NAME.srt, …)")

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("transcribe needs at least one audio file, folder or list file")
        if self.output and self.output_dir:
            raise UserError("--output and --output-dir conflict: one file for all inputs, or one file per input")
        if self.output_format == "jsonl" and self.output_dir:
            raise UserError("--output-format jsonl and --output-dir conflict: jsonl is one stream for all inputs; "
                            "use --output-format json for one file per input")
        if self.output_format == "all" and not self.output_dir:
            raise UserError("--output-format all needs --output-dir")
        if not self.temperature or any(not 0 <= t <= 2 for t in self.temperature):
            raise UserError(f"--temperature values must lie in [0, 2], got {self.temperature}")
        if self.word_timestamps and self.backend != "ct2":
            raise UserError("--word-timestamps needs --backend ct2 (the transformers backend gives segment "
                            "timestamps only)")
        if self.compile and self.backend != "transformers":
            raise UserError("--compile applies to --backend transformers only")
        if self.batch_size <= 0 or self.num_beams <= 0:
            raise UserError("--batch-size and --num-beams must be positive")


CT2_QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ExportConfig:
    model: str = option(None, "adapter folder, merged model folder, or any --model accepted elsewhere", positional=True)
    output_dir: str = option(None, "folder for the exported model (a faster-whisper model folder)")
    format: str = option("ct2", "export format: ct2 = CTranslate2, loadable by faster-whisper", choices=("ct2",))
    quantization: str = option("int8", "CTranslate2 weight type", choices=CT2_QUANTIZATIONS)
    dev_manifest: str | None = option(None, "manifest on which both models are scored for the parity gate")
    audio_dir: str | None = option(None, "folder that relative audio paths in --dev-manifest start from")
    language: str | None = option(None, "language of dev rows that do not name one")
    metric: str = option("auto", "parity metric: auto = CER for zh/ja/th/…, WER otherwise", choices=METRICS)
    max_gap: float = option(0.5, "fail when the export's CER/WER is worse by more than this many points (absolute)")
    parity_check: bool = option(True, "score both models on --dev-manifest and fail on a gap over --max-gap")
    overwrite: bool = option(False, "replace OUTPUT_DIR if it exists")

    def validate(self) -> None:
        if not self.model:
            raise UserError("export needs a MODEL (adapter or model folder)")
        if not self.output_dir:
            raise UserError("--output-dir is required for export")
        if self.parity_check and not self.dev_manifest:
            raise UserError("the parity gate needs --dev-manifest (or pass --no-parity-check to export unchecked)")
        if self.max_gap < 0:
            raise UserError(f"--max-gap must be >= 0, got {self.max_gap}")


@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = option("demo-output", "folder for the fine-tuned adapter, the report and logs")
    model: str | None = option(None, "base model; empty = embedded whisper-base")
    corpus_dir: str | None = option(None, "demo corpus folder (default: the one shipped in the repo)")
    english_dir: str | None = option(None, "English clips with transcripts.json for the forgetting check "
                                           "(default: ../shared/data/speech-en when present)")
    epochs: float = option(1.0, "passes over the 320 training sentences")
    batch_size: int = option(8, "training batch size")
    learning_rate: float = option(1e-3, "peak learning rate")
    precision: str = option("auto", "training precision", choices=PRECISIONS)
    overwrite: bool = option(True, "replace a previous demo run in OUTPUT_DIR")

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise UserError("--epochs and --batch-size must be positive")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error that names the option."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0], name)
    try:
        if origin is list:
            (item,) = typing.get_args(annotation)
            values = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return [_coerce(v, item, name) for v in values]
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return annotation(value)
    except (TypeError, ValueError):
        raise UserError(f"option {name}: cannot read {value!r} as {getattr(annotation, '__name__', annotation)}") from None


def build_config(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None):
    """Defaults < YAML file < command-line overrides, type-checked, then `validate()`d."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise UserError("config file not found", path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise UserError(f"invalid YAML{f' at line {mark.line + 1}' if mark else ''}", path) from None
        if not isinstance(loaded, dict):
            raise UserError("config file must be a mapping of option: value", path)
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise UserError(f"unknown option {key!r} for {cls.__name__}", path)
            values[name] = value
    values.update(overrides or {})
    for name, choice_field in fields.items():
        if name in values:
            optional = type(None) in typing.get_args(hints[name])
            if values[name] is None and not optional and choice_field.default is not None:
                raise UserError(f"option {name.replace('_', '-')} needs a value")
            values[name] = _coerce(values[name], hints[name], f"--{name.replace('_', '-')}")
            choices = choice_field.metadata.get("choices")
            if choices and values[name] not in choices:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {values[name]!r}")
    config = cls(**values)
    config.validate()
    return config


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))


def load_saved_config(cls, path: str | Path):
    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


RESOLVED_CONFIG = "config.yaml"  # every run's fully resolved config, next to its outputs
_RUN_CONTROL_FIELDS = {"resume", "overwrite"}  # may differ between the first run and its resumption


def clear_output_dir(out: Path, overwrite: bool, what: str) -> None:
    """Refuse a non-empty OUTPUT_DIR (or a file in its place) unless --overwrite, which removes it."""
    import shutil

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{what}; pass --overwrite to replace it", out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def prepare_run_dir(config, output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create OUTPUT_DIR, refusing to mix two different runs in one folder."""
    import shutil

    out = Path(output_dir)
    saved = out / RESOLVED_CONFIG
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not saved.is_file():
            raise UserError("output folder is not empty and holds no whisper-lora run; "
                            "choose another --output-dir or pass --overwrite", out)
        else:
            previous = yaml.safe_load(saved.read_text()) or {}
            current = dataclasses.asdict(config)
            changed = sorted(k for k in current if k not in _RUN_CONTROL_FIELDS and previous.get(k) != current[k])
            if changed:
                raise UserError(f"output folder holds a different run (changed: {', '.join(changed)}); "
                                "pass --overwrite to replace it or choose another --output-dir", out)
            if not resume:
                raise UserError("output folder already holds this run; pass --resume to continue it "
                                "or --overwrite to start again", out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, saved)
    return out
