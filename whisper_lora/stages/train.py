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
from ..constants import CHUNK_SECONDS
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


@dataclass
class Run:
    """What the phases of a training run share; each phase fills in its part."""
    config: TrainConfig
    language: str | None = None
    metric: str = "cer"
    streaming: bool = False
    train_samples: list = field(default_factory=list)
    dev_samples: list = field(default_factory=list)
    retain_samples: list = field(default_factory=list)
    augmenter: object = None
    feature_cache: FeatureCache | None = None
    quantization: str | None = None
    trackers: list = field(default_factory=list)
    accelerator: object = None
    out: Path | None = None
    model: object = None
    processor: object = None
    base_spec: str = ""
    skipped: list = field(default_factory=list)
    dev_clips: list = field(default_factory=list)
    retain_clips: list = field(default_factory=list)
    retain_metric: str | None = None
    usable: list = field(default_factory=list)
    dataset: object = None
    sampler: EpochShuffleSampler | None = None
    loader: object = None
    total_steps: int = 0
    eval_steps: int = 0
    save_steps: int = 0
    optimizer: object = None
    scheduler: object = None
    trainable: list = field(default_factory=list)
    state: TrainState | None = None
    stream: dict = field(default_factory=dict)  # this rank's read position in streamed shards
    sample_log: SampleLog | None = None
    # progress of the current logging interval
    started: float = 0.0
    samples_at_start: int = 0
    running_loss: float = 0.0
    loss_count: int = 0
    grad_norm: object = None


def run(config: TrainConfig) -> dict:
    job = Run(config)
    load_data(job)
    start_processes(job)
    build_model(job)
    build_datasets(job)
    build_optimizer(job)
    restore(job)
    from tqdm.auto import tqdm

    progress = tqdm(total=job.total_steps, initial=job.state.step, desc="train", unit="step",
                    disable=not job.accelerator.is_local_main_process)
    job.started, job.samples_at_start = time.time(), job.state.samples_seen
    while job.state.step < job.total_steps:
        for batch in epoch_batches(job):
            if not train_step(job, batch):
                continue  # gradients still accumulating
            progress.update(1)
            log_step(job, progress)
            dev = evaluate(job, progress)
            if dev is not None or job.state.step % job.save_steps == 0 or job.state.step == job.total_steps:
                checkpoint(job, dev)
            if job.state.step >= job.total_steps:
                break
        else:
            next_epoch(job)
    progress.close()
    return save(job)


# ---- the phases, in the order `run` calls them ---------------------------------------------------------

def load_data(run: Run) -> None:
    """Manifests, the forgetting guard's set, augmentation and the feature cache; nothing heavy yet."""
    config = run.config
    run.language = language_code(config.language, "--language") if config.language else None
    run.streaming = is_shard_dir(config.train_manifest)
    run.train_samples = [] if run.streaming else read_manifest(config.train_manifest, config.audio_dir,
                                                                allow_empty_text=True)
    check_audio_exists(run.train_samples, config.train_manifest)
    run.dev_samples = read_manifest(config.dev_manifest, config.audio_dir) if config.dev_manifest else []
    check_audio_exists(run.dev_samples, config.dev_manifest)
    run.retain_samples = read_retain_set(config)
    run.metric = config.metric if config.metric != "auto" else default_metric(
        run.language or next((s.language for s in run.train_samples + run.dev_samples if s.language), None))
    if config.augment:
        from ..augment import Augmenter, load_augment_config

        run.augmenter = Augmenter(load_augment_config(config.augment), config.seed)
    run.feature_cache = FeatureCache(config.feature_cache) if config.feature_cache else None
    run.quantization = check_quantisation(AdapterSpec.of(config))  # fails fast: no bitsandbytes, or too old
    if run.feature_cache is not None and run.augmenter is not None and run.augmenter.changes_audio:
        raise UserError("--augment changes the waveform (speed/volume/noise/shift) but --feature-cache skips "
                        "decoding it; keep only spec_augment in the YAML, or drop --feature-cache", config.augment)
    run.trackers = [name for name, wanted in (("tensorboard", config.tensorboard), ("wandb", config.wandb)) if wanted]
    if config.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install 'whisper-lora[wandb]'") from None


def start_processes(run: Run) -> None:
    """The accelerator (DDP or DeepSpeed across the launched processes, or one process) and the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    config = run.config
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun / accelerate launch
    deepspeed_plugin = None
    if config.deepspeed:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, over gloo
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install 'whisper-lora[deepspeed]'") from None
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
                              gradient_accumulation_steps=config.grad_accum, log_with=run.trackers or None,
                              project_dir=str(Path(config.output_dir) / "tensorboard"))  # TensorBoard's folder
    if config.low_cpu_memory and accelerator.device.type == "cpu" and not return_freed_blocks_to_os():
        accelerator.print("--low-cpu-memory: this platform's allocator is not glibc; left as it is")
    if accelerator.num_processes != launched:
        raise UserError(f"launched as {launched} processes but the distributed backend joined "
                        f"{accelerator.num_processes}; check the launcher's settings (MASTER_ADDR, ports)")
    run.out = Path(config.output_dir)
    if accelerator.is_main_process:
        prepare_run_dir(config, run.out, resume=config.resume, overwrite=config.overwrite)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    run.accelerator = accelerator


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


def build_model(run: Run) -> None:
    config, accelerator = run.config, run.accelerator
    with accelerator.main_process_first():  # one rank converts/caches the model, the others reuse it
        resolved = resolve_model(config.model)
    if resolved.adapter is not None:
        raise UserError("--model is an adapter; train on its base model, or merge it first with "
                        "`whisper-lora merge`", config.model)
    with whole_weights_under_zero3(accelerator):
        run.model, run.processor = load_model(resolved, device=accelerator.device if run.quantization else "cpu",
                                              quantization=run.quantization)
    run.base_spec = public_name(resolved.spec)  # adapters record a base that loads anywhere


def build_datasets(run: Run) -> None:
    """Labels, dev and retain clips, the training dataset (in memory or streamed), its loader and the
    step counts; bad samples are counted here, never swapped for others."""
    config, accelerator, processor = run.config, run.accelerator, run.processor
    generation_config = run.model.generation_config
    builder = LabelBuilder(processor.tokenizer, generation_config, run.language, config.task, config.timestamps,
                           config.timestamp_fraction, config.seed)
    labels, skipped = build_labels(run.train_samples, processor, generation_config, run.language, config.task, builder)
    if run.dev_samples:  # fail now, not after the first epoch, if dev rows lack a usable language
        build_labels(run.dev_samples, processor, generation_config, run.language, config.task)
    run.dev_clips, dev_problems = load_clips(run.dev_samples)  # decoded once; unreadable clips reported, not scored
    skipped += [SkippedSample(-1, config.dev_manifest, problem) for problem in dev_problems]
    retain_labels = check_retain_labels(run.retain_samples, processor, generation_config, config, builder)
    run.retain_clips, retain_problems = load_clips(run.retain_samples)
    skipped += [SkippedSample(-1, config.retain_manifest, problem) for problem in retain_problems]
    run.skipped = skipped
    run.retain_metric = default_metric(run.retain_samples[0].language) if run.retain_samples else None
    if run.streaming:
        dataset = ShardStream(config.train_manifest, shard_item_maker(processor, builder, run.augmenter), config.seed,
                              config.shuffle_buffer, accelerator.process_index, accelerator.num_processes,
                              config.num_workers)
    else:
        run.usable = [s for s, label in zip(run.train_samples, labels) if label is not None]
        replayable = [s for s, label in zip(run.retain_samples, retain_labels) if label is not None] \
            if config.replay_ratio else []
        dataset = SpeechDataset(run.usable + replayable, processor, builder, run.augmenter, run.feature_cache)
        if not run.usable:
            raise UserError("no usable training samples (see the reasons above)", config.train_manifest)
    if config.pack:
        seconds = [sample_seconds(sample) for sample in dataset.samples]
        tokens = [builder.packed_tokens(sample) for sample in dataset.samples]
        order = EpochShuffleSampler(len(run.usable), config.seed, replay=len(replayable),
                                    replay_ratio=config.replay_ratio)

        def order_for_epoch(epoch: int) -> list[int]:
            order.set_epoch(epoch)
            return list(order)

        speed = run.augmenter.config.speed if run.augmenter is not None else None
        # planned so that slowed-down speech still fits: the slowest speed factor stretches a window most
        budget = CHUNK_SECONDS * min(1.0, *speed.factors) if speed else CHUNK_SECONDS
        dataset = PackedDataset(dataset, order_for_epoch, seconds, tokens, config.seed, budget)
    if config.freeze_encoder and not run.streaming and run.augmenter is None and not config.pack:
        cache = EncoderCache(run.out / f"encoder_cache.rank{accelerator.process_index}.npy", dataset,
                             run.model.to(accelerator.device).eval(), accelerator.device, config.eval_batch_size,
                             progress=accelerator.is_local_main_process)
        dataset = CachedEncoderDataset(dataset, cache)
    if run.streaming:
        run.loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                                                 num_workers=config.num_workers)
        run.total_steps = config.max_steps
        run.eval_steps = config.eval_steps or min(run.total_steps, STREAMING_EVAL_STEPS)
    else:
        if not config.pack:  # a packing plan is already in the epoch's order
            run.sampler = EpochShuffleSampler(len(run.usable), config.seed, replay=len(replayable),
                                              replay_ratio=config.replay_ratio)
        run.loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=run.sampler,
                                                 collate_fn=collate, num_workers=config.num_workers)
        steps_per_epoch = math.ceil(len(run.loader) / accelerator.num_processes / config.grad_accum)
        run.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        run.eval_steps = config.eval_steps or steps_per_epoch
    run.save_steps = config.save_steps or run.eval_steps
    run.dataset = dataset


def build_optimizer(run: Run) -> None:
    """The adapter (or the whole model for `full`), AdamW, the warm-up schedule, all handed to accelerate."""
    from transformers import get_linear_schedule_with_warmup

    config, accelerator = run.config, run.accelerator
    model = run.model
    model.train()
    model = apply_adapter(model, AdapterSpec.of(config), run.total_steps)  # LoRA/DoRA/AdaLoRA, or all weights
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
    scheduler = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, run.total_steps) * n,
                                                run.total_steps * n)
    if run.streaming:  # each rank reads its own shards, so the loader is not handed to accelerate to split
        run.model, run.optimizer, run.scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        run.model, run.optimizer, run.loader, run.scheduler = accelerator.prepare(model, optimizer, run.loader,
                                                                                scheduler)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]


def restore(run: Run) -> None:
    """The last checkpoint with --resume (step, optimizer, schedule, data position), trackers, the sample log."""
    config, accelerator = run.config, run.accelerator
    run.state = TrainState(skipped=[asdict(s) for s in run.skipped], num_processes=accelerator.num_processes)
    checkpoints = list_checkpoints(run.out)
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
            run.state = read_state(last)
        else:
            run.state = load_checkpoint(last, accelerator.unwrap_model(run.model), run.optimizer,
                                        run.scheduler, accelerator.scaler)
        accelerator.print(f"resuming from {last} (step {run.state.step}/{run.total_steps})")
    rank = accelerator.process_index
    streams = run.state.streams
    run.stream = streams[rank] if len(streams) > rank else {"epoch": 0, "consumed": {}}
    run.stream["consumed"] = {int(k): v for k, v in run.stream["consumed"].items()}  # JSON made the keys strings
    if config.sample_log:
        logged = run.state.ids_logged[rank] if len(run.state.ids_logged) > rank else 0
        run.sample_log = SampleLog(run.out / f"samples.rank{rank}.txt", logged)
    if run.trackers:
        accelerator.init_trackers(
            config.wandb_project or os.environ.get("WANDB_PROJECT", "whisper-lora"),
            config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()},
            init_kwargs={"wandb": {"name": config.run_name or run.out.resolve().name, "dir": str(run.out)},
                         "tensorboard": {}})
    for s in run.skipped:
        accelerator.print(f"skipping {s.source}: {s.reason}")


def epoch_batches(run: Run):
    """This epoch's batches, the part already trained skipped on resume."""
    state = run.state
    if run.streaming:
        run.dataset.epoch, run.dataset.skip = run.stream["epoch"], dict(run.stream["consumed"])
        return run.loader
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(state.epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(state.epoch)
    run.dataset.set_epoch(state.epoch)
    if state.batches_in_epoch:
        return run.accelerator.skip_first_batches(run.loader, state.batches_in_epoch)
    return run.loader


def next_epoch(run: Run) -> None:
    run.state.epoch += 1
    run.state.batches_in_epoch = 0
    run.stream = {"epoch": run.stream["epoch"] + 1, "consumed": {}}


def train_step(run: Run, batch: dict) -> bool:
    """Forward and backward one micro-batch; True when that completed an optimizer step."""
    config, accelerator, state, model = run.config, run.accelerator, run.state, run.model
    # Dropout masks depend only on the position in training, not on how many RNG draws came
    # before (DataLoader iterators draw one each), so a resumed run repeats them exactly.
    torch.manual_seed(config.seed * 1_000_003 + state.epoch * 100_003 + state.batches_in_epoch)
    state.batches_in_epoch += 1
    for worker in batch["workers"]:
        run.stream["consumed"][worker] = run.stream["consumed"].get(worker, 0) + 1
    if run.sample_log is not None:
        run.sample_log.write(run.stream["epoch"] if run.streaming else state.epoch, batch["ids"])
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
            distilled = torch.tensor([i >= len(run.usable) for i in batch["index"]], device=accelerator.device) \
                if config.replay_loss == "distill" else None
            loss = training_loss(model, accelerator.unwrap_model(model), inputs, labels, distilled)
            accelerator.backward(loss)
            run.running_loss, run.loss_count = run.running_loss + loss.item(), run.loss_count + 1
            if not config.pack:
                state.samples_seen += len(batch["index"]) * accelerator.num_processes
        else:
            # Every sample of this micro-batch was bad. Under DDP the other ranks still
            # all-reduce gradients, so join in with zeros instead of skipping backward (a hang).
            accelerator.backward(sum((p * 0).sum() for p in run.trainable))
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            run.grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        # AdaLoRA reallocates ranks from this step's gradients, so between step and zero_grad; only
        # on real optimizer steps, and not after an fp16 overflow (inf sensitivities). Gradients are
        # all-reduced, so every rank prunes identically.
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            adapter_step_hook(accelerator.unwrap_model(model), state.step + 1)
        run.optimizer.zero_grad()
    if not accelerator.sync_gradients:
        return False
    state.step += 1
    return True


def log_step(run: Run, progress) -> None:
    config, accelerator, state = run.config, run.accelerator, run.state
    if state.step % config.logging_steps and state.step != run.total_steps:
        return
    # The loss of every rank, averaged: what a single process with the global batch would log.
    mean_loss = accelerator.reduce(torch.tensor([run.running_loss / max(1, run.loss_count)],
                                                device=accelerator.device), "mean").item()
    elapsed = time.time() - run.started
    record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss,
              "learning_rate": run.scheduler.get_last_lr()[0],
              "samples_per_second": (state.samples_seen - run.samples_at_start) / elapsed,
              "elapsed_s": round(elapsed, 3)}
    if config.max_grad_norm > 0 and run.grad_norm is not None:  # DeepSpeed clips inside its engine
        record["grad_norm"] = float(run.grad_norm)
    record["memory_mb"] = peak_memory_mb(accelerator.device)
    run.running_loss, run.loss_count = 0.0, 0
    state.history.append(record)
    accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step=state.step)
    progress.set_postfix(loss=f"{record['loss']:.3f}")


def evaluate(run: Run, progress) -> dict | None:
    """The dev set (and the forgetting guard's set) by generation, when due; the dev scores, or None."""
    config, accelerator, state = run.config, run.accelerator, run.state
    due = state.step % run.eval_steps == 0 or state.step == run.total_steps
    if not (run.dev_clips or run.retain_clips) or not due:
        return None
    record, dev = {"step": state.step}, None
    model = generation_model(run)
    if run.dev_clips:
        scores = evaluate_dev(accelerator, model, run.processor, run.dev_clips, config, run.language)
        dev = {"metric": getattr(scores, run.metric), "cer": scores.cer, "wer": scores.wer}
        record.update({f"dev_{run.metric}": dev["metric"], "dev_cer": dev["cer"], "dev_wer": dev["wer"]})
        log_predictions(accelerator, scores, config.log_predictions, state.step)
        progress.write(f"step {state.step}: dev {run.metric.upper()} {dev['metric']:.2%}")
    if run.retain_clips:  # the forgetting guard, reported beside the main metric
        kept = evaluate_dev(accelerator, model, run.processor, run.retain_clips, config, None)
        record[f"retain_{run.retain_metric}"] = getattr(kept, run.retain_metric)
        progress.write(f"step {state.step}: retain {run.retain_metric.upper()} "
                       f"{record[f'retain_{run.retain_metric}']:.2%}")
    state.history.append(record)
    accelerator.log({k.replace("_", "/", 1): v for k, v in record.items() if k != "step"}, step=state.step)
    return dev


def checkpoint(run: Run, dev: dict | None) -> None:
    """The best adapter (by the dev metric) and a resumable checkpoint, written by rank 0 with every rank's
    read position."""
    from accelerate.utils import gather_object

    accelerator, state = run.accelerator, run.state
    peft_model = accelerator.unwrap_model(run.model)
    if run.sample_log is not None:
        run.sample_log.flush()
    state.streams = gather_object([run.stream]) if run.streaming else []
    state.ids_logged = gather_object([run.sample_log.lines if run.sample_log is not None else 0])
    improved = dev is not None and (state.best_metric is None or dev["metric"] < state.best_metric)
    if improved or not run.dev_clips:
        if dev is not None:
            state.best_metric, state.best_step = dev["metric"], state.step
        with whole_parameters(run):
            if accelerator.is_main_process:
                save_adapter(peft_model, run.processor, run.out / ADAPTER_DIR, run.base_spec)
    if deepspeed_stage(accelerator) is not None:
        # The optimizer state is sharded across the ranks: every rank writes its part (DeepSpeed's own
        # checkpoint), rank 0 the loop's state, and the folder becomes final only when all have.
        partial = begin_checkpoint(run.out, state.step) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        # the base model's frozen weights are on disk already: the adapter and optimizer state suffice
        accelerator.save_state(str(checkpoint_partial(run.out, state.step) / "deepspeed"),
                               exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(run.out, partial, state, run.config.keep_checkpoints)
    elif accelerator.is_main_process:
        save_checkpoint(run.out, peft_model, run.optimizer, run.scheduler, state, run.config.keep_checkpoints,
                        accelerator.scaler)
    accelerator.wait_for_everyone()


def save(run: Run) -> dict:
    """The last adapter, metrics.json and the skipped samples; then the processes part in order."""
    accelerator, state, out = run.accelerator, run.state, run.out
    if run.sample_log is not None:
        run.sample_log.close()
    summary = {"metric": run.metric, "best_step": state.best_step, f"best_dev_{run.metric}": state.best_metric,
               "steps": state.step, "samples_seen": state.samples_seen, "skipped_samples": len(state.skipped),
               "train_runtime_s": round(time.time() - run.started, 1), "history": state.history}
    with whole_parameters(run):
        if accelerator.is_main_process:
            save_adapter(accelerator.unwrap_model(run.model), run.processor, out / LAST_ADAPTER_DIR, run.base_spec)
    if accelerator.is_main_process:
        if not (out / ADAPTER_DIR).is_dir():
            shutil.copytree(out / LAST_ADAPTER_DIR, out / ADAPTER_DIR)
        (out / METRICS_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        with open(out / SKIPPED_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in state.skipped)
        if state.skipped:
            accelerator.print(f"{len(state.skipped)} samples skipped; see {out / SKIPPED_FILE}")
    # the DDP wrapper must go before its process group
    run.model = run.optimizer = run.scheduler = run.loader = run.trainable = None
    end_training(accelerator)
    return summary


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage when DeepSpeed trains, else None."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def whole_parameters(run: Run):
    """Every rank holds every weight inside this (ZeRO-3 shards them): for generation and saving. A
    collective: all ranks enter it."""
    from contextlib import nullcontext

    if deepspeed_stage(run.accelerator) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(run.accelerator.unwrap_model(run.model).parameters()),
                                             modifier_rank=None)


def generation_model(run: Run):
    """The model to evaluate by generation. Under ZeRO-3 every rank holds a shard of each weight and gathers
    a layer's whole weights, a collective, as a forward pass reaches it; ranks decoding different clips to
    different lengths would wait on each other for ever (and the decoder reads weights directly, between
    those gathers). So they decode with a plain copy, consolidated once per evaluation, on this rank."""
    unwrapped = run.accelerator.unwrap_model(run.model)
    if deepspeed_stage(run.accelerator) != 3:
        return unwrapped
    with whole_parameters(run):
        weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in unwrapped.state_dict().items()}
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    with torch.device("meta"):  # shapes only: the weights come from the shards
        copy = type(base)(base.config)
        if base is not unwrapped:
            from peft import get_peft_model

            copy = get_peft_model(copy, unwrapped.peft_config[unwrapped.active_adapter])
    copy.load_state_dict(weights, assign=True)
    copy.generation_config = base.generation_config
    return copy.to(run.accelerator.device).eval()


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
