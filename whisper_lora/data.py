"""Samples -> model inputs: decoder prompts, labels, log-mel features, and the batch collator.

Labels are padded per batch (to the longest in the batch, not to a fixed 128/448), which is most of
why our steps are cheaper than the common recipe. A sample whose audio cannot be decoded is never
swapped for another one: the dataset returns an error record, the collator drops it, and the
training loop counts and lists it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .audio import CHUNK_SECONDS, SAMPLE_RATE, load_audio
from .errors import AudioError, UserError
from .manifest import Sample

MAX_LABEL_TOKENS = 448  # Whisper's decoder context (max_target_positions), prompt tokens included
LABEL_PAD = -100  # ignored by the cross-entropy loss


def prompt_ids(generation_config, language: str | None, task: str = "transcribe") -> list[int]:
    """The decoder prompt <|startoftranscript|><|lang|><|task|><|notimestamps|> for one sample."""
    ids = [generation_config.decoder_start_token_id]
    if getattr(generation_config, "is_multilingual", False):
        lang_to_id = generation_config.lang_to_id or {}
        if language is None:
            raise UserError("this multilingual model needs a language for training: set --language "
                            "or a 'language' field per row")
        token = f"<|{language}|>"
        if token not in lang_to_id:
            raise UserError(f"the model has no language token {token}")
        ids += [lang_to_id[token], generation_config.task_to_id[task]]
    ids.append(generation_config.no_timestamps_token_id)
    return ids


@dataclass
class SkippedSample:
    index: int
    source: str
    reason: str


def build_labels(samples: list[Sample], processor, generation_config, default_language: str | None,
                 task: str) -> tuple[list[list[int] | None], list[SkippedSample]]:
    """Token labels for every sample (prompt without <|startoftranscript|>, text, <|endoftext|>).

    Samples whose labels exceed Whisper's 448-token context are reported, not truncated: a truncated
    label teaches the model to stop mid-sentence.
    """
    texts = [s.text for s in samples]
    encoded = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    eot = generation_config.eos_token_id
    eot = eot[0] if isinstance(eot, list) else eot
    prompts: dict[str | None, list[int]] = {}
    labels: list[list[int] | None] = []
    skipped: list[SkippedSample] = []
    for i, (sample, text_ids) in enumerate(zip(samples, encoded)):
        language = sample.language or default_language
        if language not in prompts:
            prompts[language] = prompt_ids(generation_config, language, task)
        full = prompts[language] + text_ids + [eot]
        if len(full) > MAX_LABEL_TOKENS:
            labels.append(None)
            skipped.append(SkippedSample(i, sample.source, f"label has {len(full)} tokens, over Whisper's "
                                                         f"{MAX_LABEL_TOKENS}-token limit"))
        else:
            labels.append(full[1:])  # the model prepends <|startoftranscript|> itself
    return labels, skipped


def log_mel(processor, audio: np.ndarray) -> np.ndarray:
    """(n_mels, 3000) log-mel features of up to 30 s of 16 kHz audio, padded as Whisper was trained."""
    return processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]


class SpeechDataset(torch.utils.data.Dataset):
    """Decodes audio and computes features lazily, so DataLoader workers can do it in parallel."""

    def __init__(self, samples: list[Sample], labels: list[list[int] | None], processor):
        keep = [i for i, label in enumerate(labels) if label is not None]
        self.samples = [samples[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.original_index = keep
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        try:
            audio = load_audio(sample.audio_path, sample.start, sample.end)
        except AudioError as exc:
            return {"index": i, "error": str(exc), "source": sample.source}
        if len(audio) > CHUNK_SECONDS * SAMPLE_RATE:
            return {"index": i, "source": sample.source,
                    "error": f"{sample.audio_path}: {len(audio) / SAMPLE_RATE:.1f} s is longer than Whisper's "
                             f"{CHUNK_SECONDS} s window; the transcript would no longer match the audio"}
        return {"index": i, "input_features": log_mel(self.processor, audio), "labels": self.labels[i]}


class EncoderCache:
    """Encoder outputs of every training clip, computed once and memory-mapped from disk.

    Exact, not an approximation: with the encoder frozen (no LoRA, no dropout) its output for a clip
    never changes, so re-running it every epoch is pure waste (it is ~2/3 of a step's compute).
    The .npy file survives a crash, so `--resume` does not recompute it.
    """

    def __init__(self, path, dataset: SpeechDataset, model, device, batch_size: int = 8, progress: bool = True):
        from pathlib import Path

        from tqdm.auto import tqdm

        path = Path(path)
        encoder = model.get_encoder()
        shape = (len(dataset), encoder.config.max_source_positions, encoder.config.d_model)
        done_file = path.with_suffix(".done.json")
        # Keyed on what was encoded, not just how much: an edited manifest of the same length recomputes.
        import hashlib

        key = hashlib.sha256(json.dumps([s.id for s in dataset.samples]).encode()).hexdigest()
        self.errors: dict[int, dict] = {}
        try:
            done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        except json.JSONDecodeError:
            done = {}
        if done.get("shape") == list(shape) and done.get("samples_sha256") == key:
            self.hidden = np.load(path, mmap_mode="r")
            self.errors = {int(k): v for k, v in done["errors"].items()}
            return
        hidden = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        with torch.inference_mode():
            for start in tqdm(range(0, len(dataset), batch_size), desc="encode (cached once)", disable=not progress):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                good = [it for it in items if "error" not in it]
                self.errors.update({it["index"]: it for it in items if "error" in it})
                if good:
                    features = torch.from_numpy(np.stack([it["input_features"] for it in good])).to(device)
                    out = encoder(features).last_hidden_state.to(torch.float16).cpu().numpy()
                    for it, row in zip(good, out):
                        hidden[it["index"]] = row
        hidden.flush()
        staging = done_file.with_suffix(".partial")
        staging.write_text(json.dumps({"shape": list(shape), "samples_sha256": key, "errors": self.errors}))
        staging.replace(done_file)  # the marker appears only once the cache is complete
        self.hidden = np.load(path, mmap_mode="r")


class CachedEncoderDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: SpeechDataset, cache: EncoderCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if i in self.cache.errors:
            return self.cache.errors[i]
        return {"index": i, "encoder_hidden": np.asarray(self.cache.hidden[i]), "labels": self.dataset.labels[i]}


def collate(items: list[dict]) -> dict:
    """Stack features, pad labels to the longest in the batch, and carry skipped samples along."""
    good = [it for it in items if "error" not in it]
    batch: dict = {"skipped": [SkippedSample(it["index"], it["source"], it["error"]) for it in items if "error" in it],
                   "index": [it["index"] for it in good]}
    if not good:
        return batch
    key = "encoder_hidden" if "encoder_hidden" in good[0] else "input_features"
    batch[key] = torch.from_numpy(np.stack([it[key] for it in good]))
    longest = max(len(it["labels"]) for it in good)
    labels = torch.full((len(good), longest), LABEL_PAD, dtype=torch.long)
    for row, it in enumerate(good):
        labels[row, : len(it["labels"])] = torch.tensor(it["labels"])
    batch["labels"] = labels
    return batch
