"""`whisper-lora train`: LoRA fine-tuning with evaluation by generation and exact resume.

A hand-written loop on top of accelerate (rather than Seq2SeqTrainer) because we need things the
Trainer does not do well: labels padded per batch, bad samples counted instead of crashing, CER/WER
with our normaliser for best-checkpoint selection, adapter-only checkpoints (a few MB instead of the
whole model) and a resume that lands on exactly the same step. accelerate still provides device
placement, mixed precision, gradient accumulation and DDP/DeepSpeed under torchrun.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..allocator import return_freed_blocks_to_os
from ..checkpoint import (TrainState, begin_checkpoint, checkpoint_partial, finish_checkpoint, list_checkpoints,
                          load_checkpoint, read_state, save_checkpoint)
from ..config import TrainConfig
from ..audio_ctx import ACFT_FLOOR_SECONDS, encoder_frames
from ..constants import CHUNK_SECONDS, FRAMES_PER_SECOND
from ..rundir import ADAPTER_DIR, LAST_ADAPTER_DIR, METRICS_FILE, SKIPPED_FILE, prepare_run_dir
from ..data import (LABEL_PAD, CachedEncoderDataset, EncoderCache, LabelBuilder, PackedDataset, SkippedSample,
                    SpeechDataset, build_labels, collate, sample_seconds, shard_item_maker)
from ..features import FeatureCache
from ..shards import ShardStream, is_shard_dir
from ..errors import UserError
from ..lora import AdapterSpec, adapter_step_hook, apply_adapter, check_quantisation, save_adapter
from ..manifest import check_audio_exists, language_code, read_manifest
from ..models import load_model, public_name, resolve_model
from ..decode import GREEDY, TransformersBackend
from ..text import default_metric
from ..scoring import ModelScore, load_clips, score_model, score_rows

STREAMING_EVAL_STEPS = 1000  # default evaluation interval when an epoch's length is unknown


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same order.

    With replay, indices `size .. size+replay-1` are retain samples: each epoch mixes in as many of
    them as make `replay_ratio` of the epoch, cycling through the retain set across epochs.
    """

    def __init__(self, size: int, seed: int, replay: int = 0, replay_ratio: float = 0.0):
        self.size, self.seed, self.epoch, self.replay = size, seed, 0, replay
        self.replay_per_epoch = round(size * replay_ratio / (1 - replay_ratio)) if replay else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = list(range(self.size))
        if self.replay_per_epoch:
            cycle = torch.Generator().manual_seed(self.seed)
            retain = torch.randperm(self.replay, generator=cycle).tolist()
            first = self.epoch * self.replay_per_epoch
            order += [self.size + retain[(first + k) % self.replay] for k in range(self.replay_per_epoch)]
        return iter([order[i] for i in torch.randperm(len(order), generator=generator).tolist()])

    def __len__(self) -> int:
        return self.size + self.replay_per_epoch


class SampleLog:
    """`epoch<TAB>sample id` of every consumed sample; on resume, cut back to what the checkpoint had seen."""

    def __init__(self, path: Path, keep_lines: int):
        kept = path.read_text(encoding="utf-8").splitlines()[:keep_lines] if path.is_file() and keep_lines else []
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file, self.lines = open(path, "a", encoding="utf-8"), len(kept)

    def write(self, epoch: int, ids: list[str]) -> None:
        self.file.writelines(f"{epoch}\t{i}\n" for i in ids)
        self.lines += len(ids)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def resolve_precision(precision: str) -> str:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return {"fp32": "no"}.get(precision, precision)


def peak_memory_mb(device) -> float:
    """Peak accelerator memory on GPUs; on CPU the process's peak resident memory."""
    if torch.cuda.is_available() and getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def log_predictions(accelerator, scores: ModelScore, count: int, step: int) -> None:
    """A few dev transcripts next to their references, so a metric can be read as text."""
    if not count or not accelerator.is_main_process:
        return
    rows = [[r["audio"].rsplit("/", 1)[-1], r["reference"], r["hypothesis"]] for r in scores.rows[:count]]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table("dev/predictions", columns=["audio", "reference", "hypothesis"], data=rows, step=step)
        elif tracker.name == "tensorboard":
            table = "| audio | reference | hypothesis |\n|---|---|---|\n" + "".join(
                f"| {a} | {r} | {h} |\n" for a, r, h in rows)
            tracker.writer.add_text("dev/predictions", table, step)


def read_retain_set(config: TrainConfig) -> list:
    """The forgetting-guard set. Its rows must name their language: it is usually not --language."""
    if not config.retain_manifest:
        return []
    samples = read_manifest(config.retain_manifest, config.audio_dir)
    check_audio_exists(samples, config.retain_manifest)
    unnamed = [s for s in samples if not s.language]
    if unnamed:
        raise UserError(f"--retain-manifest rows need a 'language' field ({len(unnamed)} lack one, first "
                        f"{unnamed[0].source.rsplit(':', 1)[-1]}): the retain set is usually in another language "
                        "than --language", config.retain_manifest)
    return samples


def check_retain_labels(samples: list, processor, generation_config, config: TrainConfig, builder) -> list:
    if not getattr(generation_config, "is_multilingual", False):
        other = sorted({s.language for s in samples} - {"en"})
        if other:
            raise UserError(f"--retain-manifest and --model conflict: the model is English-only, the retain set "
                            f"is in {', '.join(other)}", config.retain_manifest)
    try:
        labels, _ = build_labels(samples, processor, generation_config, None, config.task, builder)
    except UserError as exc:
        raise UserError(f"--retain-manifest and --model conflict: {exc}", config.retain_manifest) from None
    return labels


def training_loss(model, base_model, inputs: dict, labels: torch.Tensor, distilled: torch.Tensor | None) -> torch.Tensor:
    """Token-mean cross-entropy, except that the `distilled` rows' tokens use KL(base || model).

    The base model is the same network with its adapters switched off, so distilling needs no second
    copy of the weights, only a no-grad forward pass of the replayed rows. Soft targets pin the whole
    distribution the base model predicts (learning without forgetting); replaying hard labels, even
    the base model's own transcripts, only pins their argmax. Both terms are summed per token and
    divided by all label tokens, so a replayed token weighs the same under either loss.
    """
    outputs = model(**inputs, labels=labels)
    if distilled is None or not distilled.any():
        return outputs.loss
    log_probs = outputs.logits.float().log_softmax(-1)
    per_token = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad(), base_model.disable_adapter():
        rows = {k: tuple(t[distilled] for t in v) if isinstance(v, tuple) else v[distilled] for k, v in inputs.items()}
        teacher = base_model(**rows, labels=labels[distilled])
        teacher_log_probs = teacher.logits.float().log_softmax(-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs[distilled])).sum(-1)
    per_token = per_token.masked_scatter(distilled.unsqueeze(-1).expand_as(per_token), kl)
    counted = labels != LABEL_PAD
    return (per_token * counted).sum() / counted.sum()


def acft_context(seconds: list[float]) -> int:
    """The student's encoder frames for a batch: `--audio-ctx` with a floor drawn from 0-30 s, so from the
    longest clip plus 1 s (whole seconds) up to Whisper's 30 s. Drawn from torch's generator, which each
    micro-batch seeds from its position in training: a resumed run draws the same contexts."""
    content = math.ceil(max(seconds) * FRAMES_PER_SECOND)
    return encoder_frames(content, float(torch.rand(()) * CHUNK_SECONDS))


def acft_teacher(config) -> str:
    """base or self: with labels in the loss the adapter learns a domain the base model reads badly (the
    demo's Mandarin: the base as teacher pulled the adapter's test CER from 5.4% to 18.2%)."""
    return config.acft_teacher if config.acft_teacher != "auto" else "base" if config.acft_weight == 1 else "self"


def acft_loss(model, base_model, features: torch.Tensor, labels: torch.Tensor, seconds: list[float],
              weight: float, teacher_kind: str = "base") -> torch.Tensor:
    """Audio-context fine-tuning (FUTO's whisper-acft), as a LoRA objective.

    The teacher reads the batch at Whisper's 30 s, without gradient: the base model (adapters off,
    `teacher_kind` "base") or the adapted model itself in eval mode ("self"); the student is the adapted model reading the same audio at a shorter encoder context, drawn per batch as
    `--audio-ctx` would cut it with a random floor (so from the audio plus 1 s up to 30 s), through the
    encoder pass inference runs (kv.Network: positional embeddings sliced). The loss pulls the student's
    next-token distributions onto the teacher's along the label tokens (KL, per token), mixed with the
    usual cross-entropy: (1 - weight) * CE + weight * KL. With weight 1 the labels only pick the tokens
    compared: any transcript-like text will do, the teacher says what each next token should be.
    """
    from ..decode.kv import Network

    network = Network(base_model)
    encoded = network.encode(features[..., :acft_context(seconds)].to(network.dtype))
    student = model(encoder_outputs=(encoded,), labels=labels)
    training = base_model.training
    with torch.no_grad(), (base_model.disable_adapter() if teacher_kind == "base" else nullcontext()):
        base_model.eval()  # no dropout in the teacher's reading
        teacher = base_model(input_features=features, labels=labels).logits.float().log_softmax(-1)
        base_model.train(training)
    log_probs = student.logits.float().log_softmax(-1)
    counted = labels != LABEL_PAD
    kl = ((teacher.exp() * (teacher - log_probs)).sum(-1) * counted).sum() / counted.sum()
    return kl if weight == 1 else (1 - weight) * student.loss + weight * kl


def adapter_decoding(config: TrainConfig) -> dict | None:
    """What the adapter records about how to read it: an --acft adapter reads short contexts."""
    return {"audio_ctx": ACFT_FLOOR_SECONDS, "trained_with": "acft", "acft_weight": config.acft_weight,
            "acft_teacher": acft_teacher(config)} if config.acft else None


def evaluate_dev(accelerator, model, processor, dev_clips, config: TrainConfig, language: str | None) -> ModelScore:
    """Score the dev set by generation with `model` (unwrapped), sharded across processes so no rank idles
    into a timeout."""
    from accelerate.utils import gather_object

    backend = TransformersBackend(model, processor, device=str(accelerator.device))
    with accelerator.split_between_processes(dev_clips) as mine:
        options = replace(GREEDY, task=config.task, max_new_tokens=config.max_new_tokens)
        mine_scored = score_model("dev", backend, mine, language, options, config.eval_batch_size, progress=False)
    model.train()
    return score_rows("dev", gather_object(mine_scored.rows))


@dataclass(frozen=True)
class Inputs:
    """What the manifests and options say, read before any process or model exists."""
    language: str | None
    metric: str
    streaming: bool  # the training set is a folder of shards, read as a stream
    train_samples: list
    dev_samples: list
    retain_samples: list
    augmenter: object
    feature_cache: FeatureCache | None
    quantization: str | None
    trackers: list[str]


@dataclass(frozen=True)
class Base:
    model: object
    processor: object
    spec: str  # the base adapters record: one that loads anywhere


@dataclass(frozen=True)
class Data:
    """The training data as batches, the evaluation sets, and the step counts they imply."""
    dataset: object
    loader: object
    sampler: EpochShuffleSampler | None
    streamed: bool  # read from shards: each rank its own, the epoch's length unknown
    train_rows: int  # usable training samples; dataset indices from here on are replayed retain samples
    dev_clips: list
    retain_clips: list
    retain_metric: str | None
    skipped: list
    total_steps: int
    eval_steps: int
    save_steps: int


@dataclass
class Prepared:
    """The trainable model, its optimizer and schedule, and the loader, as accelerate wrapped them."""
    model: object
    optimizer: object
    scheduler: object
    loader: object
    trainable: list


@dataclass
class Position:
    """Where training stands: the loop's state, this rank's read position in streamed shards, the sample log."""
    state: TrainState
    stream: dict
    sample_log: SampleLog | None


@dataclass
class Meter:
    """The current logging interval."""
    started: float = 0.0
    samples_at_start: int = 0
    running_loss: float = 0.0
    loss_count: int = 0
    grad_norm: object = None


@dataclass
class Loop:
    """The run as the step loop sees it: what the setup phases returned, and the loop's meter."""
    config: TrainConfig
    accelerator: object
    out: Path
    inputs: Inputs
    base: Base
    data: Data
    parts: Prepared
    position: Position
    meter: Meter = field(default_factory=Meter)


def run(config: TrainConfig) -> dict:
    inputs = load_data(config)
    accelerator, out = start_processes(config, inputs.trackers)
    base = build_model(config, accelerator, inputs.quantization)
    data = build_datasets(config, inputs, accelerator, base, out)
    parts = build_optimizer(config, accelerator, base.model, data)
    position = restore(config, accelerator, parts, data, out, inputs.trackers)
    loop = Loop(config, accelerator, out, inputs, base, data, parts, position)
    del parts  # the loop holds the only reference to the DDP wrapper: save() drops it before the process group
    from tqdm.auto import tqdm

    state = position.state
    progress = tqdm(total=data.total_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    loop.meter.started, loop.meter.samples_at_start = time.time(), state.samples_seen
    while state.step < data.total_steps:
        for batch in epoch_batches(loop):
            if not train_step(loop, batch):
                continue  # gradients still accumulating
            progress.update(1)
            log_step(loop, progress)
            dev = evaluate(loop, progress)
            if dev is not None or state.step % data.save_steps == 0 or state.step == data.total_steps:
                checkpoint(loop, dev)
            if state.step >= data.total_steps:
                break
        else:
            next_epoch(loop)
    progress.close()
    return save(loop)


# ---- the setup phases, in the order `run` calls them: each returns what it built -------------------------

def load_data(config: TrainConfig) -> Inputs:
    """Manifests, the forgetting guard's set, augmentation and the feature cache; nothing heavy yet."""
    language = language_code(config.language, "--language") if config.language else None
    streaming = is_shard_dir(config.train_manifest)
    train_samples = [] if streaming else read_manifest(config.train_manifest, config.audio_dir, allow_empty_text=True)
    check_audio_exists(train_samples, config.train_manifest)
    dev_samples = read_manifest(config.dev_manifest, config.audio_dir) if config.dev_manifest else []
    check_audio_exists(dev_samples, config.dev_manifest)
    retain_samples = read_retain_set(config)
    metric = config.metric if config.metric != "auto" else default_metric(
        language or next((s.language for s in train_samples + dev_samples if s.language), None))
    augmenter = None
    if config.augment:
        from ..augment import Augmenter, load_augment_config

        augmenter = Augmenter(load_augment_config(config.augment), config.seed)
    feature_cache = FeatureCache(config.feature_cache) if config.feature_cache else None
    quantization = check_quantisation(AdapterSpec.of(config))  # fails fast: no bitsandbytes, or too old
    if feature_cache is not None and augmenter is not None and augmenter.changes_audio:
        raise UserError("--augment changes the waveform (speed/volume/noise/shift) but --feature-cache skips "
                        "decoding it; keep only spec_augment in the YAML, or drop --feature-cache", config.augment)
    trackers = [name for name, wanted in (("tensorboard", config.tensorboard), ("wandb", config.wandb)) if wanted]
    if config.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install 'whisper-lora[wandb]'") from None
    return Inputs(language, metric, streaming, train_samples, dev_samples, retain_samples, augmenter, feature_cache,
                  quantization, trackers)


def start_processes(config: TrainConfig, trackers: list[str]) -> tuple[object, Path]:
    """The accelerator (DDP or DeepSpeed across the launched processes, or one process) and the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun / accelerate launch
    deepspeed_plugin = None
    if config.deepspeed:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, over gloo
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install 'whisper-lora[deepspeed]'") from None
        if not torch.cuda.is_available():
            skip_deepspeed_shm_build()
        from accelerate.utils import DeepSpeedPlugin

        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=config.deepspeed)
        # Known here, not from a prepared DataLoader (streaming loaders are not prepared).
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        deepspeed_plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    # Without cpu=True, accelerate on a machine with no GPU ignores torchrun's environment and every
    # process trains alone on all the data: correct-looking, N times slower, and the ranks never meet.
    # With it, accelerate never starts DeepSpeed, which brings its own CPU accelerator instead.
    cpu = launched > 1 and not torch.cuda.is_available() and deepspeed_plugin is None
    handlers = []
    if deepspeed_plugin is not None and not torch.cuda.is_available():
        # accelerate picks no backend for DeepSpeed without a GPU and then counts one process; gloo named
        # here reaches deepspeed.init_distributed, and the world size is read back from it.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(cpu=cpu, deepspeed_plugin=deepspeed_plugin, kwargs_handlers=handlers,
                              mixed_precision=resolve_precision(config.precision),
                              gradient_accumulation_steps=config.grad_accum, log_with=trackers or None,
                              project_dir=str(Path(config.output_dir) / "tensorboard"))  # TensorBoard's folder
    if config.low_cpu_memory and accelerator.device.type == "cpu" and not return_freed_blocks_to_os():
        accelerator.print("--low-cpu-memory: this platform's allocator is not glibc; left as it is")
    if accelerator.num_processes != launched:
        raise UserError(f"launched as {launched} processes but the distributed backend joined "
                        f"{accelerator.num_processes}; check the launcher's settings (MASTER_ADDR, ports)")
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        prepare_run_dir(config, out, resume=config.resume, overwrite=config.overwrite)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    return accelerator, out


@contextmanager
def whole_weights_under_zero3(accelerator):
    """Load the model whole on each rank even under ZeRO-3; DeepSpeed partitions it when it is prepared.
    transformers otherwise builds it inside zero.Init, where Whisper's weight initialisation reads the
    shape of an already partitioned positional embedding and fails (transformers 5). The cost is the
    model's size per process for the moment before partitioning, small for Whisper. (accelerate's own
    `zero3_init_context_manager(enable=False)` leaves transformers' ZeRO-3 switch on.)"""
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    active = getattr(plugin, "dschf", None)  # the HfDeepSpeedConfig accelerate keeps alive for transformers
    if not is_deepspeed_zero3_enabled() or active is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(active)


def build_model(config: TrainConfig, accelerator, quantization: str | None) -> Base:
    with accelerator.main_process_first():  # one rank converts/caches the model, the others reuse it
        resolved = resolve_model(config.model)
    if resolved.adapter is not None:
        raise UserError("--model is an adapter; train on its base model, or merge it first with "
                        "`whisper-lora merge`", config.model)
    with whole_weights_under_zero3(accelerator):
        model, processor = load_model(resolved, device=accelerator.device if quantization else "cpu",
                                      quantization=quantization)
    return Base(model, processor, public_name(resolved.spec))


def build_datasets(config: TrainConfig, inputs: Inputs, accelerator, base: Base, out: Path) -> Data:
    """Labels, dev and retain clips, the training dataset (in memory or streamed), its loader and the
    step counts; bad samples are counted here, never swapped for others."""
    processor, generation_config = base.processor, base.model.generation_config
    language = inputs.language
    builder = LabelBuilder(processor.tokenizer, generation_config, language, config.task, config.timestamps,
                           config.timestamp_fraction, config.seed)
    labels, skipped = build_labels(inputs.train_samples, processor, generation_config, language, config.task, builder)
    if inputs.dev_samples:  # fail now, not after the first epoch, if dev rows lack a usable language
        build_labels(inputs.dev_samples, processor, generation_config, language, config.task)
    dev_clips, dev_problems = load_clips(inputs.dev_samples)  # decoded once; unreadable clips reported, not scored
    skipped += [SkippedSample(-1, config.dev_manifest, problem) for problem in dev_problems]
    retain_labels = check_retain_labels(inputs.retain_samples, processor, generation_config, config, builder)
    retain_clips, retain_problems = load_clips(inputs.retain_samples)
    skipped += [SkippedSample(-1, config.retain_manifest, problem) for problem in retain_problems]
    retain_metric = default_metric(inputs.retain_samples[0].language) if inputs.retain_samples else None
    usable, replayable = [], []
    if inputs.streaming:
        dataset = ShardStream(config.train_manifest, shard_item_maker(processor, builder, inputs.augmenter),
                              config.seed, config.shuffle_buffer, accelerator.process_index,
                              accelerator.num_processes, config.num_workers)
    else:
        usable = [s for s, label in zip(inputs.train_samples, labels) if label is not None]
        replayable = [s for s, label in zip(inputs.retain_samples, retain_labels) if label is not None] \
            if config.replay_ratio else []
        dataset = SpeechDataset(usable + replayable, processor, builder, inputs.augmenter, inputs.feature_cache)
        if not usable:
            raise UserError("no usable training samples (see the reasons above)", config.train_manifest)
    if config.pack:
        seconds = [sample_seconds(sample) for sample in dataset.samples]
        tokens = [builder.packed_tokens(sample) for sample in dataset.samples]
        order = EpochShuffleSampler(len(usable), config.seed, replay=len(replayable), replay_ratio=config.replay_ratio)

        def order_for_epoch(epoch: int) -> list[int]:
            order.set_epoch(epoch)
            return list(order)

        speed = inputs.augmenter.config.speed if inputs.augmenter is not None else None
        # planned so that slowed-down speech still fits: the slowest speed factor stretches a window most
        budget = CHUNK_SECONDS * min(1.0, *speed.factors) if speed else CHUNK_SECONDS
        dataset = PackedDataset(dataset, order_for_epoch, seconds, tokens, config.seed, budget)
    # --acft reads the audio at shortened contexts: it needs the features, not a 30 s encoder output
    if config.freeze_encoder and not inputs.streaming and inputs.augmenter is None and not config.pack \
            and not config.acft:
        cache = EncoderCache(out / f"encoder_cache.rank{accelerator.process_index}.npy", dataset,
                             base.model.to(accelerator.device).eval(), accelerator.device, config.eval_batch_size,
                             progress=accelerator.is_local_main_process)
        dataset = CachedEncoderDataset(dataset, cache)
    sampler = None
    if inputs.streaming:
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                                             num_workers=config.num_workers)
        total_steps = config.max_steps
        eval_steps = config.eval_steps or min(total_steps, STREAMING_EVAL_STEPS)
    else:
        if not config.pack:  # a packing plan is already in the epoch's order
            sampler = EpochShuffleSampler(len(usable), config.seed, replay=len(replayable),
                                          replay_ratio=config.replay_ratio)
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=config.num_workers)
        steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.grad_accum)
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        eval_steps = config.eval_steps or steps_per_epoch
    return Data(dataset, loader, sampler, inputs.streaming, len(usable), dev_clips, retain_clips, retain_metric,
                skipped, total_steps, eval_steps, config.save_steps or eval_steps)


def build_optimizer(config: TrainConfig, accelerator, model, data: Data) -> Prepared:
    """The adapter (or the whole model for `full`), AdamW, the warm-up schedule, all handed to accelerate."""
    from transformers import get_linear_schedule_with_warmup

    model.train()
    model = apply_adapter(model, AdapterSpec.of(config), data.total_steps)  # LoRA/DoRA/AdaLoRA, or all weights
    if config.method == "full" and config.learning_rate > 1e-4:
        accelerator.print(f"warning: --learning-rate {config.learning_rate:g} suits LoRA; full fine-tuning of "
                          "Whisper usually uses about 1e-5 (5e-6 to 4e-5), and rates this high wreck the "
                          "pretrained weights")
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # LoRA + checkpointing: inputs must carry grad (transformers 5)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    # accelerate steps the scheduler once per process for each optimizer step, so count in those units.
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, data.total_steps) * n,
                                                data.total_steps * n)
    loader = data.loader
    if data.streamed:  # each rank reads its own shards, so the loader is not handed to accelerate to split
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return Prepared(model, optimizer, scheduler, loader, [p for p in model.parameters() if p.requires_grad])


def restore(config: TrainConfig, accelerator, parts: Prepared, data: Data, out: Path, trackers: list[str]) -> Position:
    """The last checkpoint with --resume (step, optimizer, schedule, data position), trackers, the sample log."""
    state = TrainState(skipped=[asdict(s) for s in data.skipped], num_processes=accelerator.num_processes)
    checkpoints = list_checkpoints(out)
    if config.resume and checkpoints:
        last = checkpoints[-1]
        written_by = read_state(last).num_processes
        if written_by != accelerator.num_processes:
            raise UserError(f"checkpoint was written by {written_by} processes, this run has "
                            f"{accelerator.num_processes}; resume with the same launch", last)
        deepspeed_written = (last / "deepspeed").is_dir()
        if deepspeed_written != (deepspeed_stage(accelerator) is not None):
            raise UserError(f"checkpoint was written {'with' if deepspeed_written else 'without'} --deepspeed; "
                            "resume with the same setting", last)
        if deepspeed_written:
            accelerator.load_state(str(last / "deepspeed"), load_module_strict=False)  # frozen weights not saved
            state = read_state(last)
        else:
            state = load_checkpoint(last, accelerator.unwrap_model(parts.model), parts.optimizer, parts.scheduler,
                                    accelerator.scaler)
        accelerator.print(f"resuming from {last} (step {state.step}/{data.total_steps})")
    rank = accelerator.process_index
    stream = state.streams[rank] if len(state.streams) > rank else {"epoch": 0, "consumed": {}}
    stream["consumed"] = {int(k): v for k, v in stream["consumed"].items()}  # JSON made the keys strings
    sample_log = None
    if config.sample_log:
        logged = state.ids_logged[rank] if len(state.ids_logged) > rank else 0
        sample_log = SampleLog(out / f"samples.rank{rank}.txt", logged)
    if trackers:
        accelerator.init_trackers(
            config.wandb_project or os.environ.get("WANDB_PROJECT", "whisper-lora"),
            config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()},
            init_kwargs={"wandb": {"name": config.run_name or out.resolve().name, "dir": str(out)},
                         "tensorboard": {}})
    for s in data.skipped:
        accelerator.print(f"skipping {s.source}: {s.reason}")
    return Position(state, stream, sample_log)


# ---- the step loop ------------------------------------------------------------------------------------

def epoch_batches(loop: Loop):
    """This epoch's batches, the part already trained skipped on resume."""
    state = loop.position.state
    if loop.data.streamed:
        stream = loop.position.stream
        loop.data.dataset.epoch, loop.data.dataset.skip = stream["epoch"], dict(stream["consumed"])
        return loop.parts.loader
    if hasattr(loop.parts.loader, "set_epoch"):
        loop.parts.loader.set_epoch(state.epoch)
    if loop.data.sampler is not None:
        loop.data.sampler.set_epoch(state.epoch)
    loop.data.dataset.set_epoch(state.epoch)
    if state.batches_in_epoch:
        return loop.accelerator.skip_first_batches(loop.parts.loader, state.batches_in_epoch)
    return loop.parts.loader


def next_epoch(loop: Loop) -> None:
    loop.position.state.epoch += 1
    loop.position.state.batches_in_epoch = 0
    loop.position.stream = {"epoch": loop.position.stream["epoch"] + 1, "consumed": {}}


def train_step(loop: Loop, batch: dict) -> bool:
    """Forward and backward one micro-batch; True when that completed an optimizer step."""
    config, accelerator, model, meter = loop.config, loop.accelerator, loop.parts.model, loop.meter
    state, stream = loop.position.state, loop.position.stream
    # Dropout masks depend only on the position in training, not on how many RNG draws came
    # before (DataLoader iterators draw one each), so a resumed run repeats them exactly.
    torch.manual_seed(config.seed * 1_000_003 + state.epoch * 100_003 + state.batches_in_epoch)
    state.batches_in_epoch += 1
    for worker in batch["workers"]:
        stream["consumed"][worker] = stream["consumed"].get(worker, 0) + 1
    if loop.position.sample_log is not None:
        loop.position.sample_log.write(stream["epoch"] if loop.data.streamed else state.epoch, batch["ids"])
    for s in batch["skipped"]:
        if asdict(s) not in state.skipped:  # each bad sample listed once, not once per epoch
            state.skipped.append(asdict(s))
            accelerator.print(f"skipping {s.reason}")
    if config.pack:  # utterances, not windows: ranks' windows hold different numbers of them. Every rank
        # joins this sum, also one whose micro-batch was all bad.
        state.samples_seen += int(accelerator.reduce(torch.tensor(batch["count"], device=accelerator.device),
                                                     "sum").item())
    with accelerator.accumulate(model):
        if "labels" in batch:
            labels = batch["labels"].to(accelerator.device)
            if "encoder_hidden" in batch:
                inputs = {"encoder_outputs": (batch["encoder_hidden"].to(accelerator.device, torch.float32),)}
            else:
                inputs = {"input_features": batch["input_features"].to(accelerator.device)}
            distilled = torch.tensor([i >= loop.data.train_rows for i in batch["index"]], device=accelerator.device) \
                if config.replay_loss == "distill" else None
            if config.acft:
                # the student's encoder pass runs outside the wrapped forward: under the same autocast
                with accelerator.autocast():
                    loss = acft_loss(model, accelerator.unwrap_model(model), inputs["input_features"], labels,
                                     batch["seconds"], config.acft_weight, acft_teacher(config))
            else:
                loss = training_loss(model, accelerator.unwrap_model(model), inputs, labels, distilled)
            accelerator.backward(loss)
            meter.running_loss, meter.loss_count = meter.running_loss + loss.item(), meter.loss_count + 1
            if not config.pack:
                state.samples_seen += len(batch["index"]) * accelerator.num_processes
        else:
            # Every sample of this micro-batch was bad. Under DDP the other ranks still
            # all-reduce gradients, so join in with zeros instead of skipping backward (a hang).
            accelerator.backward(sum((p * 0).sum() for p in loop.parts.trainable))
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            loop.meter.grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        loop.parts.optimizer.step()
        loop.parts.scheduler.step()
        # AdaLoRA reallocates ranks from this step's gradients, so between step and zero_grad; only
        # on real optimizer steps, and not after an fp16 overflow (inf sensitivities). Gradients are
        # all-reduced, so every rank prunes identically.
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            adapter_step_hook(accelerator.unwrap_model(model), state.step + 1)
        loop.parts.optimizer.zero_grad()
    if not accelerator.sync_gradients:
        return False
    state.step += 1
    return True


def log_step(loop: Loop, progress) -> None:
    config, accelerator, state = loop.config, loop.accelerator, loop.position.state
    if state.step % config.logging_steps and state.step != loop.data.total_steps:
        return
    # The loss of every rank, averaged: what a single process with the global batch would log.
    mean_loss = accelerator.reduce(torch.tensor([loop.meter.running_loss / max(1, loop.meter.loss_count)],
                                                device=accelerator.device), "mean").item()
    elapsed = time.time() - loop.meter.started
    record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss,
              "learning_rate": loop.parts.scheduler.get_last_lr()[0],
              "samples_per_second": (state.samples_seen - loop.meter.samples_at_start) / elapsed,
              "elapsed_s": round(elapsed, 3)}
    if config.max_grad_norm > 0 and loop.meter.grad_norm is not None:  # DeepSpeed clips inside its engine
        record["grad_norm"] = float(loop.meter.grad_norm)
    record["memory_mb"] = peak_memory_mb(accelerator.device)
    loop.meter.running_loss, loop.meter.loss_count = 0.0, 0
    state.history.append(record)
    accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step=state.step)
    progress.set_postfix(loss=f"{record['loss']:.3f}")


def evaluate(loop: Loop, progress) -> dict | None:
    """The dev set (and the forgetting guard's set) by generation, when due; the dev scores, or None."""
    config, accelerator, state = loop.config, loop.accelerator, loop.position.state
    due = state.step % loop.data.eval_steps == 0 or state.step == loop.data.total_steps
    if not (loop.data.dev_clips or loop.data.retain_clips) or not due:
        return None
    record, dev = {"step": state.step}, None
    model = generation_model(loop)
    if loop.data.dev_clips:
        scores = evaluate_dev(accelerator, model, loop.base.processor, loop.data.dev_clips, config,
                              loop.inputs.language)
        dev = {"metric": getattr(scores, loop.inputs.metric), "cer": scores.cer, "wer": scores.wer}
        record.update({f"dev_{loop.inputs.metric}": dev["metric"], "dev_cer": dev["cer"], "dev_wer": dev["wer"]})
        log_predictions(accelerator, scores, config.log_predictions, state.step)
        progress.write(f"step {state.step}: dev {loop.inputs.metric.upper()} {dev['metric']:.2%}")
    if loop.data.retain_clips:  # the forgetting guard, reported beside the main metric
        kept = evaluate_dev(accelerator, model, loop.base.processor, loop.data.retain_clips, config, None)
        record[f"retain_{loop.data.retain_metric}"] = getattr(kept, loop.data.retain_metric)
        progress.write(f"step {state.step}: retain {loop.data.retain_metric.upper()} "
                       f"{record[f'retain_{loop.data.retain_metric}']:.2%}")
    state.history.append(record)
    accelerator.log({k.replace("_", "/", 1): v for k, v in record.items() if k != "step"}, step=state.step)
    return dev


def checkpoint(loop: Loop, dev: dict | None) -> None:
    """The best adapter (by the dev metric) and a resumable checkpoint, written by rank 0 with every rank's
    read position."""
    from accelerate.utils import gather_object

    accelerator, state = loop.accelerator, loop.position.state
    peft_model = accelerator.unwrap_model(loop.parts.model)
    if loop.position.sample_log is not None:
        loop.position.sample_log.flush()
    state.streams = gather_object([loop.position.stream]) if loop.data.streamed else []
    state.ids_logged = gather_object([loop.position.sample_log.lines if loop.position.sample_log is not None else 0])
    improved = dev is not None and (state.best_metric is None or dev["metric"] < state.best_metric)
    if improved or not loop.data.dev_clips:
        if dev is not None:
            state.best_metric, state.best_step = dev["metric"], state.step
        with whole_parameters(loop):
            if accelerator.is_main_process:
                save_adapter(peft_model, loop.base.processor, loop.out / ADAPTER_DIR, loop.base.spec,
                             adapter_decoding(loop.config))
    if deepspeed_stage(accelerator) is not None:
        # The optimizer state is sharded across the ranks: every rank writes its part (DeepSpeed's own
        # checkpoint), rank 0 the loop's state, and the folder becomes final only when all have.
        partial = begin_checkpoint(loop.out, state.step) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        # the base model's frozen weights are on disk already: the adapter and optimizer state suffice
        accelerator.save_state(str(checkpoint_partial(loop.out, state.step) / "deepspeed"),
                               exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(loop.out, partial, state, loop.config.keep_checkpoints)
    elif accelerator.is_main_process:
        save_checkpoint(loop.out, peft_model, loop.parts.optimizer, loop.parts.scheduler, state,
                        loop.config.keep_checkpoints, accelerator.scaler)
    accelerator.wait_for_everyone()


def save(loop: Loop) -> dict:
    """The last adapter, metrics.json and the skipped samples; then the processes part in order."""
    accelerator, state, out = loop.accelerator, loop.position.state, loop.out
    if loop.position.sample_log is not None:
        loop.position.sample_log.close()
    metric = loop.inputs.metric
    summary = {"metric": metric, "best_step": state.best_step, f"best_dev_{metric}": state.best_metric,
               "steps": state.step, "samples_seen": state.samples_seen, "skipped_samples": len(state.skipped),
               "train_runtime_s": round(time.time() - loop.meter.started, 1), "history": state.history}
    with whole_parameters(loop):
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(loop.parts.model), loop.base.processor, out / LAST_ADAPTER_DIR,
                         loop.base.spec, adapter_decoding(loop.config))
    if accelerator.is_main_process:
        if not (out / ADAPTER_DIR).is_dir():
            shutil.copytree(out / LAST_ADAPTER_DIR, out / ADAPTER_DIR)
        (out / METRICS_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        write_run_card(loop, state)
        with open(out / SKIPPED_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in state.skipped)
        if state.skipped:
            accelerator.print(f"{len(state.skipped)} samples skipped; see {out / SKIPPED_FILE}")
    # the DDP wrapper must go before its process group
    loop.parts = None
    end_training(accelerator)
    return summary


def write_run_card(loop: Loop, state) -> None:
    """The model card of the best adapter (and of the last): base, languages, datasets, the dev score."""
    import dataclasses

    from ..model_card import CardInfo, Score, dataset_of, write_card
    from ..models import public_name

    config, inputs = loop.config, loop.inputs
    languages = sorted({inputs.language} if inputs.language else
                       {s.language for s in [*inputs.train_samples, *inputs.dev_samples] if s.language})
    datasets = sorted({dataset_of(m)[0] for m in (config.train_manifest, config.dev_manifest) if m})
    for folder in (ADAPTER_DIR, LAST_ADAPTER_DIR):
        scores = []
        if config.dev_manifest and state.best_metric is not None and folder == ADAPTER_DIR:
            scores = [Score.of(inputs.metric, state.best_metric, config.dev_manifest, clips=len(inputs.dev_samples),
                               source="train")]
        write_card(loop.out / folder, CardInfo(
            kind="adapter" if (loop.out / folder / "adapter_config.json").is_file() else "merged",
            base_model=public_name(config.model), languages=languages, datasets=datasets, scores=scores,
            training_config=dataclasses.asdict(config)))


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (its ShareMemCommBuilder op) in every new
    environment when it starts: ~40 s of C++ on two idle cores, 100 s+ on busy ones, for a kernel only its
    inference all_reduce calls; training reduces through gloo. Marked unavailable, DeepSpeed skips the build
    (the same way it does on platforms the kernel does not support). A DeepSpeed without that table builds as it
    would have: slower to start, never a failure."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage when DeepSpeed trains, else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def whole_parameters(loop: Loop):
    """Every rank holds every weight inside this (ZeRO-3 shards them): for generation and saving. A
    collective: all ranks enter it."""
    from contextlib import nullcontext

    if deepspeed_stage(loop.accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(loop.accelerator.unwrap_model(loop.parts.model).parameters()),
                                             modifier_rank=None)


def generation_model(loop: Loop):
    """The model to evaluate by generation. Under ZeRO-3 every rank holds a shard of each weight and gathers
    a layer's whole weights, a collective, as a forward pass reaches it; ranks decoding different clips to
    different lengths would wait on each other for ever (and the decoder reads weights directly, between
    those gathers). So they decode with a plain copy, consolidated once per evaluation, on this rank."""
    unwrapped = loop.accelerator.unwrap_model(loop.parts.model)
    if deepspeed_stage(loop.accelerator) != 3:
        return unwrapped
    with whole_parameters(loop):
        weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in unwrapped.state_dict().items()}
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    with torch.device("meta"):  # shapes only: the weights come from the shards
        copy = type(base)(base.config)
        if base is not unwrapped:
            from peft import get_peft_model

            copy = get_peft_model(copy, unwrapped.peft_config[unwrapped.active_adapter])
    copy.load_state_dict(weights, assign=True)
    copy.generation_config = base.generation_config
    return copy.to(loop.accelerator.device).eval()


def end_training(accelerator) -> None:
    """Close trackers and tear the process group down while the interpreter is fully alive, in order.

    `accelerator.end_training()` destroys the process group, but the DDP wrapper's reducer still holds
    it; left to interpreter exit, that reducer is its last owner and destroys the gloo group holding
    the GIL, joining a gloo worker thread that waits for the GIL to free a tensor: the rank never exits
    (seen in CI, where a finished run's rank 1 hung until the test timed out). So every reference the
    accelerator keeps is released and collected first; the group then dies from Python, where torch
    releases the GIL for its destructor.
    """
    import gc

    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
