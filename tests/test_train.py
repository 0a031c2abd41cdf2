import json
import os
import signal
import subprocess
import sys
import time

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


def test_real_model_learns_with_the_frozen_encoder_path(base_model_dir, tiny_corpus, tmp_path):
    summary = train.run(tiny_train_config(base_model_dir, tiny_corpus, tmp_path / "run", max_steps=6, batch_size=6,
                                          dev_manifest=None, learning_rate=1e-3, warmup_steps=0,
                                          freeze_encoder=True, lora_r=16))
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses[-1] < losses[0] * 0.7, losses
    assert (tmp_path / "run" / "encoder_cache.rank0.npy").is_file()


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
    from whisper_lora.data import log_mel
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


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_model_dir, tiny_corpus, tmp_path):
    args = ["train", "--train-manifest", str(tiny_corpus / "train.jsonl"), "--model", str(tiny_model_dir),
            "--batch-size", "2", "--max-steps", "9", "--save-steps", "2", "--lora-r", "4", "--no-tensorboard",
            "--warmup-steps", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference = subprocess.run([sys.executable, "-m", "whisper_lora", *args, "--output-dir", str(tmp_path / "ref")],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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
