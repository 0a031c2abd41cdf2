import pytest

from whisper_lora.text import default_metric, error_counts, error_rate, normalize


def test_normalize_chinese_traditional_punctuation_and_spaces():
    assert normalize("我們，學習 漢語！", "zh") == "我们学习汉语"


def test_normalize_case_punctuation_whitespace():
    assert normalize("  Hello,   World!  It's  ", "de") == "hello world it s"


def test_english_numbers_and_contractions_use_whispers_normaliser():
    assert normalize("Seven of clubs.", "en") == normalize("7 of clubs", "en") == "7 of clubs"
    assert normalize("It's Mr. Smith!", "en") == "it is mister smith"


def test_normalize_detects_chinese_without_language():
    assert normalize("今天。天氣好") == "今天天气好"


def test_full_width_forms_fold():
    assert normalize("ＡＢＣ１２３", "de") == "abc123"


def test_cer_counts_characters():
    counts = error_counts("今天天气好", "今天天好", "cer")
    assert (counts.errors, counts.reference_length) == (1, 5)


def test_wer_corpus_level_and_normalised():
    refs = ["Hello world.", "Good morning everyone"]
    hyps = ["hello, world", "good evening everyone"]
    assert error_rate(refs, hyps, "wer") == pytest.approx(1 / 5)


def test_empty_hypothesis_and_reference():
    assert error_counts("abc", "", "cer").errors == 3
    assert error_counts("", "ab", "cer").errors == 2
    assert error_rate([""], [""], "cer") == 0.0


def test_default_metric():
    assert default_metric("zh") == "cer" and default_metric("en") == "wer" and default_metric(None) == "wer"


def test_unknown_metric():
    with pytest.raises(ValueError):
        error_counts("a", "b", "ser")
