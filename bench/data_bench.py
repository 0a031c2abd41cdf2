"""Data loader throughput against what training consumes, on this machine.

    python bench/data_bench.py              # prints a table, writes bench/results/data_<host>.json

Loader rows: samples/s delivered by the training DataLoader (batch 8, `--num-workers` as given) on the
Mandarin demo corpus (real Opus clips, 2-6 s), with
  raw audio        decode + resample + log-mel per clip (what `train` does without a cache)
  cached features  `prepare --cache-features` output, memory-mapped (decoding and FFT skipped)
  augmentation     raw audio + configs/augment-example.yaml (speed, volume, shift, SpecAugment)
  shards           streaming FLAC shards from `prepare --shards` (raw-audio cost plus tar reading)
Training rows: samples/s that whisper-base training steps consume (batch 8, fp32, LoRA r=32 q/v),
with encoder + decoder LoRA and with the decoder-only cached-encoder path. Ratios are measured in
this run: the loader must deliver at least ten times what training consumes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BATCH = 8


def loader_rate(dataset, workers: int, batches: int) -> float:
    from whisper_lora.data import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, collate_fn=collate, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is paid once per epoch, not per sample
    started, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), iterator):
        seen += len(batch["ids"])
    return seen / (time.perf_counter() - started)


def training_rate(model, processor, dataset, decoder_only: bool, steps: int) -> float:
    from whisper_lora.data import collate
    from whisper_lora.lora import apply_lora

    model = apply_lora(model, 32, 64, 0.05, ["q_proj", "v_proj"], decoder_only=decoder_only)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate([dataset[i] for i in range(BATCH)])
    encoder = model.get_encoder()
    with torch.inference_mode():
        hidden = encoder(batch["input_features"]).last_hidden_state.half() if decoder_only else None
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        if decoder_only:  # what the cached path does: encoder outputs read back, decoder trained
            loss = model(encoder_outputs=(hidden.float(),), labels=batch["labels"]).loss
        else:
            loss = model(input_features=batch["input_features"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    model.unload()  # peft: back to the plain base model for the next measurement
    return BATCH / (sum(timings[1:]) / steps)  # the first step warms allocators up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96, help="demo training clips used")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for the loader rows")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per training row")
    args = parser.parse_args()

    from whisper_lora.augment import Augmenter, load_augment_config
    from whisper_lora.data import LabelBuilder, SpeechDataset, shard_item_maker
    from whisper_lora.features import FeatureCache, write_feature_cache
    from whisper_lora.manifest import read_manifest
    from whisper_lora.models import load_model
    from whisper_lora.shards import ShardStream, write_shards

    samples = read_manifest(REPO / "demo" / "data" / "train.jsonl")[: args.clips]
    model, processor = load_model(None)
    builder = LabelBuilder(processor.tokenizer, model.generation_config, "zh")
    batches = len(samples) // BATCH - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_feature_cache(samples, processor, Path(tmp) / "features", progress=False)
        cache_seconds = time.perf_counter() - started
        write_shards(samples, Path(tmp) / "shards", shard_size=max(1, len(samples) // 8), progress=False)
        augmenter = Augmenter(load_augment_config(REPO / "configs" / "augment-example.yaml"), seed=0)
        loaders = {
            "raw audio": SpeechDataset(samples, processor, builder),
            "cached features": SpeechDataset(samples, processor, builder, feature_cache=FeatureCache(Path(tmp) / "features")),
            "augmentation": SpeechDataset(samples, processor, builder, augmenter),
            "shards": ShardStream(Path(tmp) / "shards", shard_item_maker(processor, builder), shuffle_buffer=16,
                                  num_workers=args.num_workers),
        }
        for name, dataset in loaders.items():
            rate = loader_rate(dataset, args.num_workers, batches)
            rows.append({"row": f"loader: {name}", "samples_per_s": rate})
            print(f"{rows[-1]['row']:<34} {rate:8.1f} samples/s", flush=True)
        reference = SpeechDataset(samples, processor, builder)
        for name, decoder_only in (("train: encoder + decoder LoRA", False), ("train: decoder-only, cached encoder", True)):
            rate = training_rate(model, processor, reference, decoder_only, args.train_steps)
            rows.append({"row": name, "samples_per_s": rate})
            print(f"{name:<34} {rate:8.2f} samples/s", flush=True)

    fastest_training = max(r["samples_per_s"] for r in rows if r["row"].startswith("train"))
    print(f"\nwhisper-base, batch {BATCH}, fp32, {args.clips} demo clips, {args.num_workers} loader workers, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'':<36}{'samples/s':>10}  {'x fastest training':>18}")
    for row in rows:
        row["x_fastest_training"] = row["samples_per_s"] / fastest_training
        print(f"{row['row']:<36}{row['samples_per_s']:>10.1f}  {row['x_fastest_training']:>17.1f}x")
    print(f"feature cache written at {len(samples) / cache_seconds:.1f} clips/s (one-off)")
    out = REPO / "bench" / "results" / f"data_{platform.node() or 'host'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "clips": args.clips, "workers": args.num_workers,
                               "cache_clips_per_s": len(samples) / cache_seconds}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
