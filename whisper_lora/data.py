"""Samples -> model inputs: decoder prompts, labels, log-mel features, and the batch collator.

Labels are padded per batch (to the longest in the batch, not to a fixed 128/448), which is most of
why our steps are cheaper than the common recipe. A sample whose audio cannot be decoded is never
swapped for another one: the dataset returns an error record, the collator drops it, and the
training loop counts and lists it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .audio import check_window, load_window, log_mel
from .constants import CHUNK_SECONDS, MAX_TARGET_TOKENS, SAMPLE_RATE
from .errors import AudioError
from .manifest import Sample, TimedText
from .tokens import SpecialTokens

LABEL_PAD = -100  # ignored by the cross-entropy loss


@dataclass
class SkippedSample:
    index: int
    source: str
    reason: str


def _stable_fraction(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`: the same in every process, worker and resume."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class LabelBuilder:
    """Token labels for samples, with or without Whisper's timestamp tokens.

    Timestamp labels follow Whisper's training format, `<|sot|><|lang|><|task|><|t0|> text<|t1|>…<|eot|>`,
    with times on the 0.02 s grid taken from a row's `sentences` (or the whole clip as one segment).
    Rows with empty text become no-speech samples, `<|sot|><|nospeech|><|eot|>`: the position where
    Whisper reads its no-speech probability. Without `timestamps`, `timestamp_fraction` of the samples
    (chosen per epoch, deterministically) still get timestamp labels, so a fine-tuned model keeps
    predicting timestamps instead of forgetting them.

    Labels exclude <|startoftranscript|>: the model prepends it itself.
    """

    def __init__(self, tokenizer, generation_config, default_language: str | None, task: str = "transcribe",
                 timestamps: bool = False, timestamp_fraction: float = 0.0, seed: int = 0):
        self.tokenizer, self.generation_config = tokenizer, generation_config
        self.default_language, self.task = default_language, task
        self.timestamps, self.timestamp_fraction, self.seed = timestamps, timestamp_fraction, seed
        self.special = SpecialTokens(generation_config, tokenizer)
        self.eot = self.special.eot
        self._prompts: dict[tuple, list[int]] = {}

    def prompt(self, language: str | None, timestamps: bool) -> list[int]:
        key = (language, timestamps)
        if key not in self._prompts:
            self._prompts[key] = self.special.prompt(language, self.task, timestamps)
        return self._prompts[key]

    def uses_timestamps(self, sample: Sample, epoch: int) -> bool:
        if self.timestamps:
            return True
        return self.timestamp_fraction > 0 and _stable_fraction(self.seed, epoch, sample.id) < self.timestamp_fraction

    def time_token(self, seconds: float) -> int:
        return self.special.time_token(seconds)

    def build(self, sample: Sample, clip_seconds: float | None = None, epoch: int = 0) -> list[int]:
        """Full label ids (including <|startoftranscript|>). `clip_seconds` ends a timestamp segment
        for rows without `sentences`; without it the label has the right length but a guessed end."""
        return self.ids(sample, self.uses_timestamps(sample, epoch), clip_seconds)

    def ids(self, sample: Sample, timestamps: bool, clip_seconds: float | None = None) -> list[int]:
        """The label in its timestamped or plain form (`build` picks the form per epoch)."""
        if not sample.text.strip() and not sample.sentences:
            return [self.special.sot, self.special.no_speech, self.eot]
        language = sample.language or self.default_language
        if not timestamps:
            return self.prompt(language, False) + self.special.text_ids(sample.text) + [self.eot]
        segments = sample.sentences or (TimedText(0.0, clip_seconds or sample.duration or CHUNK_SECONDS, sample.text),)
        ids = list(self.prompt(language, True))
        for segment in segments:
            text = self.special.segment_ids(segment.text, language)
            ids += [self.time_token(segment.start)] + text + [self.time_token(segment.end)]
        return ids + [self.eot]

    def packed_tokens(self, sample: Sample) -> int:
        """Label tokens this sample adds to a packed window: its text and a timestamp pair per segment."""
        language = sample.language or self.default_language
        if sample.sentences:
            return sum(len(self.special.segment_ids(t.text, language)) + 2 for t in sample.sentences)
        return len(self.special.segment_ids(sample.text, language)) + 2 if sample.text.strip() else 0

    @property
    def ever_timestamps(self) -> bool:
        return self.timestamps or self.timestamp_fraction > 0

    def longest(self, sample: Sample) -> int:
        """The most tokens this sample's label can have in any epoch (timestamps add 2 per segment)."""
        return len(self.ids(sample, self.ever_timestamps))


def build_labels(samples: list[Sample], processor, generation_config, default_language: str | None,
                 task: str, builder: LabelBuilder | None = None) -> tuple[list[list[int] | None], list[SkippedSample]]:
    """Token labels for every sample (prompt without <|startoftranscript|>, text, <|endoftext|>).

    Samples whose labels exceed Whisper's 448-token context are reported, not truncated: a truncated
    label teaches the model to stop mid-sentence. Returned labels are those of epoch 0; a dataset with
    a `builder` rebuilds them per epoch (timestamp fraction) and per clip length.
    """
    builder = builder or LabelBuilder(processor.tokenizer, generation_config, default_language, task)
    labels: list[list[int] | None] = []
    skipped: list[SkippedSample] = []
    for i, sample in enumerate(samples):
        if not sample.text.strip() and not sample.sentences and not builder.timestamps:
            labels.append(None)
            skipped.append(SkippedSample(i, sample.source, "empty text (train with --timestamps to use it as a "
                                                         "no-speech sample)"))
            continue
        longest_form = builder.ids(sample, builder.ever_timestamps)
        if len(longest_form) > MAX_TARGET_TOKENS:
            labels.append(None)
            skipped.append(SkippedSample(i, sample.source, f"label has {len(longest_form)} tokens, over Whisper's "
                                                         f"{MAX_TARGET_TOKENS}-token limit"))
        elif builder.uses_timestamps(sample, 0) == builder.ever_timestamps:
            labels.append(longest_form[1:])  # epoch 0 uses this form: tokenise once, not twice
        else:
            labels.append(builder.build(sample)[1:])
    return labels, skipped


class ItemMaker:
    """One sample -> the dict the collator takes: features (decoded, or from a feature cache), the
    epoch's label, and the sample id; or an error record naming the sample, never a substitute.

    Shared by the in-memory dataset and the shard stream so both train on exactly the same inputs.
    """

    def __init__(self, processor, builder: LabelBuilder, augmenter=None, feature_cache=None):
        self.processor, self.builder = processor, builder
        self.augmenter, self.feature_cache = augmenter, feature_cache
        self.epoch = 0

    def error(self, index: int, sample: Sample, message: str) -> dict:
        return {"index": index, "id": sample.id, "error": message, "source": sample.source}

    def __call__(self, sample: Sample, index: int, audio: np.ndarray | None = None) -> dict:
        cached = self.feature_cache.get(sample.id) if self.feature_cache is not None and audio is None else None
        if cached is not None:
            features, seconds = cached
        else:
            try:
                audio = load_window(sample.audio_path, sample.start, sample.end) if audio is None \
                    else check_window(audio, sample.audio_path)
            except AudioError as exc:
                return self.error(index, sample, str(exc))
            if self.augmenter is not None:
                audio, scale, offset = self.augmenter.audio_with_timing(audio, sample.id, self.epoch)
                if sample.sentences and (scale != 1.0 or offset):  # timestamps move with the speech
                    sample = replace(sample, sentences=tuple(
                        TimedText(s.start * scale + offset, s.end * scale + offset, s.text) for s in sample.sentences))
            seconds = len(audio) / SAMPLE_RATE
            features = log_mel(self.processor, audio)
        if self.augmenter is not None:
            features = self.augmenter.features(features, sample.id, self.epoch)
        label = self.builder.build(sample, clip_seconds=seconds, epoch=self.epoch)[1:]
        if len(label) + 1 > MAX_TARGET_TOKENS:  # only streamed samples get here: manifests are checked up front
            return self.error(index, sample, f"{sample.source}: label has {len(label) + 1} tokens, over "
                                             f"Whisper's {MAX_TARGET_TOKENS}-token limit")
        if not sample.text.strip() and not sample.sentences and not self.builder.timestamps:
            return self.error(index, sample, f"{sample.source}: empty text (train with --timestamps to use "
                                             "it as a no-speech sample)")
        return {"index": index, "id": sample.id, "input_features": features, "labels": label, "seconds": seconds}


class SpeechDataset(torch.utils.data.Dataset):
    """Decodes audio and computes features lazily, so DataLoader workers can do it in parallel.

    `samples` should already exclude those `build_labels` rejected (over-long labels).
    """

    def __init__(self, samples: list[Sample], processor, builder: LabelBuilder, augmenter=None, feature_cache=None):
        self.samples = list(samples)
        self.make_item = ItemMaker(processor, builder, augmenter, feature_cache)

    @property
    def epoch(self) -> int:
        return self.make_item.epoch

    def set_epoch(self, epoch: int) -> None:
        self.make_item.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.make_item(self.samples[i], i)


def shard_item_maker(processor, builder: LabelBuilder, augmenter=None):
    """`make_item` for `ShardStream`: decode a shard record's FLAC and build the same item as above."""
    import io

    import soundfile as sf

    from .shards import sample_from_meta

    maker = ItemMaker(processor, builder, augmenter)

    def make(record, epoch: int) -> dict:
        maker.epoch = epoch
        if record.error:
            return {"index": -1, "id": record.key, "error": record.error, "source": record.key}
        sample = sample_from_meta(record.meta, Path(record.key))
        try:
            audio, rate = sf.read(io.BytesIO(record.flac), dtype="float32")
        except (sf.LibsndfileError, RuntimeError) as exc:
            return maker.error(-1, sample, f"{sample.source}: cannot decode shard audio ({exc})")
        if rate != SAMPLE_RATE or audio.ndim != 1 or not np.isfinite(audio).all():
            return maker.error(-1, sample, f"{sample.source}: shard audio is not finite 16 kHz mono")
        return maker(sample, -1, audio)

    return make


class EncoderCache:
    """Encoder outputs of every training clip, computed once and memory-mapped from disk.

    Exact, not an approximation: with the encoder frozen (no LoRA, no dropout) its output for a clip
    never changes, so re-running it every epoch is pure waste (it is ~2/3 of a step's compute).
    The .npy file survives a crash, so `--resume` does not recompute it.
    """

    def __init__(self, path, dataset: SpeechDataset, model, device, batch_size: int = 8, progress: bool = True):
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
        if done.get("shape") == list(shape) and done.get("samples_sha256") == key and "seconds" in done:
            self.hidden = np.load(path, mmap_mode="r")
            self.errors = {int(k): v for k, v in done["errors"].items()}
            self.seconds = done["seconds"]
            return
        self.seconds = [0.0] * len(dataset)  # clip lengths: timestamp labels end where the clip ends
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
                        self.seconds[it["index"]] = it["seconds"]
        hidden.flush()
        staging = done_file.with_suffix(".partial")
        staging.write_text(json.dumps({"shape": list(shape), "samples_sha256": key, "errors": self.errors,
                                       "seconds": self.seconds}))
        staging.replace(done_file)  # the marker appears only once the cache is complete
        self.hidden = np.load(path, mmap_mode="r")


class CachedEncoderDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: SpeechDataset, cache: EncoderCache):
        self.dataset, self.cache = dataset, cache

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if i in self.cache.errors:
            return self.cache.errors[i]
        sample = self.dataset.samples[i]
        label = self.dataset.make_item.builder.build(sample, self.cache.seconds[i], self.dataset.epoch)[1:]
        return {"index": i, "id": sample.id, "encoder_hidden": np.asarray(self.cache.hidden[i]), "labels": label}


def collate(items: list[dict]) -> dict:
    """Stack features, pad labels to the longest in the batch, and carry skipped samples along."""
    good = [it for it in items if "error" not in it]
    failed = [it for it in items if "error" in it] + [s for it in items for s in it.get("also_skipped", ())]
    batch: dict = {"skipped": [SkippedSample(it["index"], it["source"], it["error"]) for it in failed],
                   "index": [it["index"] for it in good],
                   "count": sum(it.get("count", 1) for it in good),  # utterances trained on (packed: several)
                   "ids": [m for it in items for m in it.get("members", [it.get("id")])],  # every sample, in order
                   "workers": [it.get("worker", 0) for it in items]}
    if not good:
        return batch
    key = "encoder_hidden" if "encoder_hidden" in good[0] else "input_features"
    batch[key] = torch.from_numpy(np.stack([it[key] for it in good]))
    batch["seconds"] = [it.get("seconds", CHUNK_SECONDS) for it in good]  # of audio in each 30 s window
    longest = max(len(it["labels"]) for it in good)
    labels = torch.full((len(good), longest), LABEL_PAD, dtype=torch.long)
    for row, it in enumerate(good):
        labels[row, : len(it["labels"])] = torch.tensor(it["labels"])
    batch["labels"] = labels
    return batch


# ---- packing: short utterances into full 30 s windows ---------------------------------------------------

def sample_seconds(sample: Sample) -> float:
    """A sample's length: declared by the manifest, or its span, or the file's header."""
    if sample.duration:
        return float(sample.duration)
    if sample.start is not None and sample.end is not None:
        return sample.end - sample.start
    from .audio import audio_duration

    try:
        return audio_duration(sample.audio_path) - (sample.start or 0.0)
    except AudioError:
        return 0.0  # planned as nothing; reading it in its window fails again, and reports it skipped


PACK_PAUSE_SECONDS = (0.2, 0.8)  # silence before each utterance of a packed window, drawn per (seed, epoch, place)


@dataclass(frozen=True)
class PackedWindow:
    members: tuple[int, ...]  # dataset indices, in the order they are heard
    pauses: tuple[float, ...]  # seconds of silence before each member


def pack(order: list[int], seconds: list[float], tokens: list[int], languages: list[str | None], seed: int,
         epoch: int, max_seconds: float = CHUNK_SECONDS, max_tokens: int = MAX_TARGET_TOKENS,
         prompt_tokens: int = 4) -> list[PackedWindow]:
    """Utterances, in the epoch's order, filled into windows of one language each: an utterance joins its
    language's open window if its pause, its audio and its label tokens (text + two timestamps) still fit;
    otherwise that window is closed (it takes its place in the output where it was opened) and a new one
    begins. Depends only on its arguments, so every rank and every resumed run packs alike."""
    import random

    rng = random.Random(f"pack:{seed}:{epoch}")
    windows: list[list] = []  # [members, pauses, seconds, tokens]
    open_by_language: dict = {}
    low, high = PACK_PAUSE_SECONDS
    for index in order:
        pause = round(rng.uniform(low, high), 2)
        window = open_by_language.get(languages[index])
        fits = window is not None and window[2] + pause + seconds[index] <= max_seconds \
            and window[3] + tokens[index] <= max_tokens
        if not fits:
            window = [[], [], 0.0, prompt_tokens + 1]  # the prompt and <|endoftext|>
            windows.append(window)
            open_by_language[languages[index]] = window
            # a short lead-in (Whisper's windows rarely start on speech), if a clip this long leaves room
            pause = min(round(rng.uniform(0.0, low), 2), max(0.0, max_seconds - seconds[index]))
        window[0].append(index)
        window[1].append(pause)
        window[2] += pause + seconds[index]
        window[3] += tokens[index]
    return [PackedWindow(tuple(m), tuple(p)) for m, p, _, _ in windows]


class PackedDataset(torch.utils.data.Dataset):
    """A dataset whose items are packed windows: several utterances of one language, with short pauses,
    labelled in Whisper's multi-segment format (a timestamp pair around each utterance, its own inner
    times kept). The plan changes per epoch (`set_epoch`), from the epoch's sample order.

    Each item reports how many utterances it trained on (`count`); an utterance whose audio cannot be
    read is left out of its window and reported, never replaced.
    """

    def __init__(self, base: SpeechDataset, order_for_epoch, seconds: list[float], tokens: list[int], seed: int,
                 max_seconds: float = CHUNK_SECONDS):
        self.base, self.order_for_epoch = base, order_for_epoch
        self.seconds, self.tokens, self.seed, self.max_seconds = seconds, tokens, seed, max_seconds
        self.languages = [s.language or base.make_item.builder.default_language for s in base.samples]
        self.set_epoch(0)

    @property
    def samples(self) -> list[Sample]:
        return self.base.samples

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)
        self.windows = pack(self.order_for_epoch(epoch), self.seconds, self.tokens, self.languages, self.seed, epoch,
                            self.max_seconds)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        maker = self.base.make_item
        window = self.windows[i]
        pieces, sentences, skipped, position, counted = [], [], [], 0.0, 0
        for index, pause in zip(window.members, window.pauses):
            sample = self.base.samples[index]
            try:
                audio = load_window(sample.audio_path, sample.start, sample.end)
            except AudioError as exc:
                skipped.append(maker.error(index, sample, str(exc)))
                continue
            scale, offset = 1.0, 0.0
            if maker.augmenter is not None:
                audio, scale, offset = maker.augmenter.audio_with_timing(audio, sample.id, self.epoch)
            seconds = len(audio) / SAMPLE_RATE
            # Augmentation (a time shift, a slower speed) or a rounded-down manifest duration can make the
            # window longer than planned: the pause gives way first, and only then the utterance.
            pause = min(pause, max(0.0, CHUNK_SECONDS - position - seconds))
            if position + pause + seconds > CHUNK_SECONDS:
                skipped.append(maker.error(index, sample, f"{sample.source}: left out of a packed window this "
                                                         f"epoch: {seconds:.1f} s after augmentation, "
                                                         f"{CHUNK_SECONDS - position:.1f} s left in the window"))
                continue
            pieces += [np.zeros(int(pause * SAMPLE_RATE), np.float32), audio]
            start = position + pause
            if sample.sentences:  # its own times, moved to where it is heard (and with the augmentation)
                sentences += [TimedText(start + t.start * scale + offset, start + t.end * scale + offset, t.text)
                              for t in sample.sentences]
            elif sample.text.strip():
                sentences.append(TimedText(start, start + seconds, sample.text))
            # a no-speech row is heard between the segments, with no segment of its own
            position = start + seconds
            counted += 1
        if not counted:
            members = [self.base.samples[m].id for m in window.members]
            return {**skipped[0], "also_skipped": skipped[1:], "members": members} if skipped else \
                {"index": -1, "id": f"window {i}", "error": "empty packed window", "source": f"window {i}",
                 "members": members}
        first = self.base.samples[window.members[0]]
        packed = Sample(first.audio_path, " ".join(s.text for s in sentences), self.languages[window.members[0]],
                        sentences=tuple(sentences), source=f"packed window {i} of epoch {self.epoch}")
        audio = np.concatenate(pieces)
        features = log_mel(maker.processor, audio)
        if maker.augmenter is not None:
            features = maker.augmenter.features(features, packed.id + f"#{i}", self.epoch)
        label = maker.builder.ids(packed, timestamps=True, clip_seconds=len(audio) / SAMPLE_RATE)[1:]
        return {"index": window.members[0], "id": f"window {i}", "input_features": features, "labels": label,
                "seconds": len(audio) / SAMPLE_RATE, "count": counted, "also_skipped": skipped,
                "members": [self.base.samples[m].id for m in window.members]}
