from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, WhisperProcessor

from conftest import write_tone
from whisper_lora.data import (LABEL_PAD, MAX_LABEL_TOKENS, SpeechDataset, build_labels, collate, prompt_ids)
from whisper_lora.errors import UserError
from whisper_lora.manifest import Sample


@pytest.fixture(scope="module")
def processor_and_generation(tiny_model_dir):
    return WhisperProcessor.from_pretrained(tiny_model_dir), GenerationConfig.from_pretrained(tiny_model_dir)


def test_prompt_has_language_task_and_no_timestamps(processor_and_generation):
    processor, generation = processor_and_generation
    tokens = processor.tokenizer.convert_ids_to_tokens(prompt_ids(generation, "zh", "transcribe"))
    assert tokens == ["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"]
    assert processor.tokenizer.convert_ids_to_tokens(prompt_ids(generation, "mr", "translate"))[1:3] == ["<|mr|>", "<|translate|>"]


def test_prompt_needs_a_language(processor_and_generation):
    processor, generation = processor_and_generation
    with pytest.raises(UserError, match="needs a language"):
        prompt_ids(generation, None)


def test_labels_use_per_sample_language_and_skip_overlong(processor_and_generation):
    processor, generation = processor_and_generation
    samples = [Sample(Path("a.wav"), "你好", language="zh"), Sample(Path("b.wav"), "hello"),
               Sample(Path("c.wav"), "word " * 500, source="m.jsonl:line 3")]
    labels, skipped = build_labels(samples, processor, generation, "en", "transcribe")
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(labels[0][:3]) == ["<|zh|>", "<|transcribe|>", "<|notimestamps|>"]
    assert tok.convert_ids_to_tokens(labels[1][:1]) == ["<|en|>"]
    assert labels[0][-1] == generation.eos_token_id
    assert tok.decode(labels[0], skip_special_tokens=True) == "你好"
    assert labels[2] is None and skipped[0].source == "m.jsonl:line 3"
    assert f"{MAX_LABEL_TOKENS}-token limit" in skipped[0].reason


def test_dataset_reports_bad_audio_instead_of_replacing_it(tmp_path, processor_and_generation):
    processor, _ = processor_and_generation
    good = write_tone(tmp_path / "good.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    long = write_tone(tmp_path / "long.wav", seconds=31)
    samples = [Sample(good, "a"), Sample(tmp_path / "bad.wav", "b", source="m:2"), Sample(long, "c", source="m:3")]
    dataset = SpeechDataset(samples, [[1, 2], [3], [4]], processor)
    items = [dataset[i] for i in range(3)]
    assert items[0]["input_features"].shape == (80, 3000)
    assert "bad.wav" in items[1]["error"] and items[1]["source"] == "m:2"
    assert "longer than Whisper's 30 s" in items[2]["error"]
    batch = collate(items)
    assert batch["index"] == [0] and len(batch["skipped"]) == 2


def test_collate_pads_labels_to_longest_in_batch():
    items = [{"index": 0, "input_features": np.zeros((80, 3000), np.float32), "labels": [1, 2, 3]},
             {"index": 1, "input_features": np.ones((80, 3000), np.float32), "labels": [4]}]
    batch = collate(items)
    assert batch["labels"].shape == (2, 3)  # per batch, not a fixed 128 or 448
    assert batch["labels"][1].tolist() == [4, LABEL_PAD, LABEL_PAD]
    assert batch["input_features"].dtype == torch.float32
