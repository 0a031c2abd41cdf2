"""The one inference core: audio in, typed `Segment`s out.

`transcribe()` returns `(segments, info)` where `segments` is a lazy iterator, as in faster-whisper;
the CLI consumes it today and the server, web UI and realtime front ends will consume the same shape.
`decode_batch()` is the batched short-clip path used by evaluation and by batch transcription.

Two backends share that interface: `Transcriber` (transformers; any model, LoRA adapters included)
and `CT2Transcriber` (CTranslate2 through faster-whisper). Long audio is read and decoded in blocks
of BLOCK_SECONDS, each block continuing where the last complete segment of the previous one ended,
so peak memory does not grow with the length of the input and no word is cut at a block edge.

`Transcriber` runs openai/whisper's decoding algorithm itself on the transformers modules (encoder,
decoder layers, output projection) instead of `generate()`: each window is encoded once however
many temperatures it is retried at, the no-speech probability comes out of the prompt's own forward
pass, the per-token logit rules cost a few tensor ops, and a decoding step is a lean pass over
preallocated key/value buffers. It produces the same tokens as `generate()` (tests check it), gives
faster-whisper's per-window `avg_logprob`/`no_speech_prob` and word-level timestamps (cross-attention
alignment heads + DTW), and it is faster than `generate()`.
"""
from __future__ import annotations

import string
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .audio import CHUNK_SECONDS, SAMPLE_RATE, audio_duration, load_audio
from .data import log_mel
from .errors import UserError

BLOCK_SECONDS = 300  # seconds of audio decoded per block of long-form transcription (bounds memory)
MAX_TARGET_TOKENS = 448  # Whisper decoder context, prompt included
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip is silence; Whisper would invent "you" or "Thank you."
N_FRAMES = 3000  # log-mel frames in a 30 s window (10 ms hop)
FRAMES_PER_SECOND = 100
TIME_PRECISION = 0.02  # seconds per timestamp token and per encoder position
MEDIAN_FILTER_WIDTH = 7  # smoothing of the alignment heads' attention, as openai/whisper
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # glued to the following word (openai/whisper's defaults)
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # glued to the preceding word
NO_SPACE_WORD_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # words split at unicode boundaries
# A VAD window whose decoding stops before this much of a speech region is left is decoded again
# from that point: Whisper ends a dense window early now and then, and the tail would be lost.
VAD_RETRY_SECONDS = 1.0
VAD_RETRY_ROUNDS = 2


def is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    id: int
    start: float  # seconds from the start of the input audio
    end: float  # seconds
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float | None = None  # of the window the segment was decoded in, as faster-whisper
    no_speech_prob: float | None = None
    words: list[Word] | None = None


@dataclass
class TranscriptionInfo:
    language: str | None
    language_probability: float | None
    duration: float  # seconds of input audio


@dataclass
class Decoded:
    text: str
    tokens: list[int]
    language: str | None
    language_probability: float | None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings, named and defaulted as in openai/whisper and faster-whisper."""
    task: str = "transcribe"
    num_beams: int = 1
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback ladder
    compression_ratio_threshold: float | None = 2.4  # above: repetition loop, retry hotter
    log_prob_threshold: float | None = -1.0  # below: low confidence, retry hotter
    no_speech_threshold: float | None = 0.6  # above (and low log-prob): silence, no text
    initial_prompt: str | None = None
    condition_on_previous_text: bool = False  # off: a loop in one window cannot leak into the next
    word_timestamps: bool = False
    max_new_tokens: int = 440


# Evaluation must be deterministic and comparable: greedy, no sampling fallback, no silence skipping.
GREEDY = DecodeOptions(temperature=(0.0,), compression_ratio_threshold=None, log_prob_threshold=None,
                       no_speech_threshold=None, max_new_tokens=128)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_block(source: np.ndarray | Path, start: float, end: float) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source[int(start * SAMPLE_RATE): int(end * SAMPLE_RATE)]
    return load_audio(source, start, end)


def _open_source(audio: np.ndarray | str | Path) -> tuple[np.ndarray | Path, float]:
    """Samples stay in memory; a path is only probed here and read block by block later."""
    source = Path(audio) if isinstance(audio, (str, Path)) else audio
    return source, audio_duration(source) if isinstance(source, Path) else len(source) / SAMPLE_RATE


def transcribe_in_blocks(decode_window, source: np.ndarray | Path, duration: float) -> Iterator[Segment]:
    """Drive a backend's `decode_window(audio, offset) -> list[Segment]` over long audio block by block.

    A block that does not reach the end of the input keeps all segments but its last one, which may
    be cut by the block edge; the next block starts where the kept segments end.
    """
    position, next_id = 0.0, 0
    while position < duration - 0.05:
        end = min(duration, position + BLOCK_SECONDS)
        segments = decode_window(_read_block(source, position, end), position)
        last_block = end >= duration - 0.05
        if not last_block and len(segments) > 1:
            segments = segments[:-1]
        for segment in segments:
            yield replace(segment, id=next_id)
            next_id += 1
        if last_block:
            return
        advanced = segments[-1].end if segments else end
        position = advanced if advanced > position + 1.0 else end  # always make progress


def compression_ratio(text: str) -> float:
    """gzip ratio of the text, as faster-whisper computes it: above ~2.4 the window is a repetition loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# ---- word-level alignment (openai/whisper's timing.py, on numpy/torch) --------------------------------

def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x[None], (pad, pad, 0, 0), mode="reflect")[0]
    return padded.unfold(-1, width, 1).sort()[0][..., pad]


def _dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic time warping with openai/whisper's cost and tie-breaking, one anti-diagonal at a time
    (every cell of a diagonal depends only on the two before it), so numpy does the inner loop."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        cost[i, j] = x[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    text_indices, time_indices = np.array(path[::-1]).T
    return text_indices, time_indices


@dataclass
class _WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def _merge_punctuations(alignment: list[_WordTiming]) -> None:
    """Attach opening punctuation to the next word and closing punctuation to the previous one."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATIONS:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATIONS:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


@dataclass
class _Piece:
    """A segment while it is being built: times in seconds of the decoded audio (block or window)."""
    start: float
    end: float
    tokens: list[int]  # timestamp tokens included
    words: list[_WordTiming] | None = None


@dataclass
class _WindowResult:
    """What openai/whisper's DecodingResult carries for one 30 s window."""
    tokens: list[int]  # sampled tokens, timestamps included, end-of-text excluded
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float


@dataclass
class _Caches:
    """Keys and values of one batch of windows: self-attention (preallocated, filled up to `length`)
    and cross-attention (the encoder output projected once per window; keys transposed), per layer."""
    self_keys: list[torch.Tensor]
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]
    length: int = 0

    def select(self, index: torch.Tensor) -> None:
        """Keep (or repeat, for beams) the rows in `index`."""
        for caches in (self.self_keys, self.self_values, self.cross_keys, self.cross_values):
            caches[:] = [c.index_select(0, index) for c in caches]


class _Decoder:
    """transformers' Whisper decoder run one token at a time over caches it keeps itself.

    For one token transformers' forward spends more time in Python (cache objects, masks, output
    recording) than in arithmetic. This step calls the same submodules, LoRA layers included, in the
    same order, and writes keys and values into preallocated buffers. Plain Linear layers are computed
    as `weight @ x.T`: for the one to a few rows of a decoding step BLAS runs that layout 1.2-2.5x
    faster than `x @ weight.T` (measured on a 2-core x86 CPU), and a step is mostly these matmuls,
    the largest being the projection onto the 51865-token vocabulary.
    """

    def __init__(self, decoder, proj_out):
        self.decoder, self.proj_out = decoder, proj_out
        self.layers = list(decoder.layers)
        attention = self.layers[0].self_attn
        self.heads, self.head_dim = attention.num_heads, attention.head_dim

    @staticmethod
    def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)`, computed as `weight @ x.T` when the module is a plain Linear (not a LoRA layer)."""
        if type(module) is not torch.nn.Linear:
            return module(x)
        rows = x.reshape(-1, x.shape[-1])
        count = len(rows)
        if count == 1:  # one row would take the slower matrix-vector path
            rows = torch.cat([rows, rows])
        if module.bias is None:
            out = module.weight @ rows.T
        else:
            out = torch.addmm(module.bias[:, None], module.weight, rows.T)
        return out.T[:count].contiguous().view(*x.shape[:-1], -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, d_model) -> (rows, vocabulary), in float32."""
        return self.linear(self.proj_out, hidden).float()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def start(self, ids: torch.Tensor, encoded: torch.Tensor, max_length: int) -> tuple[_Caches, torch.Tensor]:
        """Run the prompt `ids` (batch, tokens); returns the caches and the hidden states of every prompt token."""
        batch = ids.shape[0]
        shape = (batch, self.heads, max_length, self.head_dim)
        # Cross-attention keys are kept transposed, (batch, heads, head_dim, frames): a plain `q @ keys`
        # then reads them in order, faster than the fused attention kernel does for one query token.
        caches = _Caches([encoded.new_empty(shape) for _ in self.layers], [encoded.new_empty(shape) for _ in self.layers],
                         [self._split_heads(layer.encoder_attn.k_proj(encoded)).transpose(-1, -2).contiguous()
                          for layer in self.layers],
                         [self._split_heads(layer.encoder_attn.v_proj(encoded)) for layer in self.layers])
        return caches, self._run(ids, caches)

    def step(self, ids: torch.Tensor, caches: _Caches) -> torch.Tensor:
        """One more token per row (batch, 1) -> its hidden state (batch, d_model)."""
        return self._run(ids, caches)[:, -1]

    def _run(self, ids: torch.Tensor, caches: _Caches) -> torch.Tensor:
        start, count = caches.length, ids.shape[1]
        end = start + count
        hidden = self.decoder.embed_tokens(ids) + self.decoder.embed_positions.weight[start:end]
        linear = self.linear
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            q = self._split_heads(linear(attention.q_proj, x) * attention.scaling)
            caches.self_keys[i][:, :, start:end] = self._split_heads(linear(attention.k_proj, x))
            caches.self_values[i][:, :, start:end] = self._split_heads(linear(attention.v_proj, x))
            x = F.scaled_dot_product_attention(q, caches.self_keys[i][:, :, :end], caches.self_values[i][:, :, :end],
                                               is_causal=count > 1, scale=1.0)
            hidden = hidden + linear(attention.out_proj, x.transpose(1, 2).reshape(hidden.shape))
            attention = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            q = self._split_heads(linear(attention.q_proj, x) * attention.scaling)
            x = (q @ caches.cross_keys[i]).softmax(-1) @ caches.cross_values[i]
            hidden = hidden + linear(attention.out_proj, x.transpose(1, 2).reshape(hidden.shape))
            x = layer.activation_fn(linear(layer.fc1, layer.final_layer_norm(hidden)))
            hidden = hidden + linear(layer.fc2, x)
        caches.length = end
        return self.decoder.layer_norm(hidden)


class Transcriber:
    """Wraps a (possibly LoRA-adapted) transformers Whisper model for decoding."""

    def __init__(self, model, processor, device: str | None = None, compile: bool = False):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.processor = processor
        base = self._base_model()
        self.generation_config = base.generation_config
        self._encoder = base.get_encoder()
        self._decoder = base.model.decoder
        self._proj_out = base.proj_out
        self._fast = _Decoder(self._decoder, self._proj_out)
        if compile:
            # The encoder always sees (batch, n_mels, 3000): one graph, and most of a window's compute.
            self._encoder.forward = torch.compile(self._encoder.forward)
        config, tokenizer = self.generation_config, processor.tokenizer
        self.multilingual = bool(getattr(config, "is_multilingual", False))
        lang_to_id = getattr(config, "lang_to_id", None) or {}
        self.languages = {token[2:-2] for token in lang_to_id} if self.multilingual else {"en"}
        self._language_ids = torch.tensor(list(lang_to_id.values()), dtype=torch.long)
        self._language_codes = [token[2:-2] for token in lang_to_id]
        self._lang_to_id = {token[2:-2]: i for token, i in lang_to_id.items()}
        self._task_to_id = dict(getattr(config, "task_to_id", None) or {})
        eos = config.eos_token_id
        self.eot = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.sot = config.decoder_start_token_id
        self.no_timestamps = getattr(config, "no_timestamps_token_id", None) or tokenizer.convert_tokens_to_ids(
            "<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        self.no_speech = self.no_timestamps - 1  # <|nospeech|> (<|nocaptions|>), found as transformers finds it
        self.prev_sot = getattr(config, "prev_sot_token_id", None) or tokenizer.convert_tokens_to_ids("<|startofprev|>")
        self.max_initial_timestamp_index = getattr(config, "max_initial_timestamp_index", 50)
        vocab_size = self._proj_out.out_features
        self._vocab = torch.arange(vocab_size, device=self.device)
        self._suppress = self._mask(config.suppress_tokens or [], vocab_size)
        blank = tokenizer.encode(" ", add_special_tokens=False)
        self._suppress_at_begin = self._mask(config.begin_suppress_tokens or [*blank, self.eot], vocab_size)
        heads = getattr(config, "alignment_heads", None)
        if not heads:  # openai/whisper's default: every head of the second half of the decoder
            layers = base.config.decoder_layers
            heads = [[layer, head] for layer in range(layers // 2, layers)
                     for head in range(base.config.decoder_attention_heads)]
        self._alignment_heads: dict[int, list[int]] = {}
        for layer, head in heads:
            self._alignment_heads.setdefault(int(layer), []).append(int(head))

    def _mask(self, tokens, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[[t for t in tokens if 0 <= t < vocab_size]] = True
        return mask.to(self.device)

    def _base_model(self):
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([log_mel(self.processor, a) for a in audios])).to(self.device, self.dtype)

    # ---- the decoding loop ---------------------------------------------------------------------------

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        return self._encoder(features).last_hidden_state

    def _detect(self, encoded: torch.Tensor) -> list[tuple[str, float]]:
        start = torch.full((len(encoded), 1), self.sot, device=self.device)
        hidden = self._decoder(input_ids=start, encoder_hidden_states=encoded, use_cache=False).last_hidden_state
        logits = self._proj_out(hidden[:, -1])
        probs = logits[:, self._language_ids.to(self.device)].float().softmax(-1)
        best = probs.argmax(-1)
        return [(self._language_codes[int(b)], float(probs[i, b])) for i, b in enumerate(best)]

    @torch.inference_mode()
    def detect_language(self, features: torch.Tensor) -> list[tuple[str, float]]:
        """Most likely language and its probability per clip, from the first decoder step."""
        return self._detect(self._encode(features))

    def _language_for(self, encoded: torch.Tensor, languages: list[str | None]) -> list[tuple[str | None, float | None]]:
        if not self.multilingual:
            return [("en", 1.0)] * len(languages)
        unknown = [i for i, lang in enumerate(languages) if lang is None]
        detected = dict(zip(unknown, self._detect(encoded[unknown]))) if unknown else {}
        return [detected.get(i, (lang, None)) for i, lang in enumerate(languages)]

    def _prompt_tokens(self, text: str | None) -> list[int]:
        return self.processor.tokenizer.encode(" " + text.strip(), add_special_tokens=False) if text else []

    def _prefix(self, language: str | None, task: str, timestamps: bool, prompt: list[int]) -> list[int]:
        """<|startofprev|> prompt <|startoftranscript|><|lang|><|task|>[<|notimestamps|>], as openai/whisper."""
        tokens = [self.prev_sot, *prompt[-(MAX_TARGET_TOKENS // 2 - 1):]] if prompt else []
        tokens.append(self.sot)
        if self.multilingual:
            if language not in self._lang_to_id:
                raise UserError(f"the model has no language '{language}'")
            tokens += [self._lang_to_id[language], self._task_to_id[task]]
        if not timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    def _text(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode([t for t in tokens if t < self.eot])

    def _apply_rules(self, logits: torch.Tensor, sampled: list[list[int]], first: bool, timestamps: bool) -> torch.Tensor:
        """openai/whisper's logit filters: suppressed tokens, no blank start, and the timestamp grammar."""
        inf = float("-inf")
        logits = logits.masked_fill(self._suppress, inf)
        if first:
            logits.masked_fill_(self._suppress_at_begin, inf)
        if not timestamps:
            return logits
        begin = self.timestamp_begin
        logits[:, self.no_timestamps] = inf
        if first:  # a window starts with a timestamp, at most max_initial_timestamp in
            logits[:, :begin] = inf
            if self.max_initial_timestamp_index is not None:
                logits[:, begin + self.max_initial_timestamp_index + 1:] = inf
        else:
            floors = []
            for k, seq in enumerate(sampled):
                last = seq[-1] >= begin
                penultimate = len(seq) < 2 or seq[-2] >= begin
                if last:  # timestamps come in pairs, except right before the end of text
                    if penultimate:
                        logits[k, begin:] = inf
                    else:
                        logits[k, :self.eot] = inf
                stamp = next((t for t in reversed(seq) if t >= begin), None)
                # time never goes back, and a segment is never empty
                floors.append(begin if stamp is None else stamp if last and not penultimate else stamp + 1)
            floor = torch.tensor(floors, device=logits.device)[:, None]
            logits.masked_fill_((self._vocab >= begin) & (self._vocab < floor), inf)
        logprobs = logits.log_softmax(-1)
        timestamp_wins = logprobs[:, begin:].logsumexp(-1) > logprobs[:, :begin].max(-1).values
        logits[:, :begin] = logits[:, :begin].masked_fill(timestamp_wins[:, None], inf)
        return logits

    def _sample(self, encoded: torch.Tensor, prefixes: list[list[int]], sot_index: int, timestamps: bool,
                temperature: float, max_new: int) -> list[tuple[list[int], float, float]]:
        """Greedy (temperature 0) or sampled decoding of a batch of windows.

        Returns (tokens, sum of their log-probabilities with the end-of-text one, no-speech probability)
        per window. Rows that reach end-of-text leave the batch, so the others stop paying for them.
        """
        rows = len(prefixes)
        caches, hidden = self._fast.start(torch.tensor(prefixes, device=self.device), encoded,
                                          len(prefixes[0]) + max_new)
        no_speech = self._fast.logits(hidden[:, sot_index]).softmax(-1)[:, self.no_speech].tolist()
        logits = self._fast.logits(hidden[:, -1])
        sampled: list[list[int]] = [[] for _ in range(rows)]
        totals = [0.0] * rows
        active = list(range(rows))
        for step in range(max_new):
            logits = self._apply_rules(logits, [sampled[i] for i in active], step == 0, timestamps)
            if temperature > 0:
                chosen = torch.multinomial((logits / temperature).softmax(-1), 1).squeeze(1)
            else:
                chosen = logits.argmax(-1)
            logprobs = logits.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1).tolist()
            keep = []
            for j, (i, token) in enumerate(zip(active, chosen.tolist())):
                totals[i] += logprobs[j]
                if token != self.eot:
                    sampled[i].append(token)
                    keep.append(j)
            if not keep or step == max_new - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                caches.select(index)
                chosen = chosen[index]
                active = [active[j] for j in keep]
            logits = self._fast.logits(self._fast.step(chosen[:, None], caches))
        return [(sampled[i], totals[i], no_speech[i]) for i in range(rows)]

    def _beam_search(self, encoded: torch.Tensor, prefixes: list[list[int]], sot_index: int, timestamps: bool,
                     beams: int, max_new: int) -> list[tuple[list[int], float, float]]:
        """openai/whisper's beam search (patience 1; the finished candidate with the best mean log-probability)."""
        audios = len(prefixes)
        ids = torch.tensor(prefixes, device=self.device).repeat_interleave(beams, 0)
        caches, hidden = self._fast.start(ids, encoded.repeat_interleave(beams, 0), len(prefixes[0]) + max_new)
        no_speech = self._fast.logits(hidden[::beams, sot_index]).softmax(-1)[:, self.no_speech].tolist()
        logits = self._fast.logits(hidden[:, -1])
        sampled: list[list[int]] = [[] for _ in range(audios * beams)]
        totals = [0.0] * (audios * beams)
        finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(audios)]
        for step in range(max_new):
            logprobs = self._apply_rules(logits, sampled, step == 0, timestamps).log_softmax(-1)
            top_logprobs, top_tokens = (t.tolist() for t in logprobs.topk(beams + 1, dim=-1))
            next_sampled, next_totals, sources = [], [], []
            for audio in range(audios):
                scores, origin = {}, {}
                for row in range(audio * beams, (audio + 1) * beams):
                    for logprob, token in zip(top_logprobs[row], top_tokens[row]):
                        candidate = (*sampled[row], token)
                        scores[candidate], origin[candidate] = totals[row] + logprob, row
                saved = 0
                for candidate in sorted(scores, key=scores.get, reverse=True):
                    if candidate[-1] == self.eot:
                        if len(finished[audio]) < beams:
                            finished[audio][candidate[:-1]] = scores[candidate]
                        continue
                    next_sampled.append(list(candidate))
                    next_totals.append(scores[candidate])
                    sources.append(origin[candidate])
                    saved += 1
                    if saved == beams:
                        break
            sampled, totals = next_sampled, next_totals
            if all(len(f) >= beams for f in finished) or step == max_new - 1:
                break
            caches.select(torch.tensor(sources, device=self.device))
            ids = torch.tensor([[s[-1]] for s in sampled], device=self.device)
            logits = self._fast.logits(self._fast.step(ids, caches))
        results = []
        for audio in range(audios):
            candidates = finished[audio]
            live = range(audio * beams, (audio + 1) * beams)
            for row in sorted(live, key=lambda r: totals[r], reverse=True):
                if len(candidates) >= beams:
                    break
                candidates.setdefault(tuple(sampled[row]), totals[row])
            best = max(candidates, key=lambda c: candidates[c] / max(1, len(c)))
            results.append((list(best), candidates[best], no_speech[audio]))
        return results

    @staticmethod
    def _needs_fallback(result: _WindowResult, options: DecodeOptions) -> bool:
        needs = ((options.compression_ratio_threshold is not None
                  and result.compression_ratio > options.compression_ratio_threshold)
                 or (options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold))
        silence = (options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold
                   and options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold)
        return needs and not silence

    @staticmethod
    def _is_silence(result: _WindowResult, options: DecodeOptions) -> bool:
        """openai/whisper's rule: a likely no-speech window is skipped unless its text is confident."""
        if options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
            return False
        return options.log_prob_threshold is None or result.avg_logprob <= options.log_prob_threshold

    def _decode_with_fallback(self, encoded: torch.Tensor, prefixes: list[list[int]], options: DecodeOptions,
                              timestamps: bool) -> list[_WindowResult]:
        """Decode each window, retrying the ones that loop or lack confidence at the next temperature.

        The encoder output is reused for every retry; only the windows that need one are decoded again.
        A window that fails at every temperature keeps its most confident attempt among those that do
        not loop (faster-whisper's rule; openai/whisper would keep the hottest, often garbled, one).
        """
        sot_index = prefixes[0].index(self.sot)
        max_new = max(1, min(options.max_new_tokens, MAX_TARGET_TOKENS - len(prefixes[0])))
        attempts: list[list[_WindowResult]] = [[] for _ in prefixes]
        results: list[_WindowResult | None] = [None] * len(prefixes)
        todo = list(range(len(prefixes)))
        for temperature in options.temperature:
            rows = encoded if len(todo) == len(prefixes) else encoded[torch.tensor(todo, device=self.device)]
            batch = [prefixes[i] for i in todo]
            if temperature == 0 and options.num_beams > 1:
                decoded = self._beam_search(rows, batch, sot_index, timestamps, options.num_beams, max_new)
            else:
                decoded = self._sample(rows, batch, sot_index, timestamps, temperature, max_new)
            retry = []
            for i, (tokens, total, no_speech) in zip(todo, decoded):
                result = _WindowResult(tokens, total / (len(tokens) + 1), no_speech,
                                       compression_ratio(self._text(tokens).strip()), temperature)
                attempts[i].append(result)
                results[i] = result
                if self._needs_fallback(result, options):
                    retry.append(i)
            todo = retry
            if not todo:
                break
        threshold = options.compression_ratio_threshold
        for i in todo:
            fluent = [r for r in attempts[i] if threshold is None or r.compression_ratio <= threshold]
            best = max(fluent or attempts[i], key=lambda r: r.avg_logprob)
            results[i] = replace(best, temperature=options.temperature[-1])  # no prompt from it, as the hottest
        return results

    def _split(self, tokens: list[int], time_offset: float, window_seconds: float) -> tuple[list[_Piece], float, bool]:
        """Cut a window's tokens into segments at its timestamp pairs (openai/whisper's rules).

        Returns the segments with text, how far into the window they reach for the next window to
        start from (all of it after a single closing timestamp), and whether that was the ending.
        """
        begin = self.timestamp_begin
        is_stamp = [t >= begin for t in tokens]
        single_ending = is_stamp[-2:] == [False, True]
        consecutive = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
        pieces = []
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for current in slices:
                part = tokens[last:current]
                pieces.append(_Piece(time_offset + (part[0] - begin) * TIME_PRECISION,
                                     time_offset + (part[-1] - begin) * TIME_PRECISION, part))
                last = current
            consumed = window_seconds if single_ending else (tokens[last - 1] - begin) * TIME_PRECISION
        else:
            stamps = [t for t in tokens if t >= begin]
            end = (stamps[-1] - begin) * TIME_PRECISION if stamps and stamps[-1] != begin else window_seconds
            pieces.append(_Piece(time_offset, time_offset + end, tokens))
            consumed = window_seconds
        return [p for p in pieces if self._text(p.tokens).strip()], consumed, single_ending

    # ---- word-level timestamps -----------------------------------------------------------------------

    def _split_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        decode = self.processor.tokenizer.decode
        full = decode(tokens)
        words, word_tokens, current, offset = [], [], [], 0
        for token in tokens:
            current.append(token)
            decoded = decode(current)
            # a token that ends inside a multi-byte character waits for the rest of it
            if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def _split_words(self, tokens: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
        """Words as openai/whisper cuts them: at spaces and punctuation, or per character for CJK/Thai/…"""
        subwords, subword_tokens = self._split_unicode(tokens)
        if language in NO_SPACE_WORD_LANGUAGES:
            return subwords, subword_tokens
        words, word_tokens = [], []
        for subword, pieces in zip(subwords, subword_tokens):
            special = pieces[0] >= self.eot
            if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
                words.append(subword)
                word_tokens.append(list(pieces))
            else:
                words[-1] += subword
                word_tokens[-1].extend(pieces)
        return words, word_tokens

    def _cross_attention(self, encoded: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass over the full token sequence: its logits, and the alignment heads' attention
        over the encoder frames (heads, tokens, frames), recomputed from q/k so any attention kernel works."""
        captured = {}

        def hook(layer):
            heads = self._alignment_heads[layer]

            def capture(module, args, kwargs, output):
                hidden = args[0] if args else kwargs["hidden_states"]
                q = module.q_proj(hidden) * module.scaling
                k = module.k_proj(kwargs["key_value_states"])
                q = q.view(*q.shape[:2], -1, module.head_dim).transpose(1, 2)[:, heads]
                k = k.view(*k.shape[:2], -1, module.head_dim).transpose(1, 2)[:, heads]
                captured[layer] = (q.float() @ k.float().transpose(-1, -2)).softmax(-1)[0]
            return capture

        handles = [self._decoder.layers[layer].encoder_attn.register_forward_hook(hook(layer), with_kwargs=True)
                   for layer in self._alignment_heads]
        try:
            hidden = self._decoder(input_ids=torch.tensor([tokens], device=self.device),
                                   encoder_hidden_states=encoded[None], use_cache=False).last_hidden_state[0]
        finally:
            for handle in handles:
                handle.remove()
        return self._proj_out(hidden).float(), torch.cat([captured[layer] for layer in sorted(captured)])

    def _find_alignment(self, encoded: torch.Tensor, text_tokens: list[int], language: str | None, task: str,
                        num_frames: int) -> list[_WordTiming]:
        """Word start/end times (seconds into the window) by DTW over the alignment heads' attention."""
        if not text_tokens:
            return []
        start = self._prefix(language, task, True, [])
        logits, weights = self._cross_attention(encoded, [*start, self.no_timestamps, *text_tokens, self.eot])
        token_probs = logits[len(start):len(start) + len(text_tokens), :self.eot].softmax(-1)
        text_token_probs = token_probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()
        weights = weights[:, :, :max(1, num_frames // 2)]
        std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
        weights = _median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH)
        matrix = weights.mean(0)[len(start):-1]
        text_indices, time_indices = _dtw(-matrix.double().cpu().numpy())
        words, word_tokens = self._split_words(text_tokens + [self.eot], language)
        if len(word_tokens) <= 1:
            return []
        boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
        jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
        jump_times = time_indices[jumps] * TIME_PRECISION
        return [_WordTiming(word, tokens, float(jump_times[i]), float(jump_times[j]), float(np.mean(text_token_probs[i:j])))
                for word, tokens, i, j in zip(words, word_tokens, boundaries[:-1], boundaries[1:])]

    def _add_word_timestamps(self, pieces: list[_Piece], encoded: torch.Tensor, language: str | None, task: str,
                             num_frames: int, time_offset: float, last_speech: float) -> float:
        """Give each segment its words (openai/whisper's add_word_timestamps, its heuristics included:
        over-long words at pauses and sentence ends are shortened, segment bounds follow the words)."""
        per_piece = [[t for t in p.tokens if t < self.eot] for p in pieces]
        alignment = self._find_alignment(encoded, [t for tokens in per_piece for t in tokens], language, task,
                                         num_frames)
        durations = np.array([w.end - w.start for w in alignment])
        durations = durations[durations.nonzero()]
        median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
        longest = median * 2
        if len(durations):
            for i in range(1, len(alignment)):
                if alignment[i].end - alignment[i].start > longest:
                    if alignment[i].word in ".。!！?？":
                        alignment[i].end = alignment[i].start + longest
                    elif alignment[i - 1].word in ".。!！?？":
                        alignment[i].start = alignment[i].end - longest
        _merge_punctuations(alignment)
        index = 0
        for piece, tokens in zip(pieces, per_piece):
            saved, words = 0, []
            while index < len(alignment) and saved < len(tokens):
                timing = alignment[index]
                if timing.word:
                    words.append(replace(timing, start=time_offset + timing.start, end=time_offset + timing.end))
                saved += len(timing.tokens)
                index += 1
            if words:
                first = words[0]
                if first.end - last_speech > median * 4 and (
                        first.end - first.start > longest
                        or (len(words) > 1 and words[1].end - first.start > longest * 2)):
                    if len(words) > 1 and words[1].end - words[1].start > longest:
                        boundary = max(words[1].end / 2, words[1].end - longest)
                        first.end = words[1].start = boundary
                    first.start = max(0.0, first.end - longest)
                if piece.start < first.end and piece.start - 0.5 > first.start:
                    first.start = max(0.0, min(first.end - median, piece.start))
                else:
                    piece.start = first.start
                if piece.end > words[-1].start and piece.end + 0.5 < words[-1].end:
                    words[-1].end = max(words[-1].start + median, piece.end)
                else:
                    piece.end = words[-1].end
                last_speech = piece.end
            piece.words = words
        return last_speech

    def _make_segment(self, piece: _Piece, result: _WindowResult, to_time, with_words: bool = True) -> Segment:
        """A finished Segment; `to_time(t, is_end)` turns a decoded-audio time into input seconds."""
        start = to_time(piece.start, False)
        end = max(start, to_time(piece.end, True))
        words = None
        if piece.words is not None and with_words:
            # Words stay inside their segment and in order, whatever the heuristics above did.
            words, floor = [], start
            for w in piece.words:
                w_start = min(max(to_time(w.start, False), floor), end)
                w_end = min(max(to_time(w.end, True), w_start), end)
                words.append(Word(round(w_start, 3), round(w_end, 3), w.word, round(w.probability, 4)))
                floor = w_start
        return Segment(0, round(start, 3), round(end, 3), self._text(piece.tokens).strip(),
                       [t for t in piece.tokens if t < self.eot], result.avg_logprob, result.no_speech_prob, words)

    # ---- public API ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     options: DecodeOptions = GREEDY) -> list[Decoded]:
        """Decode clips of at most 30 s together (no timestamps); silent clips give empty text."""
        languages = languages or [None] * len(audios)
        silent = [is_silent(a) for a in audios]
        if any(silent):
            voiced = [i for i, s in enumerate(silent) if not s]
            decoded = self.decode_batch([audios[i] for i in voiced], [languages[i] for i in voiced], options) if voiced else []
            by_index = dict(zip(voiced, decoded))
            return [by_index.get(i, Decoded("", [], languages[i], None)) for i in range(len(audios))]
        encoded = self._encode(self.features(audios))
        resolved = self._language_for(encoded, languages)
        prompt = self._prompt_tokens(options.initial_prompt)
        prefixes = [self._prefix(lang, options.task, False, prompt) for lang, _ in resolved]
        decoded = []
        for (lang, prob), result in zip(resolved, self._decode_with_fallback(encoded, prefixes, options, False)):
            tokens = [] if self._is_silence(result, options) else [t for t in result.tokens if t < self.eot]
            decoded.append(Decoded(self._text(tokens).strip(), tokens, lang, prob, result.avg_logprob,
                                   result.no_speech_prob))
        return decoded

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Transcribe audio of any length, given as samples or as a path (then read block by block).

        Up to 30 s: one window, one segment. Longer: openai/whisper's sequential algorithm with
        timestamps, block by block. With `vad`, only speech is decoded, in 30 s windows (pauses kept,
        long silences shortened) decoded in batches, and silence yields no segment at all. Every
        segment carries its window's `avg_logprob` and `no_speech_prob`, and its `words` when
        `options.word_timestamps` is set.
        """
        source, duration = _open_source(audio)
        head = _read_block(source, 0.0, min(duration, CHUNK_SECONDS))
        encoded_head = None  # a short clip's encoder output, kept from detection for its decoding
        if language is None and self.multilingual and not is_silent(head):
            with torch.inference_mode():
                encoded_head = self._encode(self.features([head]))
                (lang, prob), = self._detect(encoded_head)
        else:
            lang, prob = (language, None) if self.multilingual else ("en", 1.0)
        info = TranscriptionInfo(lang, prob, duration)
        if vad:
            return self._vad_segments(source, duration, lang, options, batch_size), info
        if duration <= CHUNK_SECONDS:
            return self._lazy(lambda: self._short_form(head, lang, options, encoded_head)), info
        return transcribe_in_blocks(lambda block, offset: self._long_form(block, offset, lang, options),
                                    source, duration), info

    @torch.inference_mode()
    def _short_form(self, audio: np.ndarray, language: str | None, options: DecodeOptions,
                    encoded: torch.Tensor | None = None) -> list[Segment]:
        """A clip of at most 30 s: one window without timestamp tokens (fewer tokens to decode, as
        `decode_batch`), so one segment; its words, if asked for, from the alignment heads.
        `encoded`: the clip's encoder output when language detection already computed it."""
        if is_silent(audio):
            return []
        duration = len(audio) / SAMPLE_RATE
        if encoded is None:
            encoded = self._encode(self.features([audio]))
        language = language or self._detect(encoded)[0][0]
        prefix = self._prefix(language, options.task, False, self._prompt_tokens(options.initial_prompt))
        (result,) = self._decode_with_fallback(encoded, [prefix], options, timestamps=False)
        tokens = [t for t in result.tokens if t < self.eot]
        if self._is_silence(result, options) or not self._text(tokens).strip():
            return []
        piece = _Piece(0.0, duration, tokens)
        if options.word_timestamps:
            self._add_word_timestamps([piece], encoded[0], language, options.task,
                                      round(duration * FRAMES_PER_SECOND), 0.0, 0.0)
        return [self._make_segment(piece, result, lambda t, is_end: min(max(t, 0.0), duration))]

    @staticmethod
    def _lazy(decode) -> Iterator[Segment]:
        yield from decode()  # nothing is decoded before the caller asks for the first segment

    @torch.inference_mode()
    def _long_form(self, audio: np.ndarray, offset: float, language: str | None,
                   options: DecodeOptions) -> list[Segment]:
        """openai/whisper's transcribe loop over one block: decode 30 s from `seek`, keep the segments
        closed by a timestamp pair, continue from the last one."""
        if is_silent(audio):
            return []
        inputs = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                  truncation=False, padding="longest", return_attention_mask=True)
        mel = inputs.input_features[0].to(self.device, self.dtype)
        content_frames = min(mel.shape[-1], int(inputs.attention_mask[0].sum()))
        block_end = len(audio) / SAMPLE_RATE
        history = self._prompt_tokens(options.initial_prompt)  # primes the first window only, as openai
        reset_since, seek, last_speech, segments = 0, 0, 0.0, []

        def to_time(t: float, is_end: bool) -> float:
            return offset + min(t, block_end)

        while seek < content_frames:
            size = min(N_FRAMES, content_frames - seek)
            time_offset = seek / FRAMES_PER_SECOND
            encoded = self._encode(F.pad(mel[:, seek:seek + size], (0, N_FRAMES - size))[None])
            if language is None:
                language = self._detect(encoded)[0][0]
            prefix = self._prefix(language, options.task, True, history[reset_since:])
            (result,) = self._decode_with_fallback(encoded, [prefix], options, timestamps=True)
            if self._is_silence(result, options):
                seek += size
                continue
            pieces, consumed, single_ending = self._split(result.tokens, time_offset, size / FRAMES_PER_SECOND)
            seek += max(1, round(consumed * FRAMES_PER_SECOND))
            if options.word_timestamps and pieces:
                last_speech = self._add_word_timestamps(pieces, encoded[0], language, options.task, size,
                                                        time_offset, last_speech)
                words_end = next((p.words[-1].end for p in reversed(pieces) if p.words), None)
                if not single_ending and words_end is not None and words_end > time_offset:
                    # an unfinished window continues after its last aligned word, as openai/whisper
                    seek = max(round(time_offset * FRAMES_PER_SECOND) + 1, round(words_end * FRAMES_PER_SECOND))
            segments += [self._make_segment(p, result, to_time) for p in pieces]
            history += [t for p in pieces for t in p.tokens]
            if not options.condition_on_previous_text or result.temperature > 0.5:
                reset_since = len(history)  # a hot window's text is no prompt for the next
        return segments

    def _vad_segments(self, source, duration: float, language: str | None, options: DecodeOptions,
                      batch_size: int) -> Iterator[Segment]:
        from . import vad

        prompt = self._prompt_tokens(options.initial_prompt)  # every window, as faster-whisper's batched mode

        @torch.inference_mode()
        def decode_block(block: np.ndarray, offset: float) -> list[Segment]:
            windows = vad.speech_windows(vad.speech_regions(block), len(block) / SAMPLE_RATE)
            segments: list[Segment] = []
            for attempt in range(VAD_RETRY_ROUNDS + 1):
                unfinished = []
                for first in range(0, len(windows), batch_size):
                    batch = windows[first:first + batch_size]
                    clips = [w.samples(block) for w in batch]
                    encoded = self._encode(self.features(clips))
                    lang = language or self._detect(encoded[:1])[0][0]
                    prefix = self._prefix(lang, options.task, True, prompt)
                    results = self._decode_with_fallback(encoded, [prefix] * len(batch), options, timestamps=True)
                    for row, (window, clip, result) in enumerate(zip(batch, clips, results)):
                        if self._is_silence(result, options):
                            continue
                        seconds = len(clip) / SAMPLE_RATE
                        pieces, consumed, _ = self._split(result.tokens, 0.0, seconds)
                        if not pieces:
                            continue
                        decoded_until = pieces[-1].end
                        if options.word_timestamps or len(window.spans) > 1:
                            # Across a cut-out pause segment times come from the words: Whisper's own
                            # timestamps there are often on the wrong side of it, by as long as it was.
                            self._add_word_timestamps(pieces, encoded[row], lang, options.task,
                                                      round(seconds * FRAMES_PER_SECOND), 0.0, 0.0)
                        segments += [self._make_segment(p, result, lambda t, is_end, w=window: offset + w.to_original(
                            t, is_end), with_words=options.word_timestamps) for p in pieces]
                        # Whisper sometimes ends a dense window early, or leaves its last segment open:
                        # what VAD heard after the last closed segment (an unfinished segment, a whole
                        # later region, or a long rest of this one) is decoded again in a new window.
                        later, left = window.unheard(decoded_until)
                        rest = window.after(decoded_until)
                        if rest and (consumed < seconds or later or left >= VAD_RETRY_SECONDS):
                            unfinished.append(rest)
                windows = unfinished
                if not windows or attempt == VAD_RETRY_ROUNDS:
                    break
            return sorted(segments, key=lambda s: (s.start, s.end))

        return transcribe_in_blocks(decode_block, source, duration)


class CT2Transcriber:
    """The same interface on CTranslate2 through faster-whisper (its front end, its decoding loop).

    Models come from `whisper-lora export --format ct2`, any faster-whisper folder, or the embedded
    default (already CTranslate2).
    """

    def __init__(self, model_dir: str, compute_type: str = "default", device: str = "auto"):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise UserError("--backend ct2 needs faster-whisper: pip install 'whisper-lora[ct2]'") from None
        try:
            self.model = WhisperModel(model_dir, device=device, compute_type=compute_type)
        except ValueError as exc:  # e.g. float16 on a CPU
            raise UserError(f"cannot load with --compute-type {compute_type}: {exc}", model_dir) from None
        self.multilingual = self.model.model.is_multilingual
        self.languages = set(self.model.supported_languages)

    def _kwargs(self, options: DecodeOptions) -> dict:
        return dict(task=options.task, beam_size=options.num_beams, best_of=max(1, options.num_beams),
                    temperature=list(options.temperature),
                    compression_ratio_threshold=options.compression_ratio_threshold,
                    log_prob_threshold=options.log_prob_threshold, no_speech_threshold=options.no_speech_threshold,
                    initial_prompt=options.initial_prompt, condition_on_previous_text=options.condition_on_previous_text,
                    word_timestamps=options.word_timestamps, max_new_tokens=options.max_new_tokens)

    def _convert(self, segments, offset: float = 0.0) -> list[Segment]:
        out = []
        for s in segments:
            if not s.text.strip():
                continue
            words = [Word(round(offset + w.start, 3), round(offset + w.end, 3), w.word, w.probability)
                     for w in s.words] if s.words else None
            out.append(Segment(len(out), round(offset + s.start, 3), round(offset + s.end, 3), s.text.strip(),
                               list(s.tokens), s.avg_logprob, s.no_speech_prob, words))
        return out

    def decode_batch(self, audios: list[np.ndarray], languages: list[str | None] | None = None,
                     options: DecodeOptions = GREEDY) -> list[Decoded]:
        results = []
        for audio, language in zip(audios, languages or [None] * len(audios)):
            if is_silent(audio):
                results.append(Decoded("", [], language, None))
                continue
            segments, info = self.model.transcribe(audio, language=language, without_timestamps=True,
                                                   **self._kwargs(options))
            segments = list(segments)
            results.append(Decoded("".join(s.text for s in segments).strip(), [t for s in segments for t in s.tokens],
                                   info.language, info.language_probability,
                                   segments[0].avg_logprob if segments else None,
                                   segments[0].no_speech_prob if segments else None))
        return results

    def transcribe(self, audio: np.ndarray | str | Path, language: str | None = None,
                   options: DecodeOptions = DecodeOptions(), vad: bool = False,
                   batch_size: int = 8) -> tuple[Iterator[Segment], TranscriptionInfo]:
        source, duration = _open_source(audio)
        if language is None and self.multilingual:
            language, prob, _ = self.model.detect_language(_read_block(source, 0.0, min(duration, CHUNK_SECONDS)))
        else:
            prob = None if self.multilingual else 1.0
        info = TranscriptionInfo(language if self.multilingual else "en", prob, duration)

        def decode_block(block: np.ndarray, offset: float) -> list[Segment]:
            if is_silent(block):
                return []
            segments, _ = self.model.transcribe(block, language=info.language, vad_filter=vad, **self._kwargs(options))
            return self._convert(segments, offset)

        return transcribe_in_blocks(decode_block, source, duration), info
