"""`whisper-lora check`: every problem kind found in real files, --fix, leakage, label parity, the CLI."""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import DEMO, assert_one_line_error, run_cli, write_tone
from whisper_lora.config import CheckConfig, build_config
from whisper_lora.doctor import label_lengths, probe_audio
from whisper_lora.errors import UserError
from whisper_lora.manifest import Sample, TimedText, iter_rows, read_manifest
from whisper_lora.stages import check


def row(path, text="some words", language="en", **extra):
    audio = {"path": path, **{k: extra.pop(k) for k in ("start_time", "end_time") if k in extra}}
    out = {"audio": audio, "sentence": text, **extra}
    if language:
        out["language"] = language
    return json.dumps(out, ensure_ascii=False).encode()


# What each line of the zoo manifest is there to show: {line: kind} (None = a good row).
ZOO_KINDS = {
    1: None, 2: "missing_audio", 3: "empty_audio", 4: "undecodable_audio", 5: "non_finite_audio",
    6: "bad_sample_rate", 7: "too_long", 8: "too_short", 9: "empty_text", 10: "label_too_long", 11: None,
    12: "duplicate", 13: "conflicting_text", 14: "duration_mismatch", 15: "unknown_language", 16: "no_language",
    17: "bad_timestamps", 18: "bad_timestamps", 19: "bad_span", 20: "not_utf8", 21: "invalid_json",
    22: "no_audio_path", 23: "empty_audio",
}
ZOO_WARNINGS = {"too_short", "duplicate", "conflicting_text", "duration_mismatch"}


@pytest.fixture
def zoo(tmp_path) -> Path:
    """A manifest with one row per problem (each file a different tone, so none is a copy of another)."""
    folder = tmp_path / "zoo"
    clips = folder / "clips"
    freq = iter(range(200, 4000, 97))
    for name, seconds in (("good.wav", 1.0), ("long.wav", 40.0), ("short.wav", 0.05), ("blank.wav", 1.0),
                          ("words.wav", 2.0), ("dup.wav", 1.0), ("lang.wav", 1.0), ("nolang.wav", 1.0),
                          ("ts.wav", 2.0), ("ts2.wav", 2.0), ("span.wav", 1.0), ("span2.wav", 1.0),
                          ("utf8.wav", 1.0)):
        write_tone(clips / name, seconds, freq=next(freq))
    write_tone(clips / "decl.flac", 2.0, freq=next(freq))
    (clips / "empty.wav").write_bytes(b"")
    (clips / "text.wav").write_text("this is a text file, not audio\n")
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    sf.write(clips / "nan.wav", nan, 16000, subtype="FLOAT")
    header = bytearray((clips / "good.wav").read_bytes())
    header[24:28] = struct.pack("<I", 4_000_000_000)  # the fmt chunk's sample rate
    (clips / "rate.wav").write_bytes(bytes(header))
    lines = [
        row("clips/good.wav", "Good one", duration=1.0),
        row("clips/missing.wav"),
        row("clips/empty.wav"),
        row("clips/text.wav"),
        row("clips/nan.wav"),
        row("clips/rate.wav"),
        row("clips/long.wav"),
        row("clips/short.wav"),
        row("clips/blank.wav", ""),
        row("clips/words.wav", "x " * 500),
        row("clips/dup.wav", "same text"),
        row("clips/dup.wav", "same text"),
        row("clips/dup.wav", "other text"),
        row("clips/decl.flac", duration=5.0),
        row("clips/lang.wav", language="klingon"),
        row("clips/nolang.wav", language=None),
        row("clips/ts.wav", sentences=[{"start": 0, "end": 1, "text": "a"}, {"start": 0.5, "end": 1.5, "text": "b"}]),
        row("clips/ts2.wav", sentences=[{"start": 0, "end": 5, "text": "a"}]),
        row("clips/span.wav", start_time=1.5, end_time=0.5),
        b'{"audio": {"path": "clips/utf8.wav"}, "sentence": "caf\xe9", "language": "en"}',
        b'{"audio": {"path": "clips/good.wav"}, "sentence": ',
        json.dumps({"sentence": "where is the audio", "language": "en"}).encode(),
        row("clips/span2.wav", start_time=3.0, end_time=4.0),
    ]
    (folder / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "train.jsonl"


def run_check(tmp_path, model_dir, manifest, capsys=None, **options) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    values = dict(manifest=str(manifest), model=str(model_dir), workers=1, report=str(report), examples=3)
    values.update(options)
    code = check.run(build_config(CheckConfig, overrides=values))
    return code, json.loads(report.read_text(encoding="utf-8"))


def kinds_by_line(report, manifest_name="train.jsonl") -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for f in report["findings"]:
        if Path(f["manifest"]).name == manifest_name:
            found.setdefault(int(f["where"].removeprefix("line ")), set()).add(f["kind"])
    return found


def test_every_problem_kind_is_found_with_count_and_example(zoo, tmp_path, base_model_dir, capsys):
    code, report = run_check(tmp_path, base_model_dir, zoo)
    assert code == 1 and report["exit_code"] == 1
    expected = {line: {kind} for line, kind in ZOO_KINDS.items() if kind}
    expected[1] = set()
    found = kinds_by_line(report)
    assert {line: found.get(line, set()) for line in expected} == expected
    assert not set(found) - set(expected)

    problems = {p["kind"]: p for p in report["problems"]}
    assert problems["empty_audio"]["count"] == 2 and problems["bad_timestamps"]["count"] == 2
    assert all(p["count"] == 1 for k, p in problems.items() if k not in ("empty_audio", "bad_timestamps"))
    assert {k for k, p in problems.items() if p["severity"] == "warning"} == ZOO_WARNINGS
    missing = problems["missing_audio"]["examples"][0]
    assert missing["where"] == "line 2" and missing["audio"] == str(zoo.parent / "clips" / "missing.wav")
    assert problems["bad_sample_rate"]["examples"][0]["message"] == "implausible sample rate 4000000000 Hz in header"
    assert "40.00 s (from the header)" in problems["too_long"]["examples"][0]["message"]
    assert "0.050 s (decoded)" in problems["too_short"]["examples"][0]["message"]
    assert "label has 506 tokens" in problems["label_too_long"]["examples"][0]["message"]
    assert "byte 54 of the line" in problems["not_utf8"]["examples"][0]["message"]
    assert "same audio, span and text as line 11" == problems["duplicate"]["examples"][0]["message"]
    assert {e["message"].split(",")[0] for e in problems["bad_timestamps"]["examples"]} == {
        "sentences[1] starts at 0.5 s", "sentences[0] ends at 5.0 s"}
    assert report["manifests"][0]["rows"] == 23 and report["manifests"][0]["rows_with_errors"] == 17

    out = capsys.readouterr().out
    assert "| audio file missing" in out and "| error" in out and "train.jsonl:line 2" in out
    assert "train.jsonl: 23 rows, 17 with errors" in out and "check failed: 17 errors remain" in out


def test_no_audio_checks_presence_and_rows_only(zoo, tmp_path, base_model_dir):
    code, report = run_check(tmp_path, base_model_dir, zoo, audio=False)
    assert code == 1
    # Without decoding: 0-byte and missing files, impossible spans, and everything about rows and text.
    expected = {2: {"missing_audio"}, 3: {"empty_audio"}, 9: {"empty_text"}, 10: {"label_too_long"},
                12: {"duplicate"}, 13: {"conflicting_text"}, 15: {"unknown_language"}, 16: {"no_language"},
                17: {"bad_timestamps"}, 19: {"bad_span"}, 20: {"not_utf8"}, 21: {"invalid_json"},
                22: {"no_audio_path"}}
    assert kinds_by_line(report) == expected


def test_parallel_workers_find_the_same(zoo, tmp_path, base_model_dir):
    _, inline = run_check(tmp_path, base_model_dir, zoo, workers=1)
    _, pooled = run_check(tmp_path, base_model_dir, zoo, workers=2)
    assert kinds_by_line(pooled) == kinds_by_line(inline)


def test_long_recording_is_judged_from_its_header(tmp_path):
    path = write_tone(tmp_path / "long.flac", 40.0)
    whole = probe_audio((str(path), None, None), max_seconds=30.0)
    assert (whole.seconds, whole.decoded, whole.problem) == (40.0, False, None)  # never decoded
    span = probe_audio((str(path), 10.0, 12.5), max_seconds=30.0)
    assert span.decoded and span.seconds == pytest.approx(2.5) and span.digest


def test_clean_manifest_passes(tiny_corpus, tmp_path, base_model_dir, capsys):
    code, report = run_check(tmp_path, base_model_dir, tiny_corpus / "train.jsonl", dev=str(tiny_corpus / "dev.jsonl"))
    assert code == 0 and report["findings"] == []
    assert "no problems found" in capsys.readouterr().out


def test_fix_writes_a_clean_manifest_that_passes_and_lists_rejects(zoo, tmp_path, base_model_dir):
    out = tmp_path / "elsewhere" / "clean.jsonl"  # another folder: audio paths must be rewritten
    code, report = run_check(tmp_path, base_model_dir, zoo, fix=True, fix_output=str(out))
    assert code == 0 and report["fix"]["kept"] == 6 and report["fix"]["rejected"] == 17
    rejects_file = out.parent / "train.rejects.jsonl"
    rejects = [json.loads(line) for line in rejects_file.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["line"] for r in rejects) == sorted(
        line for line, kind in ZOO_KINDS.items() if kind and kind not in ZOO_WARNINGS)
    by_line = {r["line"]: r for r in rejects}
    assert by_line[2]["row"]["audio"]["path"] == "clips/missing.wav"
    assert by_line[2]["reasons"] == [{"problem": "missing_audio", "severity": "error",
                                      "message": "audio file not found"}]
    assert by_line[21]["row"].startswith('{"audio"')  # an unparsable line is kept as its text

    clean_rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert clean_rows[0] == {"audio": {"path": "../zoo/clips/good.wav"}, "sentence": "Good one", "language": "en",
                             "duration": 1.0}  # every field kept
    kept = [r for r in iter_rows(zoo) if r.line not in by_line]
    assert [s.audio_path for s in read_manifest(out)] == [r.audio_path for r in kept]  # the same files

    recheck_code, recheck = run_check(tmp_path, base_model_dir, out)
    assert recheck_code == 0
    assert {f["kind"] for f in recheck["findings"]} <= ZOO_WARNINGS


def test_fix_never_overwrites_the_manifest(zoo, tmp_path, base_model_dir):
    with pytest.raises(UserError, match="would overwrite the manifest"):
        run_check(tmp_path, base_model_dir, zoo, fix=True, fix_output=str(zoo))


def test_fix_of_a_json_dict_writes_json_lines(tmp_path, base_model_dir):
    write_tone(tmp_path / "data" / "a.wav", 1.0)
    (tmp_path / "data" / "m.json").write_text(json.dumps({"a.wav": "hello", "gone.wav": "bye"}))
    code, report = run_check(tmp_path, base_model_dir, tmp_path / "data" / "m.json", language="en", fix=True)
    assert code == 0 and report["fix"]["rejected"] == 1
    clean = tmp_path / "data" / "m.clean.jsonl"
    assert json.loads(clean.read_text()) == {"audio": {"path": "a.wav"}, "sentence": "hello"}
    rejected = json.loads((tmp_path / "data" / "m.rejects.jsonl").read_text())
    assert rejected["where"] == "entry 'gone.wav'" and rejected["row"] == {"gone.wav": "bye"}


def test_empty_text_is_a_no_speech_sample_with_timestamps(tmp_path, base_model_dir):
    write_tone(tmp_path / "silence.wav", 1.0)
    manifest = tmp_path / "train.jsonl"
    manifest.write_bytes(row("silence.wav", "") + b"\n")
    code, report = run_check(tmp_path, base_model_dir, manifest)
    assert code == 1 and [f["kind"] for f in report["findings"]] == ["empty_text"]
    code, report = run_check(tmp_path, base_model_dir, manifest, timestamps=True)
    assert code == 0 and [(f["kind"], f["severity"]) for f in report["findings"]] == [("no_speech", "info")]


def test_bad_timestamps_are_warnings_when_no_timestamp_is_trained(zoo, tmp_path, base_model_dir):
    _, report = run_check(tmp_path, base_model_dir, zoo, timestamp_fraction=0.0)
    assert {f["severity"] for f in report["findings"] if f["kind"] == "bad_timestamps"} == {"warning"}


def test_leakage_by_text_and_by_audio_content(tmp_path, base_model_dir):
    write_tone(tmp_path / "train" / "a.wav", 1.0, freq=300, subtype="PCM_16")
    write_tone(tmp_path / "train" / "b.wav", 1.0, freq=500)
    write_tone(tmp_path / "train" / "c.wav", 1.0, freq=700, subtype="PCM_16")
    write_tone(tmp_path / "dev" / "x.wav", 1.0, freq=900)
    shutil.copy(tmp_path / "train" / "a.wav", tmp_path / "dev" / "a_copy.wav")  # same bytes, another name
    data, rate = sf.read(tmp_path / "train" / "c.wav", dtype="int16")
    sf.write(tmp_path / "dev" / "c.flac", data, rate, subtype="PCM_16")  # same samples, other bytes
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([
        row("train/a.wav", "first clip"), row("train/b.wav", "Hello,  World!"), row("train/c.wav", "third clip")]))
    (tmp_path / "dev.jsonl").write_bytes(b"\n".join([
        row("dev/a_copy.wav", "something else"), row("dev/x.wav", "hello world"), row("dev/c.flac", "more")]))

    _, decoded = run_check(tmp_path, base_model_dir, tmp_path / "train.jsonl", dev=str(tmp_path / "dev.jsonl"))
    leaks = {(f["kind"], f["where"]) for f in decoded["findings"]}
    assert leaks == {("leak_audio", "line 1"), ("leak_text", "line 2"), ("leak_audio", "line 3")}
    assert decoded["exit_code"] == 0  # leakage warns; it does not fail the check

    _, bytes_only = run_check(tmp_path, base_model_dir, tmp_path / "train.jsonl", dev=str(tmp_path / "dev.jsonl"),
                              audio=False)
    # --no-audio compares file bytes: the FLAC re-encoding is no longer recognised.
    assert {(f["kind"], f["where"]) for f in bytes_only["findings"]} == {("leak_audio", "line 1"),
                                                                         ("leak_text", "line 2")}


def test_label_lengths_equal_label_builder_longest(base_model_dir):
    from transformers import GenerationConfig, WhisperTokenizer

    from whisper_lora.data import LabelBuilder

    tokenizer = WhisperTokenizer.from_pretrained(base_model_dir)
    generation = GenerationConfig.from_pretrained(base_model_dir)
    texts = [json.loads(line)["sentence"] for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    audio = Path("a.wav")
    samples = [Sample(audio, t, "zh") for t in texts[:200]] + [
        Sample(audio, "The quick brown fox, seven times; it's 7 o'clock!", "en"),
        Sample(audio, "Ünïcödé and emoji 😀 and <|en|> a special token", None),
        Sample(audio, "word " * 600, "en"),
        Sample(audio, "", "en"),
        Sample(audio, "", "en", sentences=(TimedText(0.0, 1.0, "first"), TimedText(1.0, 2.5, "第二句"))),
        Sample(audio, "两句话", "zh", sentences=(TimedText(0.0, 1.0, "两句"), TimedText(1.0, 2.0, "话"))),
        Sample(audio, "no language here", None),
    ]
    for timestamps, fraction, language in ((False, 0.0, None), (False, 0.2, "en"), (True, 0.0, None)):
        builder = LabelBuilder(tokenizer, generation, language, "transcribe", timestamps=timestamps,
                               timestamp_fraction=fraction)
        expected = []
        for sample in samples:
            try:
                expected.append(builder.longest(sample))
            except UserError as exc:
                expected.append(str(exc))
        got = [str(n) if isinstance(n, UserError) else n for n in label_lengths(builder, samples)]
        assert got == expected, (timestamps, fraction, language)
        assert max(n for n in got if isinstance(n, int)) > 448


def test_two_thousand_rows_without_decoding(tmp_path, base_model_dir):
    """The --no-audio path at some scale (the 100k-row timing lives in bench/check_bench.py)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2000):
        path = tmp_path / "clips" / f"{i % 20:02d}" / f"{i:04d}.wav"
        if i % 500 != 7:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(int(rng.integers(100, 4000))))
        lines.append(row(f"clips/{i % 20:02d}/{i:04d}.wav", f"sentence number {i}", duration=float(1 + i % 9)))
    lines.append(lines[10])  # one duplicate
    (tmp_path / "big.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, report = run_check(tmp_path, base_model_dir, tmp_path / "big.jsonl", audio=False)
    assert code == 1
    counts = {p["kind"]: p["count"] for p in report["problems"]}
    assert counts == {"missing_audio": 4, "duplicate": 1}
    assert report["manifests"][0]["rows"] == 2001


def test_cli_exit_codes_and_one_line_errors(zoo, tiny_corpus, tmp_path, base_model_dir):
    bad = run_cli("check", str(zoo), "--model", str(base_model_dir), "--workers", "2", "--examples", "1")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "| audio file missing" in bad.stdout and "check failed" in bad.stdout

    fixed = run_cli("check", str(zoo), "--model", str(base_model_dir), "--no-audio", "--fix")
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]
    clean = zoo.with_name("train.clean.jsonl")
    assert clean.is_file() and zoo.with_name("train.rejects.jsonl").is_file()

    good = run_cli("check", str(tiny_corpus / "train.jsonl"), "--dev", str(tiny_corpus / "dev.jsonl"),
                   "--model", str(base_model_dir))
    assert good.returncode == 0 and "check passed" in good.stdout, good.stderr[-2000:]

    for args, fragment in (((str(tmp_path / "none.jsonl"),), "none.jsonl: manifest not found"),
                           ((str(zoo), "--workers", "-1"), "--workers must be >= 0"),
                           ((str(zoo), "--language", "klingon"), "unknown language 'klingon'")):
        assert_one_line_error(run_cli("check", *args, "--model", str(base_model_dir)), fragment)


def test_fix_cleans_the_manifest_but_dev_errors_still_fail(tmp_path, base_model_dir, capsys):
    write_tone(tmp_path / "a.wav", 1.0)
    (tmp_path / "train.jsonl").write_bytes(row("a.wav", "kept") + b"\n" + row("gone.wav", "dropped") + b"\n")
    (tmp_path / "dev.jsonl").write_bytes(row("also_gone.wav", "dev row") + b"\n")
    code, report = run_check(tmp_path, base_model_dir, tmp_path / "train.jsonl", dev=str(tmp_path / "dev.jsonl"),
                             fix=True)
    assert code == 1 and report["fix"]["kept"] == 1
    assert "check failed: 1 error remains in dev.jsonl (--fix cleans MANIFEST only)" in capsys.readouterr().out
