import html
import io
import json

import pytest
import srt
import webvtt

from whisper_lora.decode.types import Segment, TranscriptionInfo
from whisper_lora.writers import WRITERS, format_timestamp

SEGMENTS = [Segment(0, 0.0, 2.5, "First line."), Segment(1, 2.5, 3661.257, "Second --> line\n\nwith breaks")]
INFO = TranscriptionInfo("en", 0.98, 3662.0)


def render(fmt: str) -> str:
    out = io.StringIO()
    WRITERS[fmt](SEGMENTS, INFO, "First line. Second line", out)
    return out.getvalue()


def test_format_timestamp():
    assert format_timestamp(3661.257) == "01:01:01.257"
    assert format_timestamp(2.5, decimal_marker=",") == "00:00:02,500"
    assert format_timestamp(59.9996, always_include_hours=False) == "01:00.000"
    with pytest.raises(ValueError):
        format_timestamp(-1)


def test_srt_parses_with_the_srt_library():
    cues = list(srt.parse(render("srt")))
    assert [c.index for c in cues] == [1, 2]
    assert cues[1].end.total_seconds() == pytest.approx(3661.257)
    assert cues[0].content == "First line." and "\n" not in cues[1].content and "-->" not in cues[1].content


def test_vtt_parses_with_webvtt(tmp_path):
    path = tmp_path / "a.vtt"
    path.write_text(render("vtt"))
    cues = webvtt.read(str(path))
    assert [c.start for c in cues] == ["00:00:00.000", "00:00:02.500"]
    assert cues[1].end == "01:01:01.257"


def test_tsv_and_json():
    lines = render("tsv").splitlines()
    assert lines[0] == "start\tend\ttext" and lines[2].split("\t")[:2] == ["2500", "3661257"]
    data = json.loads(render("json"))
    assert data["language"] == "en" and len(data["segments"]) == 2 and data["text"].startswith("First")


def test_tsv_gets_sentiment_columns_only_when_there_is_sentiment():
    from dataclasses import replace

    from whisper_lora.decode.types import Sentiment

    scored = [replace(SEGMENTS[0], sentiment=Sentiment("positive", 0.91)), SEGMENTS[1]]
    out = io.StringIO()
    WRITERS["tsv"](scored, INFO, "text", out)
    header, first, second = out.getvalue().splitlines()
    assert header.split("\t") == ["start", "end", "text", "sentiment", "sentiment_score"]
    assert first.split("\t")[3:] == ["positive", "0.91"] and second.split("\t")[3:] == ["", ""]
    assert render("tsv").splitlines()[0] == "start\tend\ttext"  # unchanged without it


def test_a_diarised_transcript_keeps_its_speakers_in_every_format(tmp_path):
    from whisper_lora.decode.types import Word

    segments = [Segment(0, 0.0, 1.0, "Hi.", words=[Word(0.0, 1.0, " Hi.", 0.9, "A")], speaker="A"),
                Segment(1, 1.0, 2.0, "Hello.", speaker="Dr <Who> & co"), Segment(2, 2.0, 3.0, "Bye.", speaker="Dr <Who> & co")]

    def written(fmt: str) -> str:
        out = io.StringIO()
        WRITERS[fmt](segments, INFO, "Hi. Hello. Bye.", out)
        return out.getvalue()

    assert written("txt").splitlines() == ["A: Hi.", "Dr <Who> & co: Hello. Bye."]  # a line per turn
    assert [c.content for c in srt.parse(written("srt"))] == ["[A] Hi.", "[Dr <Who> & co] Hello.", "[Dr <Who> & co] Bye."]
    (tmp_path / "a.vtt").write_text(written("vtt"))
    cues = webvtt.read(str(tmp_path / "a.vtt"))
    # escaped in the voice span as WebVTT requires (webvtt-py hands the escapes over as written)
    assert [html.unescape(c.voice) for c in cues] == ["A", "Dr <Who> & co", "Dr <Who> & co"] and cues[0].text == "Hi."
    assert written("tsv").splitlines()[:2] == ["start\tend\tspeaker\ttext", "0\t1000\tA\tHi."]
    data = json.loads(written("json"))
    assert [s["speaker"] for s in data["segments"]] == ["A", "Dr <Who> & co", "Dr <Who> & co"]
    assert data["segments"][0]["words"][0]["speaker"] == "A"
    plain = io.StringIO()
    WRITERS["json"](SEGMENTS, INFO, "x", plain)  # not diarised: no speaker fields at all
    assert "speaker" not in plain.getvalue()
