"""Transcripts -> files: txt, json, srt, vtt, tsv (the formats openai/whisper's CLI writes).

Pure functions over `Segment`s, so every front end (CLI, server, UI) writes identical files. A diarised
transcript (segments with a `speaker`) keeps its speakers in every format: TXT one line per turn
(`A: ...`), SRT cues opening with `[A]`, VTT voice spans (`<v A>`), a TSV column, JSON fields.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Callable, TextIO

from .decode.types import Segment, TranscriptionInfo, join_text

FORMATS = ("txt", "json", "srt", "vtt", "tsv")


def format_timestamp(seconds: float, always_include_hours: bool = True, decimal_marker: str = ".") -> str:
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds}")
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in SRT/VTT and "-->" starts a timing line: neither may appear in the text.
    return " ".join(text.replace("-->", "->").split())


def diarised(segments: list[Segment]) -> bool:
    return any(s.speaker is not None for s in segments)


def speaker_turns(segments: list[Segment]) -> list[tuple[str | None, list[Segment]]]:
    """Consecutive segments of one speaker, together."""
    turns: list[tuple[str | None, list[Segment]]] = []
    for segment in segments:
        if turns and turns[-1][0] == segment.speaker:
            turns[-1][1].append(segment)
        else:
            turns.append((segment.speaker, [segment]))
    return turns


def write_txt(segments: list[Segment], info: TranscriptionInfo, text: str, out: TextIO) -> None:
    if not diarised(segments):
        out.write(text + "\n")
        return
    for speaker, turn in speaker_turns(segments):
        out.write(f"{speaker}: {join_text(turn, info.language)}\n")


_ASKED_FOR = ("sentiment", "sentiment_note", "speaker")  # fields that appear only when they were asked for
_SERVED_ONLY = ("token_logprobs",)  # the API's include[]=logprobs; a token list per segment would bloat files


def _dict(item) -> dict:
    fields = {k: v for k, v in asdict(item).items() if not (k in _ASKED_FOR and v is None) and k not in _SERVED_ONLY}
    if fields.get("words"):
        fields["words"] = [{k: v for k, v in w.items() if not (k == "speaker" and v is None)} for w in fields["words"]]
    return fields


def transcript_dict(segments: list[Segment], info: TranscriptionInfo, text: str) -> dict:
    """The JSON form of a transcript: text, info (language, duration, sentiment), segments."""
    return {"text": text, **_dict(info), "segments": [_dict(s) for s in segments]}


def write_json(segments: list[Segment], info: TranscriptionInfo, text: str, out: TextIO) -> None:
    json.dump(transcript_dict(segments, info, text), out, ensure_ascii=False, indent=2)
    out.write("\n")


def write_srt(segments: list[Segment], info: TranscriptionInfo, text: str, out: TextIO) -> None:
    for number, segment in enumerate(segments, start=1):
        said = _cue_text(segment.text) if segment.speaker is None else f"[{segment.speaker}] {_cue_text(segment.text)}"
        out.write(f"{number}\n{format_timestamp(segment.start, decimal_marker=',')} --> "
                  f"{format_timestamp(segment.end, decimal_marker=',')}\n{said}\n\n")


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_vtt(segments: list[Segment], info: TranscriptionInfo, text: str, out: TextIO) -> None:
    out.write("WEBVTT\n\n")
    for segment in segments:
        said = _cue_text(segment.text)
        if segment.speaker is not None:  # WebVTT's voice span: players show or style the speaker's name
            said = f"<v {_vtt_escape(segment.speaker)}>{_vtt_escape(said)}</v>"
        out.write(f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}\n{said}\n\n")


def write_tsv(segments: list[Segment], info: TranscriptionInfo, text: str, out: TextIO) -> None:
    scored, speakers = any(s.sentiment is not None for s in segments), diarised(segments)
    out.write("start\tend\t" + ("speaker\t" if speakers else "") + "text"
              + ("\tsentiment\tsentiment_score" if scored else "") + "\n")
    for segment in segments:  # times in integer milliseconds, as openai/whisper writes them
        row = f"{round(segment.start * 1000)}\t{round(segment.end * 1000)}\t" \
              + (f"{_cue_text(segment.speaker or '')}\t" if speakers else "") + _cue_text(segment.text)
        if scored:
            row += f"\t{segment.sentiment.label}\t{segment.sentiment.score}" if segment.sentiment else "\t\t"
        out.write(row + "\n")


WRITERS: dict[str, Callable[[list[Segment], TranscriptionInfo, str, TextIO], None]] = {
    "txt": write_txt, "json": write_json, "srt": write_srt, "vtt": write_vtt, "tsv": write_tsv}
