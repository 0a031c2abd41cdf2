import json

import pytest

from whisper_lora.errors import ManifestError, UserError
from whisper_lora.manifest import check_audio_exists, read_manifest


def test_json_dict_relative_to_audio_dir(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a.wav": "hello", "sub/b.wav": "world"}))
    samples = read_manifest(tmp_path / "m.json", audio_dir=tmp_path / "clips")
    assert [s.text for s in samples] == ["hello", "world"]
    assert samples[1].audio_path == (tmp_path / "clips" / "sub" / "b.wav").resolve()


def test_json_dict_defaults_to_manifest_folder(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a.wav": "hello"}))
    assert read_manifest(tmp_path / "m.json")[0].audio_path == (tmp_path / "a.wav").resolve()


def test_json_list_with_language(tmp_path):
    rows = [{"audio_path": "x/a.wav", "text": "你好", "language": "Chinese"}, {"audio_path": "/abs/b.wav", "text": "hi"}]
    (tmp_path / "m.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    samples = read_manifest(tmp_path / "m.json")
    assert samples[0].language == "zh" and samples[1].language is None
    assert samples[0].audio_path == (tmp_path / "x" / "a.wav").resolve()
    assert str(samples[1].audio_path) == "/abs/b.wav"


def test_jsonl_whisper_finetune_format(tmp_path):
    row = {"audio": {"path": "a.wav", "start_time": 1.5, "end_time": 4.0}, "sentence": "第一句",
           "language": "zh", "duration": 2.5, "sentences": [{"start": 0, "end": 2.5, "text": "第一句"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n\n", encoding="utf-8")
    (sample,) = read_manifest(tmp_path / "m.jsonl")
    assert (sample.start, sample.end, sample.duration, sample.language) == (1.5, 4.0, 2.5, "zh")
    assert sample.sentences[0].text == "第一句" and sample.sentences[0].end == 2.5


def test_invalid_json_line_is_named(tmp_path):
    lines = [json.dumps({"audio": {"path": "a.wav"}, "sentence": "ok"}), '{"audio": {"path": "b.wav"}, "sentence": ']
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    with pytest.raises(ManifestError, match=r"bad.jsonl: line 2: invalid JSON"):
        read_manifest(tmp_path / "bad.jsonl")


def test_invalid_json_list_reports_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"audio_path": "a.wav", "text": "x"},\n {oops}\n]')
    with pytest.raises(ManifestError, match=r"bad.json: invalid JSON at line 3"):
        read_manifest(tmp_path / "bad.json")


def test_row_without_text(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": {"path": "a.wav"}}) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl: line 1: row has no text"):
        read_manifest(tmp_path / "m.jsonl")


def test_empty_text(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a.wav": "  "}))
    with pytest.raises(ManifestError, match="entry 'a.wav': empty text"):
        read_manifest(tmp_path / "m.json")


def test_unknown_language(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": {"path": "a.wav"}, "sentence": "x", "language": "klingon"}))
    with pytest.raises(UserError, match=r"m.jsonl: line 1: unknown language 'klingon'"):
        read_manifest(tmp_path / "m.jsonl")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.json")


def test_missing_audio_is_reported_with_row(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"gone.wav": "x", "gone2.wav": "y"}))
    samples = read_manifest(tmp_path / "m.json")
    with pytest.raises(ManifestError, match=r"m.json: audio file not found: .*gone.wav \(gone.wav\) \(and 1 more\)"):
        check_audio_exists(samples, tmp_path / "m.json")


def test_single_row_json_lines_is_not_mistaken_for_a_dict(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"audio_path": "a.wav", "text": "hello"}) + "\n")
    (sample,) = read_manifest(tmp_path / "one.jsonl")
    assert sample.audio_path.name == "a.wav" and sample.text == "hello"


def test_malformed_sentences_are_named(tmp_path):
    row = {"audio": {"path": "a.wav"}, "sentence": "x", "sentences": [{"start": 0, "text": "x"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: sentences\[0\] needs numeric 'start', 'end'"):
        read_manifest(tmp_path / "m.jsonl")
