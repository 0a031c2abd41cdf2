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
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from ..config import TrainConfig, prepare_run_dir
from ..data import CachedEncoderDataset, EncoderCache, SkippedSample, SpeechDataset, build_labels, collate
from ..errors import UserError
from ..lora import apply_lora, save_adapter
from ..manifest import check_audio_exists, language_code, read_manifest
from ..models import load_model, resolve_model
from ..inference import GREEDY, Transcriber
from ..text import default_metric
from .evaluate import ModelScore, load_clips, score_model, score_rows

ADAPTER_DIR = "adapter"  # best adapter by dev metric (or the last one without a dev set)
LAST_ADAPTER_DIR = "last"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped_samples.jsonl"


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def resolve_precision(precision: str) -> str:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return {"fp32": "no"}.get(precision, precision)


def evaluate_dev(accelerator, model, processor, dev_clips, config: TrainConfig, language: str | None) -> ModelScore:
    """Score the dev set by generation, sharded across processes so no rank idles into a timeout."""
    from accelerate.utils import gather_object

    unwrapped = accelerator.unwrap_model(model)
    transcriber = Transcriber(unwrapped, processor, device=str(accelerator.device))
    with accelerator.split_between_processes(dev_clips) as mine:
        options = replace(GREEDY, task=config.task, max_new_tokens=config.max_new_tokens)
        mine_scored = score_model("dev", transcriber, mine, language, options, config.eval_batch_size, progress=False)
    unwrapped.train()
    return score_rows("dev", gather_object(mine_scored.rows))


def run(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    # ---- set up: options, data, model ------------------------------------------------------------
    language = language_code(config.language, "--language") if config.language else None
    train_samples = read_manifest(config.train_manifest, config.audio_dir)
    check_audio_exists(train_samples, config.train_manifest)
    dev_samples = read_manifest(config.dev_manifest, config.audio_dir) if config.dev_manifest else []
    check_audio_exists(dev_samples, config.dev_manifest)
    metric = config.metric if config.metric != "auto" else default_metric(
        language or next((s.language for s in train_samples if s.language), None))

    accelerator = Accelerator(mixed_precision=resolve_precision(config.precision),
                              gradient_accumulation_steps=config.grad_accum,
                              log_with="tensorboard" if config.tensorboard else None,
                              project_dir=config.output_dir)
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
        model, processor = load_model(resolved, device="cpu")
    # Adapters record the base so that they load from anywhere: local folders as absolute paths.
    base_spec = str(Path(resolved.spec).resolve()) if Path(resolved.spec).expanduser().is_dir() else resolved.spec
    generation_config = model.generation_config
    labels, skipped = build_labels(train_samples, processor, generation_config, language, config.task)
    if dev_samples:  # fail now, not after the first epoch, if dev rows lack a usable language
        build_labels(dev_samples, processor, generation_config, language, config.task)
    dev_clips, dev_problems = load_clips(dev_samples)  # decoded once; unreadable clips reported, not scored
    skipped += [SkippedSample(-1, config.dev_manifest, problem) for problem in dev_problems]
    dataset = SpeechDataset(train_samples, labels, processor)
    if len(dataset) == 0:
        raise UserError("no usable training samples (see the reasons above)", config.train_manifest)

    if config.freeze_encoder:
        cache = EncoderCache(out / f"encoder_cache.rank{accelerator.process_index}.npy", dataset,
                             model.to(accelerator.device).eval(), accelerator.device, config.eval_batch_size,
                             progress=accelerator.is_local_main_process)
        dataset = CachedEncoderDataset(dataset, cache)
    model.train()
    model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules,
                       decoder_only=config.freeze_encoder)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # LoRA + checkpointing: inputs must carry grad (transformers 5)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler = EpochShuffleSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=config.num_workers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    eval_steps = config.eval_steps or steps_per_epoch
    save_steps = config.save_steps or eval_steps
    # accelerate steps the scheduler once per process for each optimizer step, so count in those units.
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps) * n, total_steps * n)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = TrainState(skipped=[asdict(s) for s in skipped], num_processes=accelerator.num_processes)
    checkpoints = list_checkpoints(out)
    if config.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler,
                                accelerator.scaler)
        if state.num_processes != accelerator.num_processes:
            raise UserError(f"checkpoint was written by {state.num_processes} processes, this run has "
                            f"{accelerator.num_processes}; resume with the same launch", checkpoints[-1])
        accelerator.print(f"resuming from {checkpoints[-1]} (step {state.step}/{total_steps})")
    if config.tensorboard:
        accelerator.init_trackers("tensorboard", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in asdict(config).items()})
    for s in skipped:
        accelerator.print(f"skipping {s.source}: {s.reason}")

    def save_best_and_checkpoint(dev: dict | None) -> None:
        peft_model = accelerator.unwrap_model(model)
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
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in epoch_loader:
            # Dropout masks depend only on the position in training, not on how many RNG draws came
            # before (DataLoader iterators draw one each), so a resumed run repeats them exactly.
            torch.manual_seed(config.seed * 1_000_003 + state.epoch * 100_003 + state.batches_in_epoch)
            state.batches_in_epoch += 1
            for s in batch["skipped"]:
                if asdict(s) not in state.skipped:  # each bad sample listed once, not once per epoch
                    state.skipped.append(asdict(s))
                    accelerator.print(f"skipping {s.reason}")
            with accelerator.accumulate(model):
                if "labels" in batch:
                    if "encoder_hidden" in batch:
                        hidden = batch["encoder_hidden"].to(accelerator.device, torch.float32)
                        loss = model(encoder_outputs=(hidden,), labels=batch["labels"]).loss
                    else:
                        loss = model(input_features=batch["input_features"], labels=batch["labels"]).loss
                    accelerator.backward(loss)
                    running_loss, loss_count = running_loss + loss.item(), loss_count + 1
                    state.samples_seen += len(batch["index"]) * accelerator.num_processes
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                record = {"step": state.step, "epoch": state.epoch, "loss": running_loss / max(1, loss_count),
                          "learning_rate": scheduler.get_last_lr()[0],
                          "samples_per_second": (state.samples_seen - samples_at_start) / (time.time() - started)}
                if config.max_grad_norm > 0:
                    record["grad_norm"] = float(grad_norm)
                running_loss, loss_count = 0.0, 0
                state.history.append(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step=state.step)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            dev = None
            if dev_clips and (state.step % eval_steps == 0 or state.step == total_steps):
                scores = evaluate_dev(accelerator, model, processor, dev_clips, config, language)
                dev = {"metric": getattr(scores, metric), "cer": scores.cer, "wer": scores.wer}
                state.history.append({"step": state.step, f"dev_{metric}": dev["metric"],
                                      "dev_cer": dev["cer"], "dev_wer": dev["wer"]})
                accelerator.log({"dev/cer": dev["cer"], "dev/wer": dev["wer"]}, step=state.step)
                progress.write(f"step {state.step}: dev {metric.upper()} {dev['metric']:.2%}")
            if dev is not None or state.step % save_steps == 0 or state.step == total_steps:
                save_best_and_checkpoint(dev)
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

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
    accelerator.end_training()
    return summary
