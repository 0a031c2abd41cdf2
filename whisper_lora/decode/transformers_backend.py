"""The transformers backend: any Whisper model, LoRA adapters included, decoded by our own loop.

`TransformersBackend` runs openai/whisper's decoding algorithm on the transformers modules (see kv.py)
instead of `generate()`: each window is encoded once however many temperatures it is retried at, the
no-speech probability comes out of the prompt's own forward pass, the per-token logit rules cost a few
tensor ops, and a decoding step is a lean pass over preallocated key/value buffers. It produces the
same tokens as `generate()` (tests check it), gives faster-whisper's per-window `avg_logprob` /
`no_speech_prob` and word-level timestamps (alignment heads + DTW), and it is faster than `generate()`.

The model work of a call goes through `self.window_model`: the backend itself, or (in the server) a
view that hands each piece of work to the service's batcher, which decodes the windows of concurrent
calls, for any adapters, together.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..constants import CHUNK_SECONDS, MAX_TARGET_TOKENS, SAMPLE_RATE, TIME_PRECISION
from ..audio import log_mel
from ..tokens import SpecialTokens
from . import longform
from .alignatt import FRONTIER_POSITIONS, AlignAttDecoder, AlignAttResult
from .kv import Network
from .rules import LogitRules
from .search import Search, WindowResult
from .timing import WordTiming, alignment_heads, find_alignment
from .types import GREEDY, DecodeOptions, Segment, TranscriptionInfo, Word


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersBackend:
    """Wraps a (possibly LoRA-adapted) transformers Whisper model for decoding."""

    def __init__(self, model, processor, device: str | None = None, compile: bool = False):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.generation_config = base.generation_config
        self.tokens = SpecialTokens(self.generation_config, processor.tokenizer)
        self.network = Network(model)
        if compile:
            # The encoder always sees (batch, n_mels, 3000): one graph, and most of a window's compute.
            self.network.encode = torch.compile(self.network.encode)
        self.alignment_heads = alignment_heads(self.generation_config, base.config)
        self.search = Search(self.network, self.tokens,
                             LogitRules(self.tokens, self.generation_config, self.network.vocab_size, self.device),
                             self.alignment_heads)
        self.alignatt_decoder = AlignAttDecoder(self.network, self.tokens, self.search.rules, self.alignment_heads)
        self.multilingual = self.tokens.multilingual
        self.languages = self.tokens.languages
        self.window_model: longform.WindowModel = self
        self.model_audio_ctx = None  # the model's own encoder context (an --acft adapter's), for options with None

    def batched(self, window_model: longform.WindowModel) -> TransformersBackend:
        """The same backend, its model work handed to `window_model` (the service's batcher)."""
        view = copy.copy(self)
        view.window_model = window_model
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    # ---- features (the caller's thread) -------------------------------------------------------------

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([log_mel(self.processor, a) for a in audios])).to(self.device, self.dtype)

    def block_features(self, audio: np.ndarray) -> tuple[torch.Tensor, int]:
        inputs = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                  truncation=False, padding="longest", return_attention_mask=True)
        mel = inputs.input_features[0].to(self.device, self.dtype)
        return mel, min(mel.shape[-1], int(inputs.attention_mask[0].sum()))

    # ---- model work, per row: what the batcher calls with the rows of several requests -------------

    @torch.inference_mode()
    def encode_rows(self, features: torch.Tensor, adapters: list[str] | None) -> torch.Tensor:
        return self.network.encode(features, adapters)

    @torch.inference_mode()
    def detect_rows(self, encoded: torch.Tensor, adapters: list[str] | None) -> list[tuple[str, float]]:
        return self.search.detect_language(encoded, adapters)

    @torch.inference_mode()
    def decode_rows(self, encoded: torch.Tensor, prefixes: list[list[int]], options: DecodeOptions, timestamps: bool,
                    adapters: list[str] | None) -> list[WindowResult]:
        return self.search.decode(encoded, prefixes, options, timestamps, adapters)

    def align_row(self, encoded: torch.Tensor, text_tokens: list[int], language: str | None, task: str,
                  num_frames: int, adapter: str | None) -> list[WordTiming]:
        return find_alignment(self.network, self.tokens, self.alignment_heads, encoded, text_tokens, language, task,
                              num_frames, adapter)

    def alignatt_row(self, encoded: torch.Tensor, prefix: list[int], forced: int, content: int, final: bool,
                     max_new: int, language: str | None, start_position: int, threshold: int,
                     adapter: str | None) -> AlignAttResult:
        return self.alignatt_decoder.decode(encoded, prefix, forced, content, final, max_new, language, adapter,
                                            start_position, threshold)

    # ---- the WindowModel protocol, run directly -------------------------------------------------------

    @staticmethod
    def _rows(adapter: str | None, count: int) -> list[str] | None:
        return None if adapter is None else [adapter] * count

    def encode(self, features: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        return self.encode_rows(features, self._rows(adapter, len(features)))

    def detect(self, encoded: torch.Tensor, adapter: str | None = None) -> list[tuple[str, float]]:
        return self.detect_rows(encoded, self._rows(adapter, len(encoded)))

    def decode(self, encoded: torch.Tensor, prefixes: list[list[int]], options: DecodeOptions, timestamps: bool,
               adapter: str | None = None) -> list[WindowResult]:
        return self.decode_rows(encoded, prefixes, options, timestamps, self._rows(adapter, len(prefixes)))

    def align(self, encoded: torch.Tensor, text_tokens: list[int], language: str | None, task: str, num_frames: int,
              adapter: str | None = None) -> list[WordTiming]:
        return self.align_row(encoded, text_tokens, language, task, num_frames, adapter)

    def alignatt(self, encoded: torch.Tensor, prefix: list[int], forced: int, content: int, final: bool, max_new: int,
                 language: str | None, start_position: int, threshold: int, adapter: str | None = None
                 ) -> AlignAttResult:
        return self.alignatt_row(encoded, prefix, forced, content, final, max_new, language, start_position,
                                 threshold, adapter)

    # ---- the Backend protocol -------------------------------------------------------------------------

    def stream_step(self, audio: np.ndarray, language: str | None, options: DecodeOptions, final: bool,
                    start: float = 0.0, threshold: int = FRONTIER_POSITIONS, adapter: str | None = None
                    ) -> tuple[list[Word], list[Word], str]:
        """One AlignAtt decode of a streaming buffer (alignatt.py): (committed words, held-back words, why it
        stopped), times in the buffer. `options.prefix` is the text already committed inside the buffer,
        `options.initial_prompt` what came before it; `start` (s) where the committed text ends."""
        model, tokens, options = self.window_model, self.tokens, self._fitted(options)
        encoded = model.encode(longform.clip_features(model, [audio], options.audio_ctx), adapter)
        lang = (language or model.detect(encoded, adapter)[0][0]) if self.multilingual else "en"
        forced = tokens.prompt_ids(options.prefix)
        prefix = tokens.prefix(lang, options.task, False, tokens.prompt_ids(options.initial_prompt)) + forced
        max_new = max(1, min(options.max_new_tokens, MAX_TARGET_TOKENS - len(prefix) - 1))
        content = -(-longform.content_frames(audio) // 2)  # encoder positions holding audio (2 frames each)
        result = model.alignatt(encoded, prefix, len(forced), content, final, max_new, lang,
                                round(start / TIME_PRECISION), threshold, adapter)

        heard = len(audio) / SAMPLE_RATE

        def words(timed) -> list[Word]:
            # the rows predicting a final full stop attend into the padding past the audio: times stay in it
            return [Word(round(min(w.start, heard), 3), round(min(w.end, heard), 3), w.word, round(w.probability, 4))
                    for w in timed]

        return words(result.committed), words(result.held), result.stop

    def _fitted(self, options: DecodeOptions) -> DecodeOptions:
        return replace(options, audio_ctx=self.model_audio_ctx) if options.audio_ctx is None and self.model_audio_ctx \
            else options

    def transcribe_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                         options: DecodeOptions = GREEDY, adapter: str | None = None
                         ) -> list[tuple[list[Segment], TranscriptionInfo]]:
        """Clips of at most 30 s decoded together (see longform.clips); silent clips give no segment."""
        options = self._fitted(options)
        languages = list(languages or [None] * len(audios))
        return longform.clips(self.window_model, audios, languages, options, adapter)

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False, batch_size: int = 8,
                   adapter: str | None = None) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Transcribe audio of any length, given as samples or as a path (then read block by block).

        With timestamps (the default): openai/whisper's sequential algorithm, a segment per timestamp
        pair, yielded window by window. `options.without_timestamps` on a clip of up to 30 s: one window,
        one segment. With `vad`, only speech is decoded, in 30 s windows decoded in batches, and silence
        yields no segment at all. Every segment carries its window's `avg_logprob` and `no_speech_prob`,
        and its `words` when `options.word_timestamps` is set. The language is detected on the first
        window when not given; the encoder pass that detection needed is reused for decoding.
        """
        model, options = self.window_model, self._fitted(options)
        source, duration = longform.open_source(audio)
        short = duration <= CHUNK_SECONDS
        detect = language is None and self.multilingual
        lang, prob = (language, None) if self.multilingual else ("en", 1.0)
        first_window = None  # (features, encoder output) of the first window, kept from language detection
        if detect:
            head = longform.read_block(source, 0.0, min(duration, CHUNK_SECONDS))
            if not longform.is_silent(head):
                if vad:
                    features = model.features([head])  # a VAD window's context is set by its speech, later
                elif short and options.without_timestamps:  # the audio padded to 30 s, as `clips` decodes it
                    features = longform.clip_features(model, [head], options.audio_ctx)
                else:  # the spectrogram padded, as `sequential` does
                    mel, content = model.block_features(head)
                    features = longform.window_features(mel[:, :content], options.audio_ctx)
                first_window = (features, model.encode(features, adapter))
                (lang, prob), = model.detect(first_window[1], adapter)
        info = TranscriptionInfo(lang, prob, duration)
        if vad:
            return longform.vad_segments(model, source, duration, lang, options, batch_size, adapter), info
        if short and options.without_timestamps:
            encoded = first_window[1] if first_window else None
            return self._lazy(lambda: longform.clips(model, [longform.read_block(source, 0.0, duration)], [lang],
                                                     options, adapter, encoded)[0][0]), info
        return longform.sequential(model, source, duration, lang, options, adapter, first_window), info

    @staticmethod
    def _lazy(decode) -> Iterator[Segment]:
        yield from decode()  # nothing is decoded before the caller asks for the first segment
