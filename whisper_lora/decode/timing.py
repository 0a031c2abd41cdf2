"""Word-level timestamps: cross-attention of the alignment heads + dynamic time warping (openai/whisper's timing.py).

`find_alignment` runs the model (one decoder pass over a window's text); `assign_words` is pure and gives
each segment its words with openai/whisper's heuristics.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import NO_SPACE_LANGUAGES, TIME_PRECISION
from ..tokens import SpecialTokens
from .kv import Network

MEDIAN_FILTER_WIDTH = 7  # smoothing of the alignment heads' attention, as openai/whisper
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # glued to the following word (openai/whisper's defaults)
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # glued to the preceding word
SENTENCE_ENDS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float  # seconds into the window
    end: float
    probability: float


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x[None], (pad, pad, 0, 0), mode="reflect")[0]
    return padded.unfold(-1, width, 1).sort()[0][..., pad]


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def merge_punctuations(alignment: list[WordTiming]) -> None:
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


def split_unicode(tokenizer, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    decode = tokenizer.decode
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


def split_words(tokens: SpecialTokens, token_ids: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
    """Words as openai/whisper cuts them: at spaces and punctuation, or per character where words are
    written without spaces (zh, ja, th, …)."""
    subwords, subword_tokens = split_unicode(tokens.tokenizer, token_ids)
    if language in NO_SPACE_LANGUAGES:
        return subwords, subword_tokens
    words, word_tokens = [], []
    for subword, pieces in zip(subwords, subword_tokens):
        special = pieces[0] >= tokens.eot
        if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
            words.append(subword)
            word_tokens.append(list(pieces))
        else:
            words[-1] += subword
            word_tokens[-1].extend(pieces)
    return words, word_tokens


def alignment_heads(generation_config, model_config) -> dict[int, list[int]]:
    """{decoder layer: [head, …]} whose cross-attention follows the speech; openai/whisper's default when
    the model names none: every head of the second half of the decoder."""
    heads = getattr(generation_config, "alignment_heads", None)
    if not heads:
        layers = model_config.decoder_layers
        heads = [[layer, head] for layer in range(layers // 2, layers) for head in range(model_config.decoder_attention_heads)]
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return by_layer


@torch.inference_mode()
def find_alignment(network: Network, tokens: SpecialTokens, heads: dict[int, list[int]], encoded: torch.Tensor,
                   text_tokens: list[int], language: str | None, task: str, num_frames: int,
                   adapter: str | None = None) -> list[WordTiming]:
    """Word start/end times (seconds into the window) by DTW over the alignment heads' attention, from a
    decoder pass over the window's text (openai/whisper's way). `encoded`: the window's encoder output,
    (frames, d_model)."""
    if not text_tokens:
        return []
    start = tokens.prompt(language, task, timestamps=False)
    sequence = [*start, *text_tokens, tokens.eot]
    ids = torch.tensor([sequence], device=network.device)
    caches, hidden = network.start(ids, encoded[None], len(sequence), None if adapter is None else [adapter], heads)
    logits = network.logits(hidden[0])
    token_probs = logits[len(start) - 1:len(start) - 1 + len(text_tokens), :tokens.eot].softmax(-1)
    text_token_probs = token_probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()
    return words_from_attention(tokens, caches.attention[0], text_token_probs, text_tokens, language, num_frames,
                                len(start))


def words_from_attention(tokens: SpecialTokens, attention: torch.Tensor, text_token_probs: list[float],
                         text_tokens: list[int], language: str | None, num_frames: int, prompt_length: int
                         ) -> list[WordTiming]:
    """The DTW half of `find_alignment`: `attention` (heads, tokens, frames), the alignment heads' attention of
    every token of `prompt + text_tokens + [eot]` (a pass over them, or what a decode of that very sequence
    recorded); `text_token_probs`: each text token's probability among the text tokens."""
    if not text_tokens:
        return []
    weights = attention[:, :, :max(1, num_frames // 2)]
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, MEDIAN_FILTER_WIDTH)
    matrix = weights.mean(0)[prompt_length - 1:-1]
    text_indices, time_indices = dtw(-matrix.double().cpu().numpy())
    words, word_tokens = split_words(tokens, text_tokens + [tokens.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] * TIME_PRECISION
    return [WordTiming(word, toks, float(jump_times[i]), float(jump_times[j]), float(np.mean(text_token_probs[i:j])))
            for word, toks, i, j in zip(words, word_tokens, boundaries[:-1], boundaries[1:])]


def assign_words(pieces: list, alignment: list[WordTiming], eot: int, time_offset: float, last_speech: float) -> float:
    """Give each segment (`piece`: start, end, tokens, words) its words from the window's `alignment`,
    with openai/whisper's heuristics: over-long words at pauses and sentence ends are shortened, and
    segment bounds follow the words. Returns where speech was last heard, for the next window."""
    durations = np.array([w.end - w.start for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_ENDS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_ENDS:
                    alignment[i].start = alignment[i].end - longest
    merge_punctuations(alignment)
    index = 0
    for piece in pieces:
        text_tokens = [t for t in piece.tokens if t < eot]
        saved, words = 0, []
        while index < len(alignment) and saved < len(text_tokens):
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
