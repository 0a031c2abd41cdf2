from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, WhisperProcessor

from conftest import write_tone
from whisper_lora.constants import MAX_TARGET_TOKENS
from whisper_lora.data import LABEL_PAD, LabelBuilder, SpeechDataset, build_labels, collate
from whisper_lora.errors import UserError
from whisper_lora.manifest import Sample, TimedText
from whisper_lora.tokens import SpecialTokens


def prompt_ids(generation, language, task="transcribe"):
    return SpecialTokens(generation).prompt(language, task)


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
    assert f"{MAX_TARGET_TOKENS}-token limit" in skipped[0].reason


def test_dataset_reports_bad_audio_instead_of_replacing_it(tmp_path, processor_and_generation):
    processor, _ = processor_and_generation  # noqa: F841 (the generation config is `_`)
    good = write_tone(tmp_path / "good.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    long = write_tone(tmp_path / "long.wav", seconds=31)
    samples = [Sample(good, "a"), Sample(tmp_path / "bad.wav", "b", source="m:2"), Sample(long, "c", source="m:3")]
    dataset = SpeechDataset(samples, processor, LabelBuilder(processor.tokenizer, _, "en"))
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


def tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def test_timestamp_labels_follow_whispers_format_on_the_002_s_grid(processor_and_generation):
    processor, generation = processor_and_generation
    builder = LabelBuilder(processor.tokenizer, generation, "en", timestamps=True)
    sample = Sample(Path("a.wav"), " hello world", sentences=(TimedText(0.0, 1.013, " hello"),
                                                               TimedText(1.5, 2.999, " world")))
    got = tokens(processor, builder.build(sample))
    assert got[:3] == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>"]  # no <|notimestamps|>
    assert got[3] == "<|0.00|>" and got[-1] == "<|endoftext|>"
    stamps = [t for t in got if t.startswith("<|") and t[2].isdigit()]
    assert stamps == ["<|0.00|>", "<|1.02|>", "<|1.50|>", "<|3.00|>"]  # rounded to the 0.02 s grid
    # Without sentences the whole clip is one segment ending where the clip ends.
    whole = tokens(processor, builder.build(Sample(Path("b.wav"), " hi"), clip_seconds=4.37))
    assert whole[3] == "<|0.00|>" and whole[-2] == "<|4.36|>"


def test_empty_text_is_a_no_speech_sample_with_timestamps_and_skipped_without(processor_and_generation):
    processor, generation = processor_and_generation
    silent = Sample(Path("s.wav"), "", source="m.jsonl:line 4")
    with_ts = LabelBuilder(processor.tokenizer, generation, "en", timestamps=True)
    assert tokens(processor, with_ts.build(silent)) == ["<|startoftranscript|>", "<|nocaptions|>", "<|endoftext|>"]
    labels, skipped = build_labels([silent], processor, generation, "en", "transcribe")
    assert labels == [None] and "empty text" in skipped[0].reason and skipped[0].source == "m.jsonl:line 4"


def test_timestamp_fraction_keeps_timestamps_on_that_share_of_samples_per_epoch(processor_and_generation):
    processor, generation = processor_and_generation
    builder = LabelBuilder(processor.tokenizer, generation, "en", timestamp_fraction=0.25, seed=1)
    samples = [Sample(Path(f"{i}.wav"), " text") for i in range(2000)]
    picked = [[builder.uses_timestamps(s, epoch) for s in samples] for epoch in (0, 1)]
    assert abs(np.mean(picked[0]) - 0.25) < 0.03
    assert picked[0] != picked[1]  # a different share of samples each epoch
    assert picked[0] == [builder.uses_timestamps(s, 0) for s in samples]  # deterministic
    notimestamps = generation.no_timestamps_token_id
    chosen = next(s for s, p in zip(samples, picked[0]) if p)
    assert notimestamps not in builder.build(chosen, 2.0, epoch=0)
    # The up-front length check counts the longer (timestamped) form.
    assert builder.longest(chosen) == len(builder.build(chosen, 2.0, epoch=0))
    never = LabelBuilder(processor.tokenizer, generation, "en")
    assert notimestamps in never.build(chosen)


def test_augmented_speed_and_shift_move_timestamp_labels_with_the_speech(tmp_path, processor_and_generation):
    from whisper_lora.augment import AugmentConfig, Augmenter, SpeedConfig

    processor, generation = processor_and_generation
    clip = write_tone(tmp_path / "a.wav", seconds=4.0)
    sample = Sample(clip, " hi there", sentences=(TimedText(1.0, 2.0, " hi"), TimedText(2.5, 4.0, " there")))
    builder = LabelBuilder(processor.tokenizer, generation, "en", timestamps=True)
    faster = Augmenter(AugmentConfig(speed=SpeedConfig(p=1.0, factors=(2.0,))), seed=0)
    item = SpeechDataset([sample], processor, builder, faster)[0]
    assert item["seconds"] == pytest.approx(2.0, abs=0.01)
    stamps = [t for t in tokens(processor, item["labels"]) if t.startswith("<|") and t[2].isdigit()]
    assert stamps == ["<|0.50|>", "<|1.00|>", "<|1.24|>", "<|2.00|>"]  # every time halved (1.25 -> 1.24: half to even)


# ---- packing ------------------------------------------------------------------------------------------

def test_packing_fills_windows_of_one_language_under_both_limits():
    from whisper_lora.data import pack

    seconds = [4.0, 9.0, 12.0, 3.0, 8.0, 7.0, 2.0, 6.0]
    tokens = [20, 40, 50, 10, 300, 30, 10, 25]
    languages = ["zh", "zh", "en", "zh", "zh", "en", "zh", "zh"]
    order = [3, 0, 7, 1, 2, 4, 5, 6]
    windows = pack(order, seconds, tokens, languages, seed=1, epoch=0, max_seconds=30.0, max_tokens=448)
    assert sorted(i for w in windows for i in w.members) == list(range(8))  # every utterance, once
    for window in windows:
        assert len({languages[i] for i in window.members}) == 1
        assert sum(window.pauses) + sum(seconds[i] for i in window.members) <= 30.0
        assert 5 + sum(tokens[i] for i in window.members) <= 448
        assert [order.index(i) for i in window.members] == sorted(order.index(i) for i in window.members)
    assert len(windows) < len(order) / 2  # windows hold several utterances
    assert pack(order, seconds, tokens, languages, 1, 0) == windows  # the same plan for every rank and resume
    assert pack(order, seconds, tokens, languages, 1, 1) != windows  # new pauses next epoch


def test_a_packed_item_is_the_utterances_in_a_row_labelled_with_their_times(tmp_path, processor_and_generation):
    from whisper_lora.data import PackedDataset, sample_seconds

    processor, generation = processor_and_generation
    clips = [write_tone(tmp_path / f"{n}.wav", seconds=s, freq=300 + 100 * n) for n, s in enumerate((1.0, 2.0, 1.5))]
    samples = [Sample(clips[0], "hello", "en"), Sample(clips[1], "good morning", "en"),
               Sample(clips[2], "bye", "en", sentences=(TimedText(0.2, 1.0, "bye"),))]
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    samples.insert(1, Sample(tmp_path / "bad.wav", "lost", "en", duration=1.0, source="m.jsonl:2"))
    builder = LabelBuilder(processor.tokenizer, generation, "en", timestamps=False)
    base = SpeechDataset(samples, processor, builder)
    dataset = PackedDataset(base, lambda epoch: list(range(len(samples))), [sample_seconds(s) for s in samples],
                            [builder.packed_tokens(s) for s in samples], seed=0)
    (item,) = [dataset[i] for i in range(len(dataset))]
    assert item["count"] == 3 and [s["source"] for s in item["also_skipped"]] == ["m.jsonl:2"]
    pauses = dataset.windows[0].pauses
    assert item["seconds"] == pytest.approx(4.5 + pauses[0] + pauses[2] + pauses[3], abs=0.01)
    tokens = processor.tokenizer.convert_ids_to_tokens(item["labels"])
    stamps = [float(t[2:-2]) for t in tokens if t.startswith("<|") and t[2:-2].replace(".", "").isdigit()]
    first = pauses[0]
    second = first + 1.0 + pauses[2]
    third = second + 2.0 + pauses[3]
    expected = [first, first + 1.0, second, second + 2.0, third + 0.2, third + 1.0]  # bye keeps its inner times
    assert stamps == pytest.approx(expected, abs=0.021)
    text = processor.tokenizer.decode(item["labels"], skip_special_tokens=True)
    assert text.split() == ["hello", "good", "morning", "bye"]
