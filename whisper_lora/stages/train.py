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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..allocator import return_freed_blocks_to_os
from ..checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from ..config import TrainConfig
from ..rundir import ADAPTER_DIR, LAST_ADAPTER_DIR, METRICS_FILE, SKIPPED_FILE, prepare_run_dir
from ..data import (LABEL_PAD, CachedEncoderDataset, EncoderCache, LabelBuilder, SkippedSample, SpeechDataset,
                    build_labels, collate, shard_item_maker)
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
    """Score the dev set by generation, sharded across processes so no rank idles into a timeout."""
    from accelerate.utils import gather_object

    unwrapped = accelerator.unwrap_model(model)
    backend = TransformersBackend(unwrapped, processor, device=str(accelerator.device))
    with accelerator.split_between_processes(dev_clips) as mine:
        options = replace(GREEDY, task=config.task, max_new_tokens=config.max_new_tokens)
        mine_scored = score_model("dev", backend, mine, language, options, config.eval_batch_size, progress=False)
    unwrapped.train()
    return score_rows("dev", gather_object(mine_scored.rows))


def run(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    # ---- set up: options, data, model ------------------------------------------------------------
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun / accelerate launch
    # Without cpu=True, accelerate on a machine with no GPU ignores torchrun's environment and every
    # process trains alone on all the data: correct-looking, N times slower, and the ranks never meet.
    deepspeed_plugin = None
    if config.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install 'whisper-lora[deepspeed]'") from None
        from accelerate.utils import DeepSpeedPlugin

        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=config.deepspeed)
        # Known here, not from a prepared DataLoader (streaming loaders are not prepared).
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        deepspeed_plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    accelerator = Accelerator(cpu=launched > 1 and not torch.cuda.is_available(), deepspeed_plugin=deepspeed_plugin,
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

    with accelerator.main_process_first():  # one rank converts/caches the model, the others reuse it
        resolved = resolve_model(config.model)
        if resolved.adapter is not None:
            raise UserError("--model is an adapter; train on its base model, or merge it first with "
                            "`whisper-lora merge`", config.model)
        model, processor = load_model(resolved, device=accelerator.device if quantization else "cpu",
                                      quantization=quantization)
    # Adapters record the base so that they load from anywhere: local folders as absolute paths.
    base_spec = public_name(resolved.spec)
    generation_config = model.generation_config
    builder = LabelBuilder(processor.tokenizer, generation_config, language, config.task, config.timestamps,
                           config.timestamp_fraction, config.seed)
    labels, skipped = build_labels(train_samples, processor, generation_config, language, config.task, builder)
    if dev_samples:  # fail now, not after the first epoch, if dev rows lack a usable language
        build_labels(dev_samples, processor, generation_config, language, config.task)
    dev_clips, dev_problems = load_clips(dev_samples)  # decoded once; unreadable clips reported, not scored
    skipped += [SkippedSample(-1, config.dev_manifest, problem) for problem in dev_problems]
    retain_labels = check_retain_labels(retain_samples, processor, generation_config, config, builder)
    retain_clips, retain_problems = load_clips(retain_samples)
    skipped += [SkippedSample(-1, config.retain_manifest, problem) for problem in retain_problems]
    retain_metric = default_metric(retain_samples[0].language) if retain_samples else None
    if streaming:
        dataset = ShardStream(config.train_manifest, shard_item_maker(processor, builder, augmenter), config.seed,
                              config.shuffle_buffer, accelerator.process_index, accelerator.num_processes,
                              config.num_workers)
    else:
        usable = [s for s, label in zip(train_samples, labels) if label is not None]
        replayable = [s for s, label in zip(retain_samples, retain_labels) if label is not None] \
            if config.replay_ratio else []
        dataset = SpeechDataset(usable + replayable, processor, builder, augmenter, feature_cache)
        if not usable:
            raise UserError("no usable training samples (see the reasons above)", config.train_manifest)

    if config.freeze_encoder and not streaming and augmenter is None:
        cache = EncoderCache(out / f"encoder_cache.rank{accelerator.process_index}.npy", dataset,
                             model.to(accelerator.device).eval(), accelerator.device, config.eval_batch_size,
                             progress=accelerator.is_local_main_process)
        dataset = CachedEncoderDataset(dataset, cache)
    if streaming:
        sampler = None
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                                             num_workers=config.num_workers)
    else:
        sampler = EpochShuffleSampler(len(usable), config.seed, replay=len(replayable), replay_ratio=config.replay_ratio)
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=config.num_workers)
    if streaming:  # each rank reads its own shards, so the loader is not handed to accelerate to split
        total_steps = config.max_steps
        eval_steps = config.eval_steps or min(total_steps, STREAMING_EVAL_STEPS)
    else:
        steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.grad_accum)
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        eval_steps = config.eval_steps or steps_per_epoch
    model.train()
    model = apply_adapter(model, AdapterSpec.of(config), total_steps)  # LoRA/DoRA/AdaLoRA, or all weights for `full`
    if config.method == "full" and config.learning_rate > 1e-4:
        accelerator.print(f"warning: --learning-rate {config.learning_rate:g} suits LoRA; full fine-tuning of "
                          "Whisper usually uses about 1e-5 (5e-6 to 4e-5), and rates this high wreck the "
                          "pretrained weights")
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # LoRA + checkpointing: inputs must carry grad (transformers 5)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    save_steps = config.save_steps or eval_steps
    # accelerate steps the scheduler once per process for each optimizer step, so count in those units.
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps) * n, total_steps * n)
    if streaming:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = TrainState(skipped=[asdict(s) for s in skipped], num_processes=accelerator.num_processes)
    checkpoints = list_checkpoints(out)
    if config.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler,
                                accelerator.scaler)
        if state.num_processes != accelerator.num_processes:
            raise UserError(f"checkpoint was written by {state.num_processes} processes, this run has "
                            f"{accelerator.num_processes}; resume with the same launch", checkpoints[-1])
        accelerator.print(f"resuming from {checkpoints[-1]} (step {state.step}/{total_steps})")
    rank = accelerator.process_index
    stream = state.streams[rank] if len(state.streams) > rank else {"epoch": 0, "consumed": {}}
    stream["consumed"] = {int(k): v for k, v in stream["consumed"].items()}  # JSON made the keys strings
    sample_log = None
    if config.sample_log:
        logged = state.ids_logged[rank] if len(state.ids_logged) > rank else 0
        sample_log = SampleLog(out / f"samples.rank{rank}.txt", logged)
    if trackers:
        run_name = config.run_name or out.resolve().name
        accelerator.init_trackers(
            config.wandb_project or os.environ.get("WANDB_PROJECT", "whisper-lora"),
            config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()},
            init_kwargs={"wandb": {"name": run_name, "dir": str(out)}, "tensorboard": {}})
    for s in skipped:
        accelerator.print(f"skipping {s.source}: {s.reason}")

    def save_best_and_checkpoint(dev: dict | None) -> None:
        from accelerate.utils import gather_object

        peft_model = accelerator.unwrap_model(model)
        if sample_log is not None:
            sample_log.flush()
        # Every rank's read position goes into the one checkpoint rank 0 writes.
        state.streams = gather_object([stream]) if streaming else []
        state.ids_logged = gather_object([sample_log.lines if sample_log is not None else 0])
        if accelerator.is_main_process:
            improved = dev is not None and (state.best_metric is None or dev["metric"] < state.best_metric)
            if improved or not dev_clips:
                if dev is not None:
                    state.best_metric, state.best_step = dev["metric"], state.step
                save_adapter(peft_model, processor, out / ADAPTER_DIR, base_spec)
            save_checkpoint(out, peft_model, optimizer, scheduler, state, config.keep_checkpoints, accelerator.scaler)
        accelerator.wait_for_everyone()

    # ---- loop -----------------------------------------------------------------------------------
    progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    started, samples_at_start, running_loss, loss_count = time.time(), state.samples_seen, 0.0, 0
    while state.step < total_steps:
        if streaming:
            dataset.epoch, dataset.skip = stream["epoch"], dict(stream["consumed"])
            epoch_loader = loader
        else:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            dataset.set_epoch(state.epoch)
            epoch_loader = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in epoch_loader:
            # Dropout masks depend only on the position in training, not on how many RNG draws came
            # before (DataLoader iterators draw one each), so a resumed run repeats them exactly.
            torch.manual_seed(config.seed * 1_000_003 + state.epoch * 100_003 + state.batches_in_epoch)
            state.batches_in_epoch += 1
            for worker in batch["workers"]:
                stream["consumed"][worker] = stream["consumed"].get(worker, 0) + 1
            if sample_log is not None:
                sample_log.write(stream["epoch"] if streaming else state.epoch, batch["ids"])
            for s in batch["skipped"]:
                if asdict(s) not in state.skipped:  # each bad sample listed once, not once per epoch
                    state.skipped.append(asdict(s))
                    accelerator.print(f"skipping {s.reason}")
            with accelerator.accumulate(model):
                if "labels" in batch:
                    labels = batch["labels"].to(accelerator.device)
                    if "encoder_hidden" in batch:
                        inputs = {"encoder_outputs": (batch["encoder_hidden"].to(accelerator.device, torch.float32),)}
                    else:
                        inputs = {"input_features": batch["input_features"].to(accelerator.device)}
                    distilled = torch.tensor([i >= len(usable) for i in batch["index"]], device=accelerator.device) \
                        if config.replay_loss == "distill" else None
                    loss = training_loss(model, accelerator.unwrap_model(model), inputs, labels, distilled)
                    accelerator.backward(loss)
                    running_loss, loss_count = running_loss + loss.item(), loss_count + 1
                    state.samples_seen += len(batch["index"]) * accelerator.num_processes
                else:
                    # Every sample of this micro-batch was bad. Under DDP the other ranks still
                    # all-reduce gradients, so join in with zeros instead of skipping backward (a hang).
                    accelerator.backward(sum((p * 0).sum() for p in trainable))
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                # AdaLoRA reallocates ranks from this step's gradients, so between step and zero_grad; only
                # on real optimizer steps, and not after an fp16 overflow (inf sensitivities). Gradients are
                # all-reduced, so every rank prunes identically.
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    adapter_step_hook(accelerator.unwrap_model(model), state.step + 1)
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                # The loss of every rank, averaged: what a single process with the global batch would log.
                mean_loss = accelerator.reduce(torch.tensor([running_loss / max(1, loss_count)],
                                                            device=accelerator.device), "mean").item()
                record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                          "learning_rate": scheduler.get_last_lr()[0],
                          "samples_per_second": (state.samples_seen - samples_at_start) / (time.time() - started),
                          "elapsed_s": round(time.time() - started, 3)}
                if config.max_grad_norm > 0:
                    record["grad_norm"] = float(grad_norm)
                record["memory_mb"] = peak_memory_mb(accelerator.device)
                running_loss, loss_count = 0.0, 0
                state.history.append(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step=state.step)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            dev = None
            if (dev_clips or retain_clips) and (state.step % eval_steps == 0 or state.step == total_steps):
                record = {"step": state.step}
                if dev_clips:
                    scores = evaluate_dev(accelerator, model, processor, dev_clips, config, language)
                    dev = {"metric": getattr(scores, metric), "cer": scores.cer, "wer": scores.wer}
                    record.update({f"dev_{metric}": dev["metric"], "dev_cer": dev["cer"], "dev_wer": dev["wer"]})
                    log_predictions(accelerator, scores, config.log_predictions, state.step)
                    progress.write(f"step {state.step}: dev {metric.upper()} {dev['metric']:.2%}")
                if retain_clips:  # the forgetting guard, reported beside the main metric
                    kept = evaluate_dev(accelerator, model, processor, retain_clips, config, None)
                    record[f"retain_{retain_metric}"] = getattr(kept, retain_metric)
                    progress.write(f"step {state.step}: retain {retain_metric.upper()} "
                                   f"{record[f'retain_{retain_metric}']:.2%}")
                state.history.append(record)
                accelerator.log({k.replace("_", "/", 1): v for k, v in record.items() if k != "step"}, step=state.step)
            if dev is not None or state.step % save_steps == 0 or state.step == total_steps:
                save_best_and_checkpoint(dev)
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            stream = {"epoch": stream["epoch"] + 1, "consumed": {}}
    progress.close()
    if sample_log is not None:
        sample_log.close()

    # ---- save -----------------------------------------------------------------------------------
    summary = {"metric": metric, "best_step": state.best_step, f"best_dev_{metric}": state.best_metric,
               "steps": state.step, "samples_seen": state.samples_seen, "skipped_samples": len(state.skipped),
               "train_runtime_s": round(time.time() - started, 1), "history": state.history}
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), processor, out / LAST_ADAPTER_DIR, base_spec)
        if not (out / "adapter").is_dir():
            shutil.copytree(out / LAST_ADAPTER_DIR, out / ADAPTER_DIR)
        (out / METRICS_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        with open(out / SKIPPED_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in state.skipped)
        if state.skipped:
            accelerator.print(f"{len(state.skipped)} samples skipped; see {out / SKIPPED_FILE}")
    del model, optimizer, scheduler, loader, trainable  # the DDP wrapper must go before its process group
    end_training(accelerator)
    return summary


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
