"""AlignAtt: decode a growing buffer once and commit what the model has finished hearing (Papi et al.,
"AlignAtt: Using Attention-based Audio-Translation Alignments as a Guide for Simultaneous Speech
Translation"; SimulStreaming's and WhisperLiveKit's policy for Whisper).

LocalAgreement-2 confirms a word only when two consecutive decodes agree on it, so a word waits for two
decodes. AlignAtt reads the decoder's own cross-attention instead: the alignment heads (those openai/whisper
times words with) point at the audio the next token comes from. While that point stays `threshold`
encoder positions short of the end of the audio heard so far, the token is safe; once it reaches that
frontier the rest of the audio is not heard yet, so decoding stops there and everything before it is
committed after this one decode.

What is kept from SimulStreaming's `infer`: attention of the alignment heads over every token of the
decode, normalised per frame over the tokens, median-filtered over frames (width 7), averaged over the
heads, cut to the frames that hold audio; the token whose successor attends within `threshold` of the
end is dropped with everything after it (not once the audio has ended: then decoding runs to the end of
text); the last word is held back unless the audio ended (it may be cut off mid-word); a "rewind" (attention jumping back by more than `REWIND_POSITIONS`) drops what this
decode wrote, which is how a hallucination starts. What differs: words get times from the same attention
(each token's most-attended position; a word ends where the next one starts), so the stream can cut its
buffer at committed sentences without a second, DTW, pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import TIME_PRECISION
from ..tokens import SpecialTokens
from .kv import Network
from .rules import LogitRules
from .timing import MEDIAN_FILTER_WIDTH, median_filter, split_words

FRONTIER_POSITIONS = 25  # encoder positions (0.5 s): SimulStreaming's frame_threshold
REWIND_POSITIONS = 200  # encoder positions (4 s) of backward jump that mean the decoder lost its place
LOOP_REPEATS = 3  # the same run of tokens this many times in a row: a repetition loop, not speech
LOOP_LONGEST = 10  # tokens: the longest run checked for repeats


@dataclass
class TimedWord:
    word: str  # with its leading space, as the tokenizer spells it
    tokens: list[int]
    start: float  # seconds into the buffer
    end: float
    probability: float


@dataclass
class AlignAttResult:
    committed: list[TimedWord]  # safe to show as final
    held: list[TimedWord]  # decoded but not committed: the word the frontier may have cut, or all after a rewind
    stop: str  # "end" (end of text), "frontier", "rewind", "loop" or "limit" (max_new tokens)


def attended_position(attention: torch.Tensor) -> int:
    """(heads, tokens, positions) cross-attention of the decode so far -> the encoder position its last row
    attends to most. Each position is normalised over the tokens, as openai/whisper's timing does; only
    the last row is filtered, which is all the rule reads (the whole matrix would cost more than a step).
    Every position counts, the padding after the audio too: a decoder reading past the audio it has is
    inventing text, and the frontier rule must see it (SimulStreaming looks at the audio's positions only;
    at a 30 s context the decoder then looped on, unseen, up to its token limit)."""
    std, mean = torch.std_mean(attention, dim=-2, keepdim=True, unbiased=False)
    last = (attention[:, -1:] - mean) / (std + 1e-8)
    return int(median_filter(last, MEDIAN_FILTER_WIDTH).mean(0)[0].argmax())


def commit_rule(positions: list[int], content: int, final: bool, start_position: int,
                threshold: int = FRONTIER_POSITIONS) -> tuple[int, str | None]:
    """Given the attended position of the row that predicts each new token (`positions[k]` for token k,
    k = 0 the first new token), how many new tokens stand and why decoding stopped (None: not yet).

    Token k stands while the row after it (k + 1) attends short of the frontier; a backward jump of more
    than REWIND_POSITIONS below the furthest point reached (from `start_position`, the committed text's
    end) drops every new token. When the audio has ended (`final`) there is no frontier: nothing more is
    coming, and the rows that predict the final punctuation and the end of text attend to the very end of
    the encoder output, padding included (SimulStreaming's frontier 4 positions before the end dropped the
    last word or its full stop of every utterance here); loops are caught by `repetition_start`."""
    furthest = start_position
    for k, position in enumerate(positions):
        if furthest - position > REWIND_POSITIONS:
            return 0, "rewind"
        furthest = max(furthest, position)
        if not final and position >= content - threshold:
            return max(0, k - 1), "frontier"  # token k - 1 led here: it goes, with everything after it
    return len(positions), None


def repetition_start(tokens: list[int]) -> int | None:
    """Where a repetition loop at the end of `tokens` begins to repeat (the first copy stays: "eight five"
    may be said once), or None. Whisper loops on partial audio now and then; LocalAgreement's temperature
    fallback catches it after the fact, one AlignAtt pass must catch it as it happens."""
    for size in range(1, LOOP_LONGEST + 1):
        run = size * LOOP_REPEATS
        if len(tokens) < run:
            break
        tail = tokens[-run:]
        if all(tail[i] == tail[i % size] for i in range(run)):
            return len(tokens) - run + size
    return None


class AlignAttDecoder:
    def __init__(self, network: Network, tokens: SpecialTokens, rules: LogitRules, heads: dict[int, list[int]]):
        self.network, self.tokens, self.rules, self.heads = network, tokens, rules, heads

    @torch.inference_mode()
    def decode(self, encoded: torch.Tensor, prefix: list[int], forced: int, content: int, final: bool, max_new: int,
               language: str | None, adapter: str | None = None, start_position: int = 0,
               threshold: int = FRONTIER_POSITIONS) -> AlignAttResult:
        """Greedy decoding of one buffer (`encoded`: (1, positions, d_model); `content` of its positions hold
        audio) after `prefix` (the prompt ending with `forced` already committed tokens)."""
        net, eot = self.network, self.tokens.eot
        adapters = None if adapter is None else [adapter]
        caches, hidden = net.start(torch.tensor([prefix], device=net.device), encoded, len(prefix) + max_new + 1,
                                   adapters, self.heads)
        rows = [caches.attention[0]]  # (heads, tokens, positions), every token of the decode
        logits = net.logits(hidden[:, -1])
        sampled: list[int] = []
        logprobs: list[float] = []
        positions: list[int] = []
        stop, kept = "limit", 0
        sot = prefix.index(self.tokens.sot)
        for step in range(max_new + 1):
            # the row that predicts the next token: where it attends is where that token is heard
            positions.append(attended_position(torch.cat(rows, 1)[:, sot:]))
            kept, reason = commit_rule(positions, content, final, start_position, threshold)
            if reason is not None:
                stop = reason
                break
            if step == max_new:
                break
            logits = self.rules.apply(logits, [sampled], step == 0 and forced == 0, False)
            logits[:, eot + 1:] = float("-inf")  # text only: no timestamps, no other special token
            scored = logits.log_softmax(-1)
            token = int(scored.argmax(-1))
            if token == eot:
                stop, kept = "end", len(sampled)
                break
            sampled.append(token)
            logprobs.append(float(scored[0, token]))
            loop = repetition_start(sampled)
            if loop is not None:
                stop, kept = "loop", loop
                break
            hidden = net.step(torch.tensor([[token]], device=net.device), caches, self.heads)
            rows.append(caches.attention[0])
            logits = net.logits(hidden)
        words = self._words(sampled, positions, logprobs, language)
        if stop == "rewind":
            return AlignAttResult([], words, stop)
        standing, count = [], 0
        for word in words:
            if count + len(word.tokens) > kept:
                break
            standing.append(word)
            count += len(word.tokens)
        if not final:
            standing = standing[:-1]  # the last word may be cut off by the end of the audio heard so far
        return AlignAttResult(standing, words[len(standing):], stop)

    def _words(self, sampled: list[int], positions: list[int], logprobs: list[float],
               language: str | None) -> list[TimedWord]:
        if not sampled:
            return []
        words, word_tokens = split_words(self.tokens, sampled, language)
        out, index = [], 0
        for word, pieces in zip(words, word_tokens):
            start = positions[index]
            end = positions[min(index + len(pieces), len(positions) - 1)]
            probability = float(torch.tensor(logprobs[index:index + len(pieces)]).exp().mean())
            out.append(TimedWord(word, list(pieces), start * TIME_PRECISION, max(start, end) * TIME_PRECISION,
                                 probability))
            index += len(pieces)
        return out
