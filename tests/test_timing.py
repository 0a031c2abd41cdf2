import numpy as np

from whisper_lora.decode.timing import dtw, split_words
from whisper_lora.tokens import SpecialTokens


def test_words_split_at_spaces_or_per_character(tiny_model_dir):
    """openai/whisper's word grouping: spaces and punctuation for most languages; for zh/ja/th/… every
    token that completes characters is a word, and a character spread over byte-level tokens stays whole."""
    from transformers import GenerationConfig, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    tokens = SpecialTokens(GenerationConfig.from_pretrained(tiny_model_dir), processor.tokenizer)
    encode = lambda text: processor.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    words, pieces = split_words(tokens, encode(" Hello, wonderful world."), "en")
    assert words == [" Hello", ",", " wonderful", " world", "."]
    assert sum(pieces, []) == encode(" Hello, wonderful world.")
    words, _ = split_words(tokens, encode("你好世界"), "zh")
    assert words == ["你好", "世界"]
    words, _ = split_words(tokens, encode(" 你好世界"), "en")
    assert words == [" 你好世界"]  # no space inside: one word where words are space-delimited
    rare = encode("𠜎")  # one character, several byte-level tokens
    assert len(rare) > 1
    words, pieces = split_words(tokens, rare + encode("好"), "zh")
    assert words == ["𠜎", "好"] and pieces[0] == rare


def test_dtw_matches_the_reference_implementation():
    """The vectorised DTW takes the same path as the cell-by-cell one (transformers' copy of openai's)."""
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    rng = np.random.default_rng(0)
    for shape in [(1, 5), (7, 3), (12, 150), (40, 300)]:
        matrix = rng.standard_normal(shape)
        matrix[:, ::7] = 0.25  # ties, where the tie-breaking order matters
        ours = dtw(matrix)
        reference = _dynamic_time_warping(matrix)
        assert all(np.array_equal(a, b) for a, b in zip(ours, reference)), shape
