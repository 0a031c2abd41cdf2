"""Whisper's special tokens and the decoder prompts built from them, for training labels and decoding alike.

<|startofprev|> previous text <|startoftranscript|><|lang|><|task|>[<|notimestamps|>] is the one prompt
format; `SpecialTokens` builds it for a model (multilingual or English-only) from its generation config.
"""
from __future__ import annotations

from .constants import CHUNK_SECONDS, MAX_TARGET_TOKENS, NO_SPACE_LANGUAGES, TIME_PRECISION
from .errors import UserError


def segment_text(text: str, language: str | None) -> str:
    """A timestamped segment's text as Whisper writes it: after a space where words are spaced, so that
    segments decode apart ("hello good" rather than "hellogood")."""
    return " " + text if language not in NO_SPACE_LANGUAGES and not text.startswith(" ") else text


class SpecialTokens:
    """Token ids of one Whisper tokenizer + generation config, and the prompts made of them."""

    def __init__(self, generation_config, tokenizer=None):
        config = generation_config
        self.tokenizer = tokenizer
        eos = config.eos_token_id
        self.eot = eos[0] if isinstance(eos, (list, tuple)) else eos  # <|endoftext|>
        self.sot = config.decoder_start_token_id  # <|startoftranscript|>
        self.no_timestamps = getattr(config, "no_timestamps_token_id", None) or self._lookup("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1  # <|0.00|>
        self.no_speech = self.no_timestamps - 1  # <|nospeech|> (<|nocaptions|>), found as transformers finds it
        self.prev_sot = getattr(config, "prev_sot_token_id", None) or self._lookup("<|startofprev|>")
        self.multilingual = bool(getattr(config, "is_multilingual", False))
        lang_to_id = (getattr(config, "lang_to_id", None) or {}) if self.multilingual else {}
        self.language_ids = {token[2:-2]: i for token, i in lang_to_id.items()}  # "en" -> id of <|en|>
        self.task_ids = dict(getattr(config, "task_to_id", None) or {})

    def _lookup(self, token: str) -> int:
        if self.tokenizer is None:
            raise ValueError(f"the generation config lacks the id of {token}; pass the tokenizer")
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def languages(self) -> set[str]:
        return set(self.language_ids) if self.multilingual else {"en"}

    def prompt(self, language: str | None, task: str = "transcribe", timestamps: bool = False) -> list[int]:
        """<|startoftranscript|><|lang|><|task|>[<|notimestamps|>] (English-only models: no language or task)."""
        ids = [self.sot]
        if self.multilingual:
            if language is None:
                raise UserError("this multilingual model needs a language: set --language or a 'language' field "
                                "per row")
            if language not in self.language_ids:
                raise UserError(f"the model has no language token <|{language}|>")
            ids += [self.language_ids[language], self.task_ids[task]]
        if not timestamps:
            ids.append(self.no_timestamps)
        return ids

    def prefix(self, language: str | None, task: str, timestamps: bool, previous: list[int]) -> list[int]:
        """The prompt after <|startofprev|> and `previous` text tokens, as openai/whisper conditions a window:
        at most half the decoder context goes to previous text."""
        head = [self.prev_sot, *previous[-(MAX_TARGET_TOKENS // 2 - 1):]] if previous else []
        return head + self.prompt(language, task, timestamps)

    def text_ids(self, text: str) -> list[int]:
        """Text as given, spaces included: a plain label's text, or a piece whose spacing is already decided."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def segment_ids(self, text: str, language: str | None) -> list[int]:
        """A timestamped segment's text (`segment_text`'s spacing rule)."""
        return self.text_ids(segment_text(text, language))

    def prompt_ids(self, text: str | None) -> list[int]:
        """An initial prompt's tokens, with the leading space a word has inside running text."""
        return self.text_ids(" " + text.strip()) if text and text.strip() else []

    def time_token(self, seconds: float) -> int:
        steps = int(round(min(max(seconds, 0.0), CHUNK_SECONDS) / TIME_PRECISION))
        return self.timestamp_begin + steps

    def decode(self, tokens: list[int]) -> str:
        """Text of the tokens, special and timestamp tokens left out."""
        return self.tokenizer.decode([t for t in tokens if t < self.eot])


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each of the 256 bytes is shown as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            shown.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, shown)}


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (a byte-level BPE token can hold part of a character, so its text alone may
    not decode): what OpenAI's logprobs report beside the token."""
    decode = byte_decoder()
    return [bytes(decode.get(c, 0) for c in piece) if piece is not None else b""
            for piece in tokenizer.convert_ids_to_tokens(ids)]
