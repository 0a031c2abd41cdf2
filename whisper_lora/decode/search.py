"""Search over a batch of 30 s windows: greedy or sampled decoding, beam search, and temperature fallback.

Rows that reach end-of-text leave the batch, so the others stop paying for them; a retry at the next
temperature reuses the encoder output and decodes only the windows that need it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import torch

from ..constants import MAX_TARGET_TOKENS
from ..tokens import SpecialTokens
from .kv import Network
from .rules import LogitRules
from .types import DecodeOptions

SAMPLING_SEED = 0  # every sampled window starts from this seed: results are reproducible


@dataclass
class WindowResult:
    """What openai/whisper's DecodingResult carries for one 30 s window."""
    tokens: list[int]  # sampled tokens, timestamps included, end-of-text excluded
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    token_logprobs: list[float] | None = None  # of each token in `tokens` (after the logit rules), as sampled
    end_logprob: float = 0.0  # of the end-of-text token (0 when the window ran out of tokens first): with
    # token_logprobs it sums to avg_logprob x (len(tokens) + 1), openai/whisper's mean
    # Recorded when a text-only decode is asked for word timestamps (timing.words_from_attention): the alignment
    # heads' attention of every token of prefix + tokens + end-of-text (heads, tokens, frames), and each sampled
    # token's probability among the text tokens before the logit rules. The decode of such a window runs the very
    # sequence openai/whisper's alignment pass runs again; this spares that pass. None where it was not recorded.
    attention: torch.Tensor | None = None
    text_probs: list[float] | None = None


def compression_ratio(text: str) -> float:
    """gzip ratio of the text, as faster-whisper computes it: above ~2.4 the window is a repetition loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def needs_fallback(result: WindowResult, options: DecodeOptions) -> bool:
    """A loop or low confidence is retried hotter, unless the window is likely silence anyway."""
    needs = ((options.compression_ratio_threshold is not None
              and result.compression_ratio > options.compression_ratio_threshold)
             or (options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold))
    silence = (options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold
               and options.log_prob_threshold is not None and result.avg_logprob < options.log_prob_threshold)
    return needs and not silence


def is_silence(result: WindowResult, options: DecodeOptions) -> bool:
    """openai/whisper's rule: a likely no-speech window is skipped unless its text is confident."""
    if options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
        return False
    return options.log_prob_threshold is None or result.avg_logprob <= options.log_prob_threshold


@dataclass
class Sampled:
    """One window's decode at one temperature."""
    tokens: list[int]
    total: float  # the sum of their log-probabilities with the end-of-text one
    no_speech: float
    token_logprobs: list[float]
    end: float  # the end-of-text token's log-probability
    attention: torch.Tensor | None = None  # see WindowResult
    text_probs: list[float] | None = None


class Search:
    def __init__(self, network: Network, tokens: SpecialTokens, rules: LogitRules,
                 alignment_heads: dict[int, list[int]] | None = None):
        self.network, self.tokens, self.rules = network, tokens, rules
        self.alignment_heads = alignment_heads

    def _sample(self, encoded: torch.Tensor, prefixes: list[list[int]], sot_index: int, timestamps: bool,
                temperature: float, max_new: int, adapters: list[str] | None, record: bool = False
                ) -> list[Sampled]:
        """Greedy (temperature 0) or sampled decoding of a batch of windows; with `record`, each window's
        alignment attention and text probabilities too (WindowResult), for the windows that end with
        end-of-text. Each window samples from a generator of its own, seeded alike: its draws do not depend
        on which other windows share the batch, so a request decodes the same alone or among others, and
        concurrent calls neither share nor disturb random state.
        """
        net, eot = self.network, self.tokens.eot
        rows = len(prefixes)
        heads = self.alignment_heads if record else None
        caches, hidden = net.start(torch.tensor(prefixes, device=net.device), encoded, len(prefixes[0]) + max_new,
                                   adapters, heads)
        attention: list[list[torch.Tensor]] = [[caches.attention[i]] if record else [] for i in range(rows)]
        text_probs: list[list[float]] = [[] for _ in range(rows)]
        no_speech = net.logits(hidden[:, sot_index]).softmax(-1)[:, self.tokens.no_speech].tolist()
        logits = net.logits(hidden[:, -1])
        sampled: list[list[int]] = [[] for _ in range(rows)]
        sampled_logprobs: list[list[float]] = [[] for _ in range(rows)]
        ends = [0.0] * rows
        totals = [0.0] * rows
        ended: set[int] = set()
        active = list(range(rows))
        generators = [torch.Generator(device=net.device).manual_seed(SAMPLING_SEED) for _ in range(rows)] \
            if temperature > 0 else []
        for step in range(max_new):
            # before the logit rules: find_alignment's probabilities are the model's own
            text_logprobs = logits[:, :eot].log_softmax(-1) if record else None
            logits = self.rules.apply(logits, [sampled[i] for i in active], step == 0, timestamps, encoded.shape[1])
            if temperature > 0:
                probs = (logits / temperature).softmax(-1)
                chosen = torch.cat([torch.multinomial(p, 1, generator=generators[i]) for p, i in zip(probs, active)])
            else:
                chosen = logits.argmax(-1)
            logprobs = logits.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1).tolist()
            if record:  # a special token (a timestamp, sampled hot) has none; its window falls back to the pass
                among_text = text_logprobs.gather(1, chosen.clamp(max=eot - 1)[:, None]).squeeze(1).exp().tolist()
            keep = []
            for j, (i, token) in enumerate(zip(active, chosen.tolist())):
                totals[i] += logprobs[j]
                if token != eot:
                    sampled[i].append(token)
                    sampled_logprobs[i].append(logprobs[j])
                    keep.append(j)
                    if record:
                        text_probs[i].append(among_text[j] if token < eot else 0.0)
                else:
                    ends[i] = logprobs[j]
                    ended.add(i)
            last = not keep or step == max_new - 1
            leaving = len(keep) < len(active)
            # a recording decode runs the end-of-text of the windows that chose it too (the alignment pass's last
            # row, part of its normalisation) in the step the others take anyway: they leave after it, not before
            leave_after = record and leaving
            if last and not leave_after:
                break
            index = torch.tensor(keep, device=net.device) if leaving else None
            if leaving and not leave_after:
                caches.select(index)
                chosen = chosen[index]
                active = [active[j] for j in keep]
            hidden = net.step(chosen[:, None], caches, heads)
            if record:
                for j, i in enumerate(active):
                    attention[i].append(caches.attention[j])
            if last:
                break
            if leave_after:
                caches.select(index)
                hidden = hidden[index]
                active = [active[j] for j in keep]
            logits = net.logits(hidden)
        return [Sampled(sampled[i], totals[i], no_speech[i], sampled_logprobs[i], ends[i],
                        torch.cat(attention[i], 1) if record and i in ended else None,
                        text_probs[i] if record and i in ended else None) for i in range(rows)]

    def _beam_search(self, encoded: torch.Tensor, prefixes: list[list[int]], sot_index: int, timestamps: bool,
                     beams: int, max_new: int, adapters: list[str] | None) -> list[Sampled]:
        """openai/whisper's beam search (patience 1; the finished candidate with the best mean log-probability)."""
        net, eot = self.network, self.tokens.eot
        audios = len(prefixes)
        ids = torch.tensor(prefixes, device=net.device).repeat_interleave(beams, 0)
        beam_adapters = None if adapters is None else [a for a in adapters for _ in range(beams)]
        caches, hidden = net.start(ids, encoded.repeat_interleave(beams, 0), len(prefixes[0]) + max_new, beam_adapters)
        no_speech = net.logits(hidden[::beams, sot_index]).softmax(-1)[:, self.tokens.no_speech].tolist()
        logits = net.logits(hidden[:, -1])
        sampled: list[list[int]] = [[] for _ in range(audios * beams)]
        steps: list[list[float]] = [[] for _ in range(audios * beams)]  # each token's log-probability
        totals = [0.0] * (audios * beams)
        finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(audios)]
        finished_steps: list[dict[tuple[int, ...], list[float]]] = [{} for _ in range(audios)]
        for step in range(max_new):
            logprobs = self.rules.apply(logits, sampled, step == 0, timestamps, encoded.shape[1]).log_softmax(-1)
            top_logprobs, top_tokens = (t.tolist() for t in logprobs.topk(beams + 1, dim=-1))
            next_sampled, next_totals, next_steps, sources = [], [], [], []
            for audio in range(audios):
                scores, origin, step_of = {}, {}, {}
                for row in range(audio * beams, (audio + 1) * beams):
                    for logprob, token in zip(top_logprobs[row], top_tokens[row]):
                        candidate = (*sampled[row], token)
                        scores[candidate], origin[candidate] = totals[row] + logprob, row
                        step_of[candidate] = logprob
                saved = 0
                for candidate in sorted(scores, key=scores.get, reverse=True):
                    if candidate[-1] == eot:
                        if len(finished[audio]) < beams:
                            finished[audio][candidate[:-1]] = scores[candidate]
                            finished_steps[audio][candidate[:-1]] = [*steps[origin[candidate]], step_of[candidate]]
                        continue
                    next_sampled.append(list(candidate))
                    next_totals.append(scores[candidate])
                    next_steps.append([*steps[origin[candidate]], step_of[candidate]])
                    sources.append(origin[candidate])
                    saved += 1
                    if saved == beams:
                        break
            sampled, totals, steps = next_sampled, next_totals, next_steps
            if all(len(f) >= beams for f in finished) or step == max_new - 1:
                break
            caches.select(torch.tensor(sources, device=net.device))
            ids = torch.tensor([[s[-1]] for s in sampled], device=net.device)
            logits = net.logits(net.step(ids, caches))
        results = []
        for audio in range(audios):
            candidates = finished[audio]
            live = range(audio * beams, (audio + 1) * beams)
            for row in sorted(live, key=lambda r: totals[r], reverse=True):
                if len(candidates) >= beams:
                    break
                candidates.setdefault(tuple(sampled[row]), totals[row])
                finished_steps[audio].setdefault(tuple(sampled[row]), [*steps[row], 0.0])  # never ended
            best = max(candidates, key=lambda c: candidates[c] / max(1, len(c)))
            *token_steps, end = finished_steps[audio][best]
            results.append(Sampled(list(best), candidates[best], no_speech[audio], token_steps, end))
        return results

    def decode(self, encoded: torch.Tensor, prefixes: list[list[int]], options: DecodeOptions, timestamps: bool,
               adapters: list[str] | None = None) -> list[WindowResult]:
        """Decode each window, retrying the ones that loop or lack confidence at the next temperature.

        Prefixes must have one length. A window that fails at every temperature keeps its most confident
        attempt among those that do not loop (faster-whisper's rule; openai/whisper would keep the
        hottest, often garbled, one). A text-only decode for word timestamps records what they need
        (WindowResult.attention), except in beam search, whose beams would each have to carry it.
        """
        # the alignment pass's sequence: no previous text before the prompt, no forced text after it
        record = (options.word_timestamps and not timestamps and self.alignment_heads is not None
                  and all(prefix[0] == self.tokens.sot and prefix[-1] == self.tokens.no_timestamps
                          for prefix in prefixes))
        sot_index = prefixes[0].index(self.tokens.sot)
        max_new = max(1, min(options.max_new_tokens, MAX_TARGET_TOKENS - len(prefixes[0])))
        attempts: list[list[WindowResult]] = [[] for _ in prefixes]
        results: list[WindowResult | None] = [None] * len(prefixes)
        todo = list(range(len(prefixes)))
        for temperature in options.temperature:
            everyone = len(todo) == len(prefixes)
            rows = encoded if everyone else encoded[torch.tensor(todo, device=encoded.device)]
            row_adapters = None if adapters is None else [adapters[i] for i in todo]
            batch = [prefixes[i] for i in todo]
            if temperature == 0 and options.num_beams > 1:
                decoded = self._beam_search(rows, batch, sot_index, timestamps, options.num_beams, max_new,
                                            row_adapters)
            else:
                decoded = self._sample(rows, batch, sot_index, timestamps, temperature, max_new, row_adapters,
                                       record)
            retry = []
            for i, run in zip(todo, decoded):
                result = WindowResult(run.tokens, run.total / (len(run.tokens) + 1), run.no_speech,
                                      compression_ratio(self.tokens.decode(run.tokens).strip()), temperature,
                                      run.token_logprobs, run.end, run.attention, run.text_probs)
                attempts[i].append(result)
                results[i] = result
                if needs_fallback(result, options):
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

    def detect_language(self, encoded: torch.Tensor, adapters: list[str] | None = None) -> list[tuple[str, float]]:
        """Most likely language and its probability per window, from the first decoder step."""
        net = self.network
        start = torch.full((len(encoded), 1), self.tokens.sot, device=net.device)
        _, hidden = net.start(start, encoded, 1, adapters)
        codes = list(self.tokens.language_ids)
        ids = torch.tensor(list(self.tokens.language_ids.values()), device=net.device)
        probs = net.logits(hidden[:, -1])[:, ids].softmax(-1)
        best = probs.argmax(-1)
        return [(codes[int(b)], float(probs[i, b])) for i, b in enumerate(best)]
