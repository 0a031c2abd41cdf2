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


# ---- the row-tolerant reader (whisper-lora check) and allow_empty_text --------------------------------

from whisper_lora.manifest import iter_rows  # noqa: E402


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_iter_rows_yields_every_row_with_all_its_problems(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"audio": {"path": "a.wav"}, "sentence": "ok", "language": "zh"}).encode(),
        b'{"audio": {"path": "b.wav"}, "sentence": ',
        json.dumps({"sentence": "no audio", "language": "klingon"}).encode(),
        b"",
        json.dumps({"audio": {"path": "c.wav", "start_time": "x"}, "sentence": 5, "duration": "long"}).encode(),
        json.dumps([1, 2]).encode(),
        json.dumps({"audio_path": "d.wav", "text": "last"}).encode(),
    ])
    rows = list(iter_rows(manifest))
    assert [r.where for r in rows] == ["line 1", "line 2", "line 3", "line 5", "line 6", "line 7"]
    assert [r.index for r in rows] == list(range(6))
    assert rows[0].sample.text == "ok" and rows[0].sample.language == "zh" and not rows[0].problems
    assert [p.kind for p in rows[1].problems] == ["invalid_json"] and rows[1].raw.startswith('{"audio"')
    assert [p.kind for p in rows[2].problems] == ["no_audio_path", "unknown_language"]
    assert [p.kind for p in rows[3].problems] == ["bad_field", "bad_field", "bad_field"]
    assert rows[3].audio_path == (tmp_path / "c.wav").resolve()  # named even though the row is bad
    assert [p.kind for p in rows[4].problems] == ["not_object"]
    assert rows[5].sample.audio_path == (tmp_path / "d.wav").resolve()
    assert all(r.sample is None for r in rows[1:5])


def test_invalid_utf8_is_one_bad_line_not_a_bad_file(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"audio": {"path": "a.wav"}, "sentence": "fine"}).encode(),
        b'{"audio": {"path": "b.wav"}, "sentence": "caf\xe9 latin-1"}',
        json.dumps({"audio": {"path": "c.wav"}, "sentence": "还好"}, ensure_ascii=False).encode(),
    ])
    rows = list(iter_rows(manifest))
    assert rows[0].sample and rows[2].sample.text == "还好"
    assert rows[1].sample is None and rows[1].problems[0].kind == "not_utf8"
    assert rows[1].problems[0].message == "not valid UTF-8 (byte 45 of the line)"
    with pytest.raises(ManifestError, match=r"m.jsonl: line 2: not valid UTF-8 \(byte 45 of the line\)"):
        read_manifest(manifest)


def test_invalid_utf8_in_a_json_list_names_the_entry(tmp_path):
    (tmp_path / "m.json").write_bytes(b'[{"audio_path": "a.wav", "text": "ok"},\n'
                                      b' {"audio_path": "b.wav", "text": "\xff"}]')
    rows = list(iter_rows(tmp_path / "m.json"))
    assert rows[0].sample and [p.kind for p in rows[1].problems] == ["not_utf8"]
    assert rows[1].where == "entry 1"


def test_line_separator_inside_a_transcript_does_not_split_the_row(tmp_path):
    row = {"audio": {"path": "a.wav"}, "sentence": "one\u2028two\x85three"}
    (tmp_path / "m.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    (sample,) = read_manifest(tmp_path / "m.jsonl")
    assert sample.text == "one\u2028two\x85three"


def test_unparsable_json_list_is_one_problem_row(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"audio_path": "a.wav", "text": "x"},\n {oops}\n]')
    (row,) = list(iter_rows(tmp_path / "bad.json"))
    assert row.where == "" and row.line == 3 and row.problems[0].kind == "invalid_json"


def test_allow_empty_text_reads_no_speech_rows(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": {"path": "a.wav"}, "sentence": "  "}) + "\n"
                                      + json.dumps({"audio": {"path": "b.wav"}, "sentence": "speech"}) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: empty text in 'sentence'"):
        read_manifest(tmp_path / "m.jsonl")
    silence, speech = read_manifest(tmp_path / "m.jsonl", allow_empty_text=True)
    assert silence.text == "" and speech.text == "speech"
    (tmp_path / "d.json").write_text(json.dumps({"a.wav": ""}))
    assert read_manifest(tmp_path / "d.json", allow_empty_text=True)[0].text == ""


def test_symlinked_audio_resolves_like_path_resolve(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.wav").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "b.wav").symlink_to(tmp_path / "real" / "a.wav")
    rows = [{"audio_path": p, "text": "t"} for p in ("link/a.wav", "real/b.wav", "link/../real/a.wav", "missing/x.wav")]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    samples = read_manifest(tmp_path / "m.json")
    assert [s.audio_path for s in samples] == [(tmp_path / r["audio_path"]).resolve() for r in rows]
