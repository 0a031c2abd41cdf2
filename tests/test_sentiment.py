import json

import pytest

from whisper_lora.decode import Segment
from whisper_lora.errors import UserError
from whisper_lora.sentiment import analyser_for, annotate, label_of

POSITIVE = {"en": ["I love this, it is wonderful!", "What a great day, thank you so much."],
            "zh": ["这个产品非常好，我很喜欢。", "服务态度特别好，下次还来。"]}
NEGATIVE = {"en": ["This is terrible and I hate it.", "The service was awful and rude."],
            "zh": ["这个产品太差了，我很失望。", "服务态度恶劣，再也不来了。"]}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_default_analysers_tell_polarity_offline(language):
    analyser = analyser_for(language)
    labels = [s.label for s in analyser(POSITIVE[language] + NEGATIVE[language])]
    assert labels == ["positive"] * 2 + ["negative"] * 2
    assert all(0 <= s.score <= 1 for s in analyser(POSITIVE[language]))


def test_english_statements_are_neutral():
    (result,) = analyser_for("en")(["He turned sharply and faced Gregson across the table."])
    assert result.label == "neutral"


def test_a_language_without_an_analyser_gets_a_note_not_a_label():
    segments = [Segment(0, 0.0, 1.0, "Bonjour")]
    scored, overall, note = annotate(segments, "Bonjour", "fr")
    assert overall is None and scored[0].sentiment is None
    assert "no sentiment analyser for language 'fr'" in note and "--sentiment-model" in note


def test_labels_of_classifiers_map_to_three_classes():
    assert [label_of(n, i, 2) for i, n in enumerate(["NEGATIVE", "POSITIVE"])] == ["negative", "positive"]
    assert [label_of(n, i, 3) for i, n in enumerate(["LABEL_0", "LABEL_1", "LABEL_2"])] == [
        "negative", "neutral", "positive"]
    assert [label_of(f"{k} stars", k - 1, 5) for k in range(1, 6)] == ["negative"] * 2 + ["neutral"] + ["positive"] * 2
    assert label_of("cat", 0, 2) is None and label_of("LABEL_3", 3, 4) is None


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A randomly initialised 2-layer BERT sentiment classifier with its own small vocabulary, saved to a folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("classifier")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "i", "love", "hate", "this", "it", "is", "terrible",
             "wonderful", "!", ".", ",", *"这个产品非常好我很喜欢太差了失望"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3,
                        id2label={0: "Negative", 1: "Neutral", 2: "Positive"},
                        label2id={"Negative": 0, "Neutral": 1, "Positive": 2})
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_any_huggingface_classifier_from_a_folder(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = POSITIVE["en"] + POSITIVE["zh"] + NEGATIVE["zh"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probabilities = [model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0] for t in texts]
    expected = [(model.config.id2label[int(p.argmax())].lower(), round(float(p.max()), 4)) for p in probabilities]
    results = analyser_for(None, str(tiny_classifier))(texts)
    assert [(r.label, r.score) for r in results] == [(label, pytest.approx(score, abs=1e-4)) for label, score in expected]
    # each segment scored on its own text, the whole transcript on the whole text
    segments = [Segment(0, 0.0, 1.0, text) for text in NEGATIVE["zh"]]
    whole = "".join(NEGATIVE["zh"])
    scored, overall, note = annotate(segments, whole, "zh", str(tiny_classifier))
    assert note is None
    assert [s.sentiment for s in scored] == results[-len(NEGATIVE["zh"]):]
    assert overall == analyser_for(None, str(tiny_classifier))([whole])[0]


def test_a_classifier_whose_labels_mean_nothing_is_refused(tiny_classifier, tmp_path):
    import shutil

    shutil.copytree(tiny_classifier, tmp_path / "pets")
    config = json.loads((tmp_path / "pets" / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog", "2": "bird"}
    config["label2id"] = {"cat": 0, "dog": 1, "bird": 2}
    (tmp_path / "pets" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot tell which of its labels"):
        analyser_for(None, str(tmp_path / "pets"))
