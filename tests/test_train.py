import json
from types import SimpleNamespace
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from whisper_lora.config import TrainConfig, build_config
from whisper_lora.stages import train


def tiny_train_config(tiny_model_dir, corpus, out, **overrides):
    values = dict(train_manifest=str(corpus / "train.jsonl"), dev_manifest=str(corpus / "dev.jsonl"),
                  model=str(tiny_model_dir), output_dir=str(out), batch_size=2, max_steps=4, eval_steps=2,
                  logging_steps=1, max_new_tokens=8, eval_batch_size=4, lora_r=4, lora_alpha=8)
    values.update(overrides)
    return build_config(TrainConfig, overrides=values)


def test_train_writes_adapter_processor_config_metrics_and_logs(tiny_model_dir, tiny_corpus, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    out = tmp_path / "run"
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, out))
    assert summary["steps"] == 4 and summary["best_step"] in (2, 4)
    assert summary["skipped_samples"] == 0
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any("dev_cer" in h for h in summary["history"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] == summary["best_step"]
    assert (out / "config.yaml").is_file()
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    # The adapter folder loads with plain peft, and carries the processor.
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    WhisperProcessor.from_pretrained(out / "adapter")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)


def test_real_model_learns_with_the_frozen_encoder_path(mandarin_adapter):
    """The shared Mandarin adapter's run (the embedded whisper-base, --freeze-encoder): encoder outputs
    cached once, and the loss falls."""
    run = mandarin_adapter[0].parent
    losses = [h["loss"] for h in json.loads((run / "metrics.json").read_text())["history"] if "loss" in h]
    assert len(losses) >= 2 and losses[-1] < losses[0] * 0.7, losses
    cache = np.load(run / "encoder_cache.rank0.npy", mmap_mode="r")
    assert cache.shape == (len(mandarin_adapter[1]), 1500, 512) and np.abs(cache[0]).sum() > 0


def test_bad_sample_is_skipped_and_listed(tiny_model_dir, tiny_corpus, tmp_path):
    rows = (tiny_corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (tiny_corpus / "audio" / "broken.ogg").write_bytes(b"OggS" + b"\0" * 200)
    rows.append(json.dumps({"audio": {"path": "audio/broken.ogg"}, "sentence": "坏", "language": "zh"}))
    (tiny_corpus / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with open(tiny_corpus / "dev.jsonl", "a", encoding="utf-8") as dev:  # a bad dev clip must not crash evaluation
        dev.write(json.dumps({"audio": {"path": "audio/broken.ogg"}, "sentence": "坏", "language": "zh"}) + "\n")
    out = tmp_path / "run"
    # 3 steps of one 7-sample batch = 3 epochs: the broken clip is met three times, listed once.
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, out, max_steps=3, batch_size=7))
    assert summary["skipped_samples"] == 2  # one train row, one dev row
    assert any("dev_cer" in h for h in summary["history"])
    listed = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert sum("broken.ogg" in item["reason"] for item in listed) == 2
    assert {item["source"].split(":")[0] for item in listed} >= {str(tiny_corpus / "train.jsonl"), str(tiny_corpus / "dev.jsonl")}


def test_cached_encoder_gives_the_same_loss(tiny_model_dir, tiny_corpus, tmp_path):
    """The frozen-encoder fast path is exact up to the fp16 cache."""
    from whisper_lora.audio import load_audio
    from whisper_lora.audio import log_mel
    from whisper_lora.lora import apply_lora
    from whisper_lora.models import load_model

    model, processor = load_model(str(tiny_model_dir))
    model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"], decoder_only=True)
    assert not any(".encoder." in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(".decoder." in n for n, p in model.named_parameters() if p.requires_grad)
    features = torch.from_numpy(log_mel(processor, load_audio(next((tiny_corpus / "audio").iterdir()))))[None]
    labels = torch.tensor([[50260, 50359, 50363, 400, 401, 50257]])
    with torch.no_grad():
        direct = model(input_features=features, labels=labels).loss
        hidden = model.get_encoder()(features).last_hidden_state.half().float()
        cached = model(encoder_outputs=(hidden,), labels=labels).loss
    assert abs(direct.item() - cached.item()) < 1e-2


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from conftest import cli_here

    args = ["train", "--train-manifest", str(tiny_corpus / "train.jsonl"), "--model", str(tiny_model_dir),
            "--batch-size", "2", "--max-steps", "9", "--save-steps", "2", "--lora-r", "4", "--no-tensorboard",
            "--warmup-steps", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the uninterrupted run in this process (a subprocess costs ~10 s of imports); killed and resumed as users do
    reference = cli_here(capsys, *args, "--output-dir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "whisper_lora", *args, "--output-dir", str(killed_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoints" / "step-0000004").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "metrics.json").exists(), "run finished before it could be killed"

    resumed = subprocess.run([sys.executable, "-m", "whisper_lora", *args, "--output-dir", str(killed_dir), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got_metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert got_metrics["steps"] == ref_metrics["steps"] == 9
    assert got_metrics["samples_seen"] == ref_metrics["samples_seen"]
    ref_weights = load_file(tmp_path / "ref" / "last" / "adapter_model.safetensors")
    got_weights = load_file(killed_dir / "last" / "adapter_model.safetensors")
    for name, value in ref_weights.items():
        torch.testing.assert_close(got_weights[name], value, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_and_accumulation(tiny_model_dir, tiny_corpus, tmp_path):
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "run", max_steps=1, batch_size=2,
                                          grad_accum=2, gradient_checkpointing=True, dev_manifest=None))
    assert summary["steps"] == 1
    assert summary["samples_seen"] == 4  # 1 step = 2 micro-batches x 2 samples


def test_fp16_on_cpu_is_refused_up_front(tiny_model_dir, tiny_corpus, tmp_path):
    from whisper_lora.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on CUDA")
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA GPU"):
        train.run(tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "run", precision="fp16"))


def test_streaming_from_shards_resumes_after_sigkill_without_repeating_or_losing_a_sample(tiny_model_dir, tmp_path):
    from whisper_lora.manifest import read_manifest
    from whisper_lora.shards import write_shards

    from conftest import DEMO

    samples = read_manifest(DEMO / "train.jsonl")[:20]
    write_shards(samples, tmp_path / "shards", shard_size=3, progress=False)  # 7 shards for 2 workers
    args = ["train", "--train-manifest", str(tmp_path / "shards"), "--model", str(tiny_model_dir),
            "--batch-size", "2", "--max-steps", "14", "--save-steps", "2", "--lora-r", "4", "--no-tensorboard",
            "--num-workers", "2", "--shuffle-buffer", "4", "--sample-log", "--output-dir", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "whisper_lora", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "step-0000004").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "metrics.json").exists(), "run finished before it could be killed"

    resumed = subprocess.run([sys.executable, "-m", "whisper_lora", *args, "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = [line.split("\t") for line in (tmp_path / "run" / "samples.rank0.txt").read_text().splitlines()]
    epoch0 = [sample_id for epoch, sample_id in log if epoch == "0"]
    assert sorted(epoch0) == sorted(s.id for s in samples)  # each sample of the epoch exactly once
    assert any(epoch == "1" for epoch, _ in log)  # training went on into the next epoch
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 14


def test_streaming_needs_max_steps(tmp_path):
    from whisper_lora.errors import UserError

    (tmp_path / "shards.json").write_text("{}")
    with pytest.raises(UserError, match="set --max-steps"):
        build_config(TrainConfig, overrides={"train_manifest": str(tmp_path)})


def tensorboard_scalars(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"]) | set(accumulator.Tags().get("tensors", []))
    return tags


def test_tracking_wandb_offline_and_tensorboard_log_every_metric(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.run(tiny_train_config(tiny_model_dir, tiny_corpus, out, wandb=True, max_steps=2, eval_steps=2))
    tags = tensorboard_scalars(out / "tensorboard")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_second",
                "train/memory_mb", "dev/cer", "dev/wer"):
        assert tag in tags, (tag, tags)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run file is protobuf records (read back only by `wandb sync`); metric names are stored verbatim.
    records = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/grad_norm", b"train/memory_mb", b"dev/cer", b"dev/wer"):
        assert key in records, key
    (table,) = runs[0].glob("files/media/table/dev/predictions_*.table.json")  # sample predictions
    content = json.loads(table.read_text())
    assert content["columns"] == ["audio", "reference", "hypothesis"] and len(content["data"]) == 2


def english_retain_set(corpus):
    """The dev clips relabelled as English: a retain manifest for the forgetting-guard tests."""
    rows = [json.loads(line) for line in (corpus / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    retain = corpus / "retain.jsonl"
    retain.write_text("".join(json.dumps(dict(r, language="en", sentence="hello there")) + "\n" for r in rows))
    return retain, rows


def test_replay_mixes_the_retain_share_and_the_retain_set_is_scored(tiny_model_dir, tiny_corpus, tmp_path):
    retain, rows = english_retain_set(tiny_corpus)
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "run", max_steps=2, eval_steps=2,
                                          batch_size=8, retain_manifest=str(retain), replay_ratio=0.25,
                                          sample_log=True))
    assert any("retain_wer" in h and "dev_cer" in h for h in summary["history"])
    seen = [line.split("\t")[1] for line in (tmp_path / "run" / "samples.rank0.txt").read_text().splitlines()]
    epoch = seen[:8]  # 6 training clips + round(6 * 0.25 / 0.75) = 2 replayed
    assert sum(s.startswith(str(tiny_corpus / "audio")) for s in epoch) == 8
    replayed = {str((tiny_corpus / r["audio"]["path"]).resolve()) for r in rows}
    assert sum(s in replayed for s in epoch) == 2


def tiny_lora(tiny_model_dir, tiny_corpus):
    from transformers import WhisperForConditionalGeneration

    from whisper_lora.lora import apply_adapter

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    config = build_config(TrainConfig, overrides={"train_manifest": str(tiny_corpus / "train.jsonl"), "lora_r": 4})
    return apply_adapter(model, config, 10)


def test_distilled_rows_are_pulled_towards_the_base_model_and_the_others_train_on_labels(tiny_model_dir, tiny_corpus):
    torch.manual_seed(0)
    model = tiny_lora(tiny_model_dir, tiny_corpus).train()
    inputs = {"input_features": torch.randn(3, 80, 3000)}
    labels = torch.tensor([[50258, 50260, 400, 401, 50257], [50258, 50259, 402, 50257, -100],
                           [50258, 50259, 403, 404, 50257]])
    replayed = torch.tensor([False, True, True])
    # without distillation: the mean cross-entropy over the 14 label tokens (padding ignored), computed here
    # from the logits rather than taken from the model's own loss
    logits = model(**inputs, labels=labels).logits
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain = train.training_loss(model, model, inputs, labels, None)
    assert plain.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert plain.item() == pytest.approx(sum(-logits[r].log_softmax(-1)[c, labels[r, c]].item() for r in range(3)
                                             for c in range(5) if labels[r, c] >= 0) / 14, rel=1e-5)

    # LoRA starts as the identity (B = 0): the adapted model *is* the base, so the KL terms are zero
    # and the loss is the first row's cross-entropy over the batch's 14 label tokens.
    loss = train.training_loss(model, model, inputs, labels, replayed)
    first_row_ce = model(input_features=inputs["input_features"][:1], labels=labels[:1]).loss * 5
    assert loss.item() == pytest.approx(first_row_ce.item() / 14, rel=1e-5)

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    only_replayed = train.training_loss(model, model, inputs, labels, torch.tensor([True, True, True]))
    assert only_replayed.item() > 1e-4  # moved away from the base: the KL notices
    only_replayed.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.zero_grad()
    with torch.no_grad(), model.disable_adapter():  # the base model itself is unchanged by the context
        base_loss = model(**inputs, labels=labels).loss
    assert base_loss.item() != pytest.approx(model(**inputs, labels=labels).loss.item())


def test_distilled_replay_trains_end_to_end_and_its_conflicts_are_refused(tiny_model_dir, tiny_corpus, tmp_path):
    from whisper_lora.errors import UserError

    retain, _ = english_retain_set(tiny_corpus)
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "run", max_steps=2, eval_steps=2,
                                          batch_size=4, retain_manifest=str(retain), replay_ratio=0.25,
                                          replay_loss="distill"))
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(UserError, match="--replay-loss distill needs --replay-ratio"):
        tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "a", retain_manifest=str(retain), replay_loss="distill")
    with pytest.raises(UserError, match="--replay-loss distill and --method full conflict"):
        tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "b", retain_manifest=str(retain), replay_ratio=0.2,
                          replay_loss="distill", method="full")


def test_replay_sampler_cycles_through_the_retain_set_across_epochs():
    sampler = train.EpochShuffleSampler(6, seed=1, replay=4, replay_ratio=0.25)
    assert len(sampler) == 8
    replayed = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(i for i in order if i < 6) == list(range(6))
        replayed += [i for i in order if i >= 6]
    assert sorted(replayed) == [6, 7, 8, 9]  # two epochs of 2 cover the 4 retain samples once


def test_retain_set_without_languages_or_in_a_language_the_model_lacks_is_refused(tmp_path, tiny_corpus):
    from whisper_lora.errors import UserError

    rows = (tiny_corpus / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    unnamed = tiny_corpus / "unnamed.jsonl"
    unnamed.write_text("".join(json.dumps({k: v for k, v in json.loads(r).items() if k != "language"}) + "\n"
                               for r in rows))
    with pytest.raises(UserError, match="--retain-manifest rows need a 'language' field"):
        train.run(build_config(TrainConfig, overrides={"train_manifest": str(tiny_corpus / "train.jsonl"),
                                                       "retain_manifest": str(unnamed),
                                                       "output_dir": str(tmp_path / "a")}))
    klingon = tiny_corpus / "xx.jsonl"
    klingon.write_text("".join(json.dumps(dict(json.loads(r), language="zh")) + "\n" for r in rows))
    with pytest.raises(UserError, match="--retain-manifest and --model conflict: the model is English-only"):
        train.run(build_config(TrainConfig, overrides={"train_manifest": str(tiny_corpus / "train.jsonl"),
                                                       "retain_manifest": str(klingon), "model": "embedded:tiny.en",
                                                       "language": "en", "output_dir": str(tmp_path / "b"),
                                                       "max_steps": 1}))


@pytest.mark.parametrize("method", ["dora", "adalora", "full"])
def test_every_method_trains_saves_and_loads_back(method, tiny_model_dir, tiny_corpus, tmp_path):
    from whisper_lora.models import load_model

    out = tmp_path / "run"
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, out, method=method, max_steps=4,
                                          lora_r=2, eval_steps=4, learning_rate=1e-5 if method == "full" else 1e-3))
    assert summary["steps"] == 4 and all(np.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    model, _ = load_model(str(out / "adapter"))  # adapter folder, or a whole model for `full`
    assert type(model).__name__ == ("WhisperForConditionalGeneration" if method == "full" else "PeftModel")
    if method == "adalora":
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "ADALORA" and config["init_r"] == 3 and config["target_r"] == 2
    assert (out / "checkpoints").is_dir() and list((out / "checkpoints").iterdir())


def test_end_training_frees_the_ddp_wrapper_before_destroying_its_process_group(tmp_path, monkeypatch):
    """The DDP reducer must not be the last owner of the gloo group: destroyed from there, at exit,
    the group's destructor holds the GIL while joining a worker thread that waits for it (a hung rank)."""
    import weakref

    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    accelerator = Accelerator(cpu=True)
    wrapper = DistributedDataParallel(torch.nn.Linear(2, 2))
    accelerator._models.append(wrapper)  # what accelerator.prepare keeps of a model under DDP
    alive = weakref.ref(wrapper)
    del wrapper
    seen = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: (seen.append(alive() is not None), destroy(*a)))
    train.end_training(accelerator)
    assert seen == [False]  # the group was destroyed once, after the wrapper was gone
    assert not dist.is_initialized()


def test_packed_training_counts_utterances_and_resumes_exactly(tiny_model_dir, tiny_corpus, tmp_path):
    """--pack: windows of several utterances; samples_seen counts utterances; a run resumed from its step-2
    checkpoint ends with the weights of the uninterrupted run."""
    config = tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "run", pack=True, max_steps=4, batch_size=1,
                               save_steps=2, dev_manifest=None, lora_dropout=0.0, tensorboard=False)
    summary = train.run(config)
    # 6 clips of ~3 s fill one window: a window a step, so 4 steps = 4 epochs = 24 utterances
    assert summary["samples_seen"] == 24
    weights = load_file(tmp_path / "run" / "last" / "adapter_model.safetensors")
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    for later in checkpoints[1:]:
        import shutil

        shutil.rmtree(later)
    resumed = train.run(replace(config, resume=True))
    assert resumed["steps"] == 4 and resumed["samples_seen"] == 24
    again = load_file(tmp_path / "run" / "last" / "adapter_model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantised_base_trains_saves_merges_and_transcribes_with_real_weights(bits, mandarin_adapter, tmp_path, capsys):
    """QLoRA-style on the CPU with the embedded whisper-base: the frozen base loaded in 8-bit (LLM.int8) or
    4-bit NF4, decoder LoRA trained on 4 of the shared fixture's robotic-Mandarin clips (the base reads them at
    CER > 100%), the adapter merged into the full-precision base, and the merged model reads them back."""
    from conftest import cli_here

    rows = mandarin_adapter[1][:4]  # the frozen 8-bit encoder reads each clip once: ~1.4 s a clip on the CPU
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    summary = train.run(build_config(TrainConfig, overrides={
        "train_manifest": str(manifest), "output_dir": str(out), f"load_in_{bits}bit": True, "freeze_encoder": True,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "batch_size": 4, "max_steps": 10,
        "learning_rate": 3e-3, "warmup_steps": 2, "timestamp_fraction": 0.0, "tensorboard": False}))
    assert summary["steps"] == 10
    assert f"load_in_{bits}bit: true" in (out / "config.yaml").read_text()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "openai/whisper-base"  # merged and served over the full-precision base

    merged = tmp_path / "merged"
    assert cli_here(capsys, "merge", str(out / "adapter"), "--output-dir", str(merged)).returncode == 0
    weights = load_file(merged / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # no int8 / packed 4-bit left in the model
    report, scored = tmp_path / "report.json", tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = cli_here(capsys, "evaluate", str(scored), "--models", str(merged), "--language", "zh",
                      "--output", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    cer = json.loads(report.read_text())["models"][0]["cer"]
    assert cer < 0.25, cer


def test_acft_draws_short_contexts_that_still_hold_the_audio():
    torch.manual_seed(0)
    drawn = [train.acft_context([2.4, 3.7]) for _ in range(200)]
    assert min(drawn) == 500 and max(drawn) == 3000  # 3.7 s + 1 s, rounded up to whole seconds ... 30 s
    assert len(set(drawn)) > 10 and all(d % 100 == 0 for d in drawn)
    assert all(train.acft_context([29.5]) == 3000 for _ in range(5))  # a full window has no shorter context


def test_acft_pulls_the_short_context_reading_onto_the_full_one(tiny_model_dir, tiny_corpus, monkeypatch):
    """The adapter starts as the identity: at 30 s the student is the teacher (KL 0), at a short context it
    is not (the encoder sees less), and the gradient reaches the adapter."""
    torch.manual_seed(0)
    model = tiny_lora(tiny_model_dir, tiny_corpus).train()
    features = torch.randn(2, 80, 3000)
    labels = torch.tensor([[50258, 50260, 400, 401, 50257], [50258, 50260, 402, 50257, -100]])
    monkeypatch.setattr(train, "acft_context", lambda seconds: 3000)
    assert train.acft_loss(model, model, features, labels, [3.0, 2.0], 1.0).item() == pytest.approx(0.0, abs=1e-5)
    monkeypatch.setattr(train, "acft_context", lambda seconds: 400)
    kl = train.acft_loss(model, model, features, labels, [3.0, 2.0], 1.0)
    assert kl.item() > 1e-3
    mixed = train.acft_loss(model, model, features, labels, [3.0, 2.0], 0.5)
    from whisper_lora.decode.kv import Network

    ce = model(encoder_outputs=(Network(model).encode(features[..., :400]),), labels=labels).loss
    assert mixed.item() == pytest.approx(0.5 * ce.item() + 0.5 * kl.item(), rel=1e-4)
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # once the adapter has learned something, the base as teacher pulls it back at 30 s; itself as teacher does not
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    monkeypatch.setattr(train, "acft_context", lambda seconds: 3000)
    train.acft_loss(model, model, features, labels, [3.0, 2.0], 1.0, "self")
    assert model.training  # the teacher's eval-mode reading leaves the student training
    model.eval()  # (the student's LoRA dropout aside)
    assert train.acft_loss(model, model, features, labels, [3.0, 2.0], 1.0, "base").item() > 1e-3
    assert train.acft_loss(model, model, features, labels, [3.0, 2.0], 1.0, "self").item() == pytest.approx(0.0, abs=1e-5)
    assert [train.acft_teacher(SimpleNamespace(acft_teacher="auto", acft_weight=w)) for w in (1.0, 0.5)] == ["base", "self"]


def test_acft_trains_records_itself_and_is_read_at_its_floor(tiny_model_dir, tiny_corpus, tmp_path):
    from whisper_lora.audio_ctx import ACFT_FLOOR_SECONDS
    from whisper_lora.decode import DecodeOptions, load_backend
    from whisper_lora.errors import UserError

    out = tmp_path / "run"
    summary = train.run(tiny_train_config(tiny_model_dir, tiny_corpus, out, max_steps=2, eval_steps=2, acft=True))
    assert all(np.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    recorded = json.loads((out / "adapter" / "decoding.json").read_text())
    assert recorded["audio_ctx"] == ACFT_FLOOR_SECONDS and recorded["trained_with"] == "acft"
    backend = load_backend(str(out / "adapter"), device="cpu")
    assert backend.model_audio_ctx == ACFT_FLOOR_SECONDS
    frames = []
    encode = backend.encode
    backend.encode = lambda features, adapter=None: frames.append(features.shape[-1]) or encode(features, adapter)
    clip = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
    backend.transcribe_batch([clip], ["zh"], DecodeOptions(temperature=(0.0,), max_new_tokens=4, without_timestamps=True))
    assert frames == [round(ACFT_FLOOR_SECONDS * 100)]  # its floor (above a 2 s clip + 1 s), not the base's 10 s
    backend.transcribe_batch([clip], ["zh"], DecodeOptions(temperature=(0.0,), max_new_tokens=4, without_timestamps=True,
                                                           audio_ctx="full"))
    assert frames[-1] == 3000  # a command that says otherwise wins
    for conflict in (dict(pack=True), dict(method="full"), dict(acft_weight=0.0)):
        with pytest.raises(UserError, match="--acft"):
            tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "x", acft=True, **conflict)


def test_acft_conflicts_with_distilled_replay_and_zero3_are_refused_in_one_line(tiny_model_dir, tiny_corpus, tmp_path):
    from whisper_lora.errors import UserError

    retain, _ = english_retain_set(tiny_corpus)
    with pytest.raises(UserError, match="--acft and --replay-loss distill conflict"):
        tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "a", acft=True, retain_manifest=str(retain),
                          replay_ratio=0.2, replay_loss="distill")
    with pytest.raises(UserError, match="--acft and ZeRO-3 conflict"):
        tiny_train_config(tiny_model_dir, tiny_corpus, tmp_path / "b", acft=True,
                          deepspeed=str(REPO / "configs" / "deepspeed" / "zero3.json"))
