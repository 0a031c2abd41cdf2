"""`whisper-lora prepare`: every source layout, built for real in tmp_path, converted and read back.

Each test writes a small fake tree of the layout (real audio files, real TSV/transcript/subtitle
files, a real `save_to_disk` dataset) and asserts on the manifests as `read_manifest` reads them.
"""
import json

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, write_tone
from whisper_lora.audio import load_audio
from whisper_lora.config import PrepareConfig, build_config
from whisper_lora.errors import ManifestError, UserError
from whisper_lora.manifest import Sample, TimedText, read_manifest
from whisper_lora.sources import (Cue, cut_windows, detect_format, join_words, parse_subtitles, read_aishell,
                                  read_commonvoice, read_folder, read_hf, read_subtitles, write_manifest)
from whisper_lora.stages import prepare

CV_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment"
CV_NEW_HEADER = CV_HEADER.replace("path\tsentence", "path\tsentence_id\tsentence") + "\tvariant\tsentence_domain"


def prepare_run(source, out, **options) -> dict:
    return prepare.run(build_config(PrepareConfig, None, {"source": str(source), "output_dir": str(out), **options}))


# ---- fake trees ----------------------------------------------------------------------------------

def make_commonvoice(root):
    """A Common Voice zh-CN release: 48 kHz MP3 clips, old- and new-style TSVs, one row without its clip."""
    for i, seconds in enumerate([1.0, 1.5, 0.5, 2.0, 1.0]):
        write_tone(root / "clips" / f"common_voice_zh-CN_{i}.mp3", seconds, rate=48000, format="MP3")
    row = "c{i}\tcommon_voice_zh-CN_{i}.mp3\t{text}\t2\t0\t\t\t\tzh-CN\t"
    (root / "train.tsv").write_text("\n".join([
        CV_HEADER,
        row.format(i=0, text='他说"你好"'),
        row.format(i=1, text='"Yes," she said'),  # a leading quote: plain CSV quoting would eat the tab
        row.format(i=9, text="没有这个文件"),  # its clip is missing
    ]) + "\n", encoding="utf-8")
    new_row = "c{i}\tcommon_voice_zh-CN_{i}.mp3\tabc{i}\t{text}\t2\t0\t\t\t\tzh-CN\t\t\t"
    (root / "dev.tsv").write_text(CV_NEW_HEADER + "\n" + new_row.format(i=2, text="第二个") + "\n", encoding="utf-8")
    (root / "test.tsv").write_text(CV_HEADER + "\n" + row.format(i=3, text="第三个") + "\n", encoding="utf-8")
    (root / "validated.tsv").write_text(CV_HEADER + "\n" + row.format(i=4, text="验证") + "\n", encoding="utf-8")
    (root / "invalidated.tsv").write_text(CV_HEADER + "\n", encoding="utf-8")
    return root


def make_aishell(root):
    root = root / "data_aishell"
    write_tone(root / "wav/train/S0002/BAC009S0002W0122.wav", 1.0)
    write_tone(root / "wav/train/S0002/BAC009S0002W0123.wav", 0.5)
    write_tone(root / "wav/train/S0002/BAC009S0002W0124.wav", 0.8)  # no transcript
    write_tone(root / "wav/dev/S0724/BAC009S0724W0121.wav", 1.2)
    write_tone(root / "wav/test/S0764/BAC009S0764W0121.wav", 0.7)
    (root / "transcript").mkdir()
    (root / "transcript/aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n"
        "BAC009S0002W0123 苹果 iphone six 发布\n"
        "BAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
        "BAC009S0764W0121 他 说\n"
        "BAC009S0999W0001 没有 音频 的 文本\n", encoding="utf-8")
    return root.parent


def make_folder(root):
    write_tone(root / "one.wav", 1.0)
    (root / "one.txt").write_text("  hello world \n", encoding="utf-8")
    write_tone(root / "deep/er/two.flac", 0.5, format="FLAC")
    (root / "deep/er/two.txt").write_text("\ufeff第一行\n第二行\n", encoding="utf-8")  # BOM, two lines
    write_tone(root / "deep/three.mp3", 0.8, rate=44100, format="MP3")
    (root / "deep/three.txt").write_text("good\nmorning", encoding="utf-8")
    write_tone(root / "orphan.wav", 0.3)  # no transcript
    (root / "notes.txt").write_text("not a transcript: no audio of this name", encoding="utf-8")
    return root


SRT = """1
00:00:01,000 --> 00:00:04,000
<i>Hello there.</i>

2
00:00:05,000 --> 00:00:12,500
{\\an8}General
Kenobi.

3
00:00:13,000 --> 00:00:29,000
third cue

4
00:00:29,500 --> 00:00:33,000
fourth cue

5
00:00:32,000 --> 00:00:34,000
overlaps the fourth

6
00:00:35,000 --> 00:00:38,000
<font color="red">sixth</font> cue

7
00:00:38,500 --> 00:00:38,500
zero length

8
00:00:39,000 --> 00:00:41,000
runs past the end
"""

VTT = """WEBVTT
Kind: captions

NOTE a comment block
that spans lines

1
00:01.000 --> 00:03.000 align:start position:10%
你好

00:03.500 --> 00:05.000
世界 &amp; <c.yellow>朋友</c>

00:06.000 --> 00:40.000
太长了

00:41.000 --> 00:43.000
再见
"""


def make_subtitles(root):
    write_tone(root / "talk.wav", 40.0)
    (root / "talk.srt").write_text(SRT, encoding="utf-8")
    write_tone(root / "sub/zh.flac", 45.0, format="FLAC")
    (root / "sub/zh.vtt").write_text(VTT, encoding="utf-8")
    write_tone(root / "no_subs.wav", 0.5)
    return root


# ---- the manifest writer -------------------------------------------------------------------------

def test_write_manifest_round_trips_through_read_manifest(tmp_path):
    inside = write_tone(tmp_path / "out/audio/a.wav")
    outside = write_tone(tmp_path / "corpus/b.wav")
    samples = [
        Sample(audio_path=inside, text="今天天气很好", language="zh", duration=1.0),
        Sample(audio_path=outside, text="good morning"),
        Sample(audio_path=outside, text="span", start=0.25, end=0.75, duration=0.5,
               sentences=(TimedText(0.0, 0.25, "sp"), TimedText(0.25, 0.5, "an"))),
    ]
    assert write_manifest(samples, tmp_path / "out/train.jsonl") == 3
    lines = (tmp_path / "out/train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert "今天天气很好" in lines[0]  # ensure_ascii=False: readable, not \u escapes
    assert rows[0]["audio"] == {"path": "audio/a.wav"}  # inside the manifest's folder: relative
    assert rows[1] == {"audio": {"path": str(outside.resolve())}, "sentence": "good morning"}  # only keys set
    assert rows[2]["audio"] == {"path": str(outside.resolve()), "start_time": 0.25, "end_time": 0.75}
    assert read_manifest(tmp_path / "out/train.jsonl") == samples


def test_join_words_drops_spaces_only_next_to_scripts_without_them():
    assert join_words("而 对 楼市".split()) == "而对楼市"
    assert join_words(["苹果", "iphone", "six", "发布"]) == "苹果iphone six发布"
    assert join_words(["Hello there.", " General ", "", "Kenobi."]) == "Hello there. General Kenobi."
    assert join_words(["안녕하세요", "여러분"]) == "안녕하세요 여러분"  # Korean keeps its spaces


# ---- Common Voice --------------------------------------------------------------------------------

def test_commonvoice_default_splits_locale_and_missing_clip(tmp_path):
    source = make_commonvoice(tmp_path / "cv")
    assert detect_format(source) == "commonvoice"
    out = tmp_path / "out"
    summary = prepare_run(source, out)
    assert sorted(summary["splits"]) == ["dev", "test", "train"]  # not validated/invalidated
    assert not (out / "validated.jsonl").exists()
    train = read_manifest(out / "train.jsonl")
    assert [s.text for s in train] == ['他说"你好"', '"Yes," she said']
    assert {s.language for s in train} == {"zh"}  # 'zh-CN' -> 'zh'
    assert train[0].audio_path == (source / "clips/common_voice_zh-CN_0.mp3").resolve()
    assert train[1].duration == pytest.approx(1.5, abs=0.06)
    assert [s.text for s in read_manifest(out / "dev.jsonl")] == ["第二个"]  # newer TSV columns
    assert summary["splits"]["train"]["skipped"] == 1 and summary["skipped"] == 1
    (skipped,) = [json.loads(line) for line in (out / "prepare_skipped.jsonl").read_text().splitlines()]
    assert skipped["split"] == "train" and skipped["where"].endswith("train.tsv:4")
    assert "clip not found: clips/common_voice_zh-CN_9.mp3" in skipped["reason"]
    assert "format: commonvoice" in (out / "config.yaml").read_text()


def test_commonvoice_requested_split_and_language_override(tmp_path):
    source = make_commonvoice(tmp_path / "cv")
    converted = read_commonvoice(source, ["validated"], language="yue")
    assert list(converted.splits) == ["validated"]
    assert [(s.text, s.language) for s in converted.splits["validated"]] == [("验证", "yue")]
    with pytest.raises(UserError, match="split 'other' not found.*available: dev, invalidated, test, train"):
        read_commonvoice(source, ["other"])


def test_commonvoice_bad_tsv_and_unknown_locale(tmp_path):
    source = make_commonvoice(tmp_path / "cv")
    (source / "train.tsv").write_text("client_id\tpath\ttext\tlocale\nc\tcommon_voice_zh-CN_0.mp3\thi\tzh-CN\n")
    with pytest.raises(ManifestError, match=r"train\.tsv: missing column 'sentence' \(columns: client_id, path"):
        read_commonvoice(source)
    (source / "train.tsv").write_text(CV_HEADER + "\nc\tcommon_voice_zh-CN_0.mp3\thi\t1\t0\t\t\t\txx-YY\t\n")
    with pytest.raises(UserError, match=r"train\.tsv:2: locale 'xx-YY' is not a language Whisper knows"):
        read_commonvoice(source)
    assert read_commonvoice(source, language="en").splits["train"][0].language == "en"


# ---- AISHELL-1 -----------------------------------------------------------------------------------

def test_aishell_joins_words_and_skips_untranscribed(tmp_path):
    source = make_aishell(tmp_path / "aishell")  # the folder above data_aishell/ is accepted
    assert detect_format(source) == "aishell"
    out = tmp_path / "out"
    summary = prepare_run(source, out)
    train = read_manifest(out / "train.jsonl")
    assert [s.text for s in train] == ["而对楼市成交抑制作用最大的限购", "苹果iphone six发布"]
    assert all(s.language == "zh" for s in train)
    assert train[0].duration == 1.0 and train[1].duration == 0.5
    assert [s.text for s in read_manifest(out / "dev.jsonl")] == ["甚至出现交易几乎停滞的情况"]
    assert [s.text for s in read_manifest(out / "test.jsonl")] == ["他说"]
    assert summary["skipped"] == 1  # W0124 has no transcript; the transcript without audio is ignored
    assert "no transcript for BAC009S0002W0124" in (out / "prepare_skipped.jsonl").read_text(encoding="utf-8")
    assert list(read_aishell(source, ["dev"]).splits) == ["dev"]


def test_aishell_tarballs_only_asks_to_extract(tmp_path):
    root = tmp_path / "data_aishell"
    (root / "wav").mkdir(parents=True)
    (root / "wav/S0002.tar.gz").write_bytes(b"\x1f\x8b not really")
    (root / "transcript").mkdir()
    (root / "transcript/aishell_transcript_v0.8.txt").write_text("BAC009S0002W0122 而 对\n", encoding="utf-8")
    assert detect_format(root) == "aishell"
    with pytest.raises(UserError, match="wav: holds only per-speaker .tar.gz archives; extract them first"):
        read_aishell(root)


# ---- Hugging Face datasets -----------------------------------------------------------------------

@pytest.fixture
def hf_clips(tmp_path):
    return [write_tone(tmp_path / "clips/a.wav", 1.0, freq=300), write_tone(tmp_path / "clips/b.flac", 0.5, rate=22050,
                                                                         format="FLAC", freq=500),
            write_tone(tmp_path / "clips/c.wav", 0.75, freq=700)]


def test_hf_dataset_dict_audio_extracted_and_decoded_by_our_loader(tmp_path, hf_clips):
    datasets = pytest.importorskip("datasets", reason="pip install 'whisper-lora[hf]'")
    ds = datasets.Dataset.from_dict({"audio": [str(p) for p in hf_clips], "transcription": ["一", "two", "三"],
                                     "locale": ["zh-CN", "en", "zh-TW"]}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": ds.select([0, 1]), "validation": ds.select([2])}).save_to_disk(tmp_path / "hf")
    for clip in hf_clips:
        clip.unlink()  # the audio must come from the dataset's stored bytes
    assert detect_format(tmp_path / "hf") == "hf"
    out = tmp_path / "out"
    summary = prepare_run(tmp_path / "hf", out)  # default --text-column falls back to 'transcription'
    assert sorted(summary["splits"]) == ["train", "validation"]
    train = read_manifest(out / "train.jsonl")
    assert [s.text for s in train] == ["一", "two"] and [s.language for s in train] == ["zh", "en"]
    assert json.loads((out / "train.jsonl").read_text().splitlines()[1])["audio"]["path"] == "audio/train/1.flac"
    assert train[1].duration == 0.5
    decoded = load_audio(train[0].audio_path)
    t = np.arange(16000) / 16000
    assert np.allclose(decoded, 0.3 * np.sin(2 * np.pi * 300 * t), atol=1e-3)  # the 300 Hz clip, bit for bit
    (dev,) = read_manifest(out / "validation.jsonl")
    assert dev.text == "三" and dev.language == "zh" and dev.audio_path == (out / "audio/validation/0.wav").resolve()


def test_hf_single_dataset_columns_and_language(tmp_path, hf_clips):
    datasets = pytest.importorskip("datasets", reason="pip install 'whisper-lora[hf]'")
    ds = datasets.Dataset.from_dict({"speech": [str(p) for p in hf_clips], "words": ["a", None, "c"]})
    ds.cast_column("speech", datasets.Audio()).save_to_disk(tmp_path / "hf")
    with pytest.raises(UserError, match=r"no audio column 'audio' \(columns: speech, words\); pass --audio-column"):
        read_hf(str(tmp_path / "hf"), tmp_path / "out")
    with pytest.raises(UserError, match=r"no text column 'sentence' / 'text' / 'transcription' / 'transcript'"):
        read_hf(str(tmp_path / "hf"), tmp_path / "out", audio_column="speech")
    with pytest.raises(UserError, match=r"no text column 'text' \(columns: speech, words\)"):
        read_hf(str(tmp_path / "hf"), tmp_path / "out", audio_column="speech", text_column="text")
    converted = read_hf(str(tmp_path / "hf"), tmp_path / "out", audio_column="speech", text_column="words",
                        language="mr")
    assert [(s.text, s.language) for s in converted.splits["train"]] == [("a", "mr"), ("c", "mr")]
    assert converted.skipped[0].where.endswith("[train][1]") and "NoneType" in converted.skipped[0].reason


def test_hf_unknown_hub_id_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("prepare", "nobody/no-such-dataset", "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, "whisper-lora: error: nobody/no-such-dataset: ")


# ---- a folder of clips with .txt transcripts -----------------------------------------------------

def test_folder_with_sidecars(tmp_path):
    source = make_folder(tmp_path / "clips")
    assert detect_format(source) == "folder"
    out = tmp_path / "out"
    summary = prepare_run(source, out, language="English")
    samples = read_manifest(out / "train.jsonl")
    by_name = {s.audio_path.name: s for s in samples}
    assert sorted(by_name) == ["one.wav", "three.mp3", "two.flac"]  # recursive; notes.txt is no clip
    assert by_name["one.wav"].text == "hello world"
    assert by_name["two.flac"].text == "第一行第二行"  # BOM gone, CJK lines joined without a space
    assert by_name["three.mp3"].text == "good morning"
    assert {s.language for s in samples} == {"en"}
    assert by_name["two.flac"].duration == 0.5
    assert summary["skipped"] == 1 and "orphan.wav" in (out / "prepare_skipped.jsonl").read_text()


def test_folder_empty_transcript_is_kept_as_empty_text(tmp_path):
    write_tone(tmp_path / "clips/silence.wav", 0.5)
    (tmp_path / "clips/silence.txt").write_text("  \n", encoding="utf-8")
    converted = read_folder(tmp_path / "clips")
    assert [s.text for s in converted.splits["train"]] == [""] and not converted.skipped
    write_manifest(converted.splits["train"], tmp_path / "m.jsonl")
    assert json.loads((tmp_path / "m.jsonl").read_text())["sentence"] == ""


# ---- long recordings with subtitles --------------------------------------------------------------

def test_subtitles_cut_into_windows(tmp_path):
    source = make_subtitles(tmp_path / "rec")
    assert detect_format(source) == "subtitles"
    out = tmp_path / "out"
    summary = prepare_run(source, out)
    samples = read_manifest(out / "train.jsonl")
    talk = [s for s in samples if s.audio_path.name == "talk.wav"]
    assert [(s.start, s.end) for s in talk] == [(1.0, 29.0), (29.5, 33.0), (35.0, 38.0), (39.0, 40.0)]
    assert talk[0].text == "Hello there. General Kenobi. third cue"  # markup stripped, lines joined
    assert talk[0].sentences == (TimedText(0.0, 3.0, "Hello there."), TimedText(4.0, 11.5, "General Kenobi."),
                                 TimedText(12.0, 28.0, "third cue"))  # relative to the window
    assert talk[2].text == "sixth cue" and talk[3].duration == 1.0  # the last cue is cut at the audio's end
    assert all(s.duration == pytest.approx(s.end - s.start) for s in samples)
    assert len(load_audio(talk[1].audio_path, talk[1].start, talk[1].end)) == 3.5 * 16000

    zh = [s for s in samples if s.audio_path.name == "zh.flac"]
    assert [(s.start, s.end, s.text) for s in zh] == [(1.0, 5.0, "你好世界 & 朋友"), (41.0, 43.0, "再见")]
    assert zh[0].sentences[1] == TimedText(2.5, 4.0, "世界 & 朋友")

    reasons = [json.loads(line) for line in (out / "prepare_skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["where"], r["reason"]) for r in reasons] == [
        (f"{source}/no_subs.wav", "no .srt or .vtt subtitles beside it"),
        (f"{source}/sub/zh.vtt: cue 3 (line 14)", "lasts 34.000 s, longer than --max-window 30 s"),
        (f"{source}/talk.srt: cue 5 (line 19)", "starts at 32.000 s, before an earlier cue ends (33.000 s)"),
        (f"{source}/talk.srt: cue 7 (line 27)", "end 38.500 s is not after start 38.500 s"),
    ]
    assert summary["skipped"] == 4


@pytest.mark.parametrize("max_window", [5.0, 12.0, 30.0])
def test_windows_pack_greedily_and_never_cut_a_cue(tmp_path, max_window):
    cues = [Cue(i + 1, i * 4, i * 5.0, i * 5.0 + 4.0, f"w{i}") for i in range(12)]  # 4 s cues every 5 s
    samples, skipped = cut_windows(tmp_path / "a.wav", tmp_path / "a.srt", cues, 60.0, max_window, "en")
    assert not skipped
    assert [t for s in samples for t in s.text.split()] == [c.text for c in cues]  # every cue once, in order
    assert all(s.end - s.start <= max_window for s in samples)
    for before, after in zip(samples, samples[1:]):  # greedy: the next window's first cue did not fit
        assert after.start + 4.0 - before.start > max_window
    assert [s.text for s in samples][:2] == {5.0: ["w0", "w1"], 12.0: ["w0 w1", "w2 w3"],
                                             30.0: ["w0 w1 w2 w3 w4 w5", "w6 w7 w8 w9 w10 w11"]}[max_window]


def test_malformed_subtitles_name_file_cue_and_line(tmp_path):
    bad = tmp_path / "a.srt"
    bad.write_text("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:0x,000 --> 00:00:04,000\nbad\n")
    with pytest.raises(ManifestError, match=r"a\.srt: cue 2 \(line 6\): cannot read timestamp '00:00:0x,000'"):
        parse_subtitles(bad)
    bad.write_text("1\n00:00:01,000 --> 00:00:02,000\nok\n\nstray text\n")
    with pytest.raises(ManifestError, match=r"a\.srt: cue 2 \(line 5\): expected a timing line"):
        parse_subtitles(bad)
    (tmp_path / "b.vtt").write_text("00:01.000 --> 00:02.000\nno header\n")
    with pytest.raises(ManifestError, match=r"b\.vtt: line 1: a WebVTT file must start with 'WEBVTT'"):
        parse_subtitles(tmp_path / "b.vtt")
    cues = parse_subtitles_text(tmp_path, "WEBVTT\n\n01:02:03.5 --> 01:02:04.250\nx\n")
    assert (cues[0].start, cues[0].end) == (3723.5, 3724.25)


def parse_subtitles_text(folder, text):
    (folder / "c.vtt").write_text(text)
    return parse_subtitles(folder / "c.vtt")


def test_read_subtitles_with_max_window(tmp_path):
    source = make_subtitles(tmp_path / "rec")
    talk = [s for s in read_subtitles(source, max_window=10.0).splits["train"] if s.audio_path.name == "talk.wav"]
    # 1-4 + 5-12.5 = 11.5 s > 10: cue 2 opens the next window; cue 3 (16 s) is longer than a window.
    assert [(s.start, s.end) for s in talk][:2] == [(1.0, 4.0), (5.0, 12.5)]


# ---- an existing manifest ------------------------------------------------------------------------

def test_manifest_is_normalised_to_jsonl(tmp_path):
    write_tone(tmp_path / "data/a.wav", 1.25)
    (tmp_path / "data/dev.json").write_text(json.dumps({"a.wav": "你好", "gone.wav": "missing"}), encoding="utf-8")
    assert detect_format(tmp_path / "data/dev.json") == "manifest"
    summary = prepare_run(tmp_path / "data/dev.json", tmp_path / "out", language="zh")
    (sample,) = read_manifest(tmp_path / "out/dev.jsonl")  # the dev manifest stays dev
    assert (sample.text, sample.language, sample.duration) == ("你好", "zh", 1.25)
    assert sample.audio_path == (tmp_path / "data/a.wav").resolve()
    assert summary["skipped"] == 1


# ---- detection and the stage's guards ------------------------------------------------------------

def test_detect_format_refuses_what_it_cannot_recognise(tmp_path):
    write_tone(tmp_path / "mixed/a.wav")
    (tmp_path / "mixed/a.txt").write_text("a")
    write_tone(tmp_path / "mixed/b.wav")
    (tmp_path / "mixed/b.srt").write_text("")
    with pytest.raises(UserError, match="pass --format folder or --format subtitles"):
        detect_format(tmp_path / "mixed")
    write_tone(tmp_path / "bare/a.wav")
    with pytest.raises(UserError, match=r"bare: cannot recognise the layout \(1 audio files"):
        detect_format(tmp_path / "bare")
    with pytest.raises(UserError, match="source not found"):
        detect_format(tmp_path / "no/such/folder")
    assert detect_format("openslr/librispeech_asr") == "hf"


def test_explicit_format_picks_one_kind_of_sidecar(tmp_path):
    write_tone(tmp_path / "mixed/a.wav")
    (tmp_path / "mixed/a.txt").write_text("typed transcript")
    write_tone(tmp_path / "mixed/b.wav", 3.0)
    (tmp_path / "mixed/b.srt").write_text("1\n00:00:00,500 --> 00:00:02,000\nsubtitled\n")
    folder = prepare_run(tmp_path / "mixed", tmp_path / "folder", format="folder")
    assert [s.text for s in read_manifest(tmp_path / "folder/train.jsonl")] == ["typed transcript"]
    assert folder["skipped"] == 1 and folder["splits"]["train"]["seconds"] == 1.0
    prepare_run(tmp_path / "mixed", tmp_path / "subs", format="subtitles")
    (window,) = read_manifest(tmp_path / "subs/train.jsonl")
    assert (window.text, window.start, window.end) == ("subtitled", 0.5, 2.0)
    pytest.importorskip("datasets", reason="pip install 'whisper-lora[hf]'")
    with pytest.raises(UserError, match="mixed: not a dataset written by save_to_disk"):
        prepare_run(tmp_path / "mixed", tmp_path / "hf", format="hf")


def test_output_dir_guards(tmp_path):
    source = make_folder(tmp_path / "clips")
    with pytest.raises(UserError, match="output folder is, or contains, the source"):
        prepare_run(source, tmp_path, overwrite=True)
    with pytest.raises(UserError, match="--splits applies to Common Voice, AISHELL and Hugging Face"):
        prepare_run(source, tmp_path / "out", splits=["train"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("x")
    with pytest.raises(UserError, match="output folder is not empty; pass --overwrite"):
        prepare_run(source, tmp_path / "out")
    assert prepare_run(source, tmp_path / "out", overwrite=True)["rows"] == 3
    assert not (tmp_path / "out/keep.txt").exists()
    write_tone(tmp_path / "bare/a.wav")
    (tmp_path / "bare/a.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match=r"no usable rows found as folder \(1 skipped; first: .*not valid UTF-8"):
        prepare_run(tmp_path / "bare", tmp_path / "out2")


# ---- the CLI, end to end -------------------------------------------------------------------------

def test_cli_prepare_commonvoice(tmp_path):
    source = make_commonvoice(tmp_path / "cv")
    result = run_cli("prepare", str(source), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| split | rows | hours | skipped |" in result.stdout
    assert "| train | 2    | 0.00  | 1       |" in result.stdout
    assert "clip not found: clips/common_voice_zh-CN_9.mp3" in result.stdout
    assert [s.text for s in read_manifest(tmp_path / "out/test.jsonl")] == ["第三个"]


def test_cli_missing_tsv_column(tmp_path):
    source = make_commonvoice(tmp_path / "cv")
    (source / "dev.tsv").write_text("client_id\tsentence\tlocale\nc\thi\tzh-CN\n")
    result = run_cli("prepare", str(source), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, f"whisper-lora: error: {source / 'dev.tsv'}: missing column 'path'")


def test_cli_malformed_srt(tmp_path):
    write_tone(tmp_path / "rec/talk.wav", 3.0)
    (tmp_path / "rec/talk.srt").write_text("1\n00:00:01,000 --> 00:00:02\nhello\n")
    result = run_cli("prepare", str(tmp_path / "rec"), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, f"whisper-lora: error: {tmp_path / 'rec/talk.srt'}: cue 1 (line 2): "
                                  "cannot read timestamp '00:00:02'")


def test_prepare_writes_streamable_shards_and_a_feature_cache(tmp_path, tiny_model_dir):
    """`prepare --shards --cache-features` output is what `train` reads: a shard index and a cache."""
    from whisper_lora.config import PrepareConfig, build_config
    from whisper_lora.features import FeatureCache
    from whisper_lora.shards import read_index
    from whisper_lora.stages import prepare

    folder = tmp_path / "clips"
    for i in range(5):
        write_tone(folder / f"c{i}.wav", seconds=1.0 + i * 0.2, freq=300 + 50 * i)
        (folder / f"c{i}.txt").write_text(f"clip {i}", encoding="utf-8")
    config = build_config(PrepareConfig, overrides={"source": str(folder), "output_dir": str(tmp_path / "out"),
                                                    "shards": True, "shard_size": 2, "cache_features": True,
                                                    "model": str(tiny_model_dir)})
    summary = prepare.run(config)
    index = read_index(tmp_path / "out" / "shards" / "train")
    assert index["samples"] == 5 and [s["samples"] for s in index["shards"]] == [2, 2, 1]
    assert summary["splits"]["train"]["features"]["clips"] == 5
    cache = FeatureCache(tmp_path / "out" / "features" / "train")
    from whisper_lora.manifest import read_manifest
    for sample in read_manifest(tmp_path / "out" / "train.jsonl"):
        assert sample.id in cache
