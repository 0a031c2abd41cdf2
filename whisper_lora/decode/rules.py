"""openai/whisper's logit filters, applied at every decoding step: suppressed tokens, no blank start,
and the timestamp grammar (pairs, monotonic, a window starts with one)."""
from __future__ import annotations

import torch

from ..tokens import SpecialTokens


class LogitRules:
    def __init__(self, tokens: SpecialTokens, generation_config, vocab_size: int, device):
        self.tokens = tokens
        self.vocab = torch.arange(vocab_size, device=device)
        self.suppress = self._mask(generation_config.suppress_tokens or [], vocab_size, device)
        blank = tokens.text_ids(" ")
        begin = generation_config.begin_suppress_tokens or [*blank, tokens.eot]
        self.suppress_at_begin = self._mask(begin, vocab_size, device)
        self.max_initial_timestamp_index = getattr(generation_config, "max_initial_timestamp_index", 50)

    @staticmethod
    def _mask(token_ids, vocab_size: int, device) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[[t for t in token_ids if 0 <= t < vocab_size]] = True
        return mask.to(device)

    def apply(self, logits: torch.Tensor, sampled: list[list[int]], first: bool, timestamps: bool,
              last_timestamp: int | None = None) -> torch.Tensor:
        """`last_timestamp`: the latest timestamp index (0.02 s steps) the window may write: the encoder's
        output positions; with a context shorter than 30 s there is no audio to stamp beyond it."""
        inf = float("-inf")
        logits = logits.masked_fill(self.suppress, inf)
        if first:
            logits.masked_fill_(self.suppress_at_begin, inf)
        if not timestamps:
            return logits
        begin = self.tokens.timestamp_begin
        logits[:, self.tokens.no_timestamps] = inf
        if last_timestamp is not None:
            logits[:, begin + last_timestamp + 1:] = inf
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
                        logits[k, :self.tokens.eot] = inf
                stamp = next((t for t in reversed(seq) if t >= begin), None)
                # time never goes back, and a segment is never empty
                floors.append(begin if stamp is None else stamp if last and not penultimate else stamp + 1)
            floor = torch.tensor(floors, device=logits.device)[:, None]
            logits.masked_fill_((self.vocab >= begin) & (self.vocab < floor), inf)
        logprobs = logits.log_softmax(-1)
        timestamp_wins = logprobs[:, begin:].logsumexp(-1) > logprobs[:, :begin].max(-1).values
        logits[:, :begin] = logits[:, :begin].masked_fill(timestamp_wins[:, None], inf)
        return logits
