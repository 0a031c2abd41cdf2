"""AlignAtt (decode/alignatt.py): the commit rule, the held-back word and the rewind guard on scripted
attention, then on the real model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SPEECH_EN
from whisper_lora.audio import load_audio
from whisper_lora.decode import DecodeOptions, TransformersBackend
from whisper_lora.decode import alignatt
from whisper_lora.decode.alignatt import (FRONTIER_POSITIONS, REWIND_POSITIONS, attended_position, commit_rule,
                                         repetition_start)
from whisper_lora.models import load_model


def test_tokens_stand_until_the_attention_reaches_the_frontier_and_the_token_that_led_there_goes():
    content = 200  # 4 s of audio heard
    frontier = content - FRONTIER_POSITIONS
    assert commit_rule([10, 30, 60, 90], content, False, 0) == (4, None)  # still short of it: all stand so far
    # the row after token 3 attends at the frontier: tokens 0-2 stand, token 3 (which led there) goes
    assert commit_rule([10, 30, 60, 90, frontier], content, False, 0) == (3, "frontier")
    assert commit_rule([frontier + 5], content, False, 0) == (0, "frontier")  # nothing new is safe yet
    # past the audio, into the padding, is past the frontier too
    assert commit_rule([10, 30, 1499], content, False, 0) == (1, "frontier")
    # once the audio has ended nothing more is coming: no frontier, the decode runs to its end of text (the
    # rows predicting the full stop and the end of text attend to the encoder's last positions)
    assert commit_rule([10, 30, 60, 90, 1499], content, True, 0) == (5, None)


def test_a_repetition_loop_is_cut_after_its_first_copy():
    assert repetition_start([5, 6, 7, 8, 9]) is None
    assert repetition_start([5, 1, 2, 1, 2, 1, 2]) == 3  # "1 2" three times: keep one copy
    assert repetition_start([5, 6, 9, 9, 9]) == 3
    assert repetition_start([1, 2, 1, 2, 3]) is None  # twice is speech ("eight five, eight five")


def test_a_jump_back_drops_everything_the_decode_wrote():
    assert commit_rule([100, 120, 140, 140 - REWIND_POSITIONS - 1], 600, False, 0)[1] == "rewind"
    assert commit_rule([100, 120, 140, 140 - REWIND_POSITIONS + 10], 600, False, 0) == (4, None)  # a small one is fine
    # measured from where the committed text ended, too
    assert commit_rule([300 - REWIND_POSITIONS - 1], 600, False, 300) == (0, "rewind")


def test_the_attended_position_is_where_the_alignment_heads_agree():
    torch.manual_seed(0)
    attention = torch.rand(3, 6, 300) * 0.01
    attention[:, -1, 147:154] += torch.tensor([0.2, 0.5, 0.8, 1.0, 0.8, 0.5, 0.2])  # every head around 150
    attention[0, -1, 40] += 3.0  # one head elsewhere, for one position only: the median filter removes it
    assert attended_position(attention) == 150


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return TransformersBackend(*load_model(str(tiny_model_dir)), device="cpu")


def scripted(monkeypatch, positions: list[int]):
    """Attention that points where the script says, one position per row, whatever the (random) model does
    (whose text repeats itself: the loop guard, tested above, is off here)."""
    script = iter(positions)
    monkeypatch.setattr(alignatt, "attended_position", lambda attention: next(script))
    monkeypatch.setattr(alignatt, "repetition_start", lambda tokens: None)


def decode(tiny, final: bool, seconds: float = 4.0, prefix: str | None = None, start: float = 0.0):
    audio = (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    options = DecodeOptions(max_new_tokens=8, prefix=prefix)
    return tiny.stream_step(audio, "en", options, final, start)


def test_the_last_word_is_held_back_until_the_audio_ends(tiny, monkeypatch):
    steps = [10, 20, 30, 40, 50, 60, 70, 80, 90]  # never near the frontier of 4 s (200 positions)
    scripted(monkeypatch, steps)
    committed, held, stop = decode(tiny, final=False)
    assert stop == "limit" and committed and len(held) == 1  # all but the last word
    words = [w.word for w in committed + held]
    scripted(monkeypatch, steps)
    committed, held, stop = decode(tiny, final=True)
    assert [w.word for w in committed] == words and held == []  # the same decode, every word committed
    # word times come from the attention: a word starts where its first token was heard
    assert committed[0].start == pytest.approx(0.2) and all(a.end <= b.start + 1e-9 for a, b in zip(committed, committed[1:]))


def test_the_frontier_stops_the_decode_and_a_rewind_commits_nothing(tiny, monkeypatch):
    scripted(monkeypatch, [10, 40, 80, 190, 195])
    committed, held, stop = decode(tiny, final=False)
    assert stop == "frontier"
    # three tokens were written; the row after token 2 reached the frontier, so tokens 0-1 stood, and of
    # their words the last is held back: at most one word is committed, the rest is partial text
    assert len(committed) <= 1 and held
    scripted(monkeypatch, [300, 320, 10])  # back by 310 positions (6.2 s) after two tokens
    committed, held, stop = decode(tiny, final=False, seconds=10.0)
    assert stop == "rewind" and committed == []


@pytest.fixture(scope="module")
def base(base_model_dir):
    return TransformersBackend(*load_model(str(base_model_dir)), device="cpu")


def test_a_growing_buffer_commits_a_prefix_of_what_the_whole_clip_reads(base):
    """whisper-base on a real clip, cut at 1.5, 2.5 and 3.5 s: each decode commits words the full clip's
    decode also reads, in order, more as more audio arrives, and the end of the audio commits the rest."""
    clip = load_audio(SPEECH_EN / "arctic_a0009.wav")
    options = DecodeOptions(max_new_tokens=40, audio_ctx="auto")
    final, _, stop = base.stream_step(clip, "en", options, True)
    whole = [w.word for w in final]
    assert stop == "end" and "".join(whole).strip().startswith("He turned sharply")
    # the full stop's row attends into the encoder's padding (auto: 10 s here); its time stays in the audio
    assert final[-1].word.strip() == "." and 0 < final[-1].end <= len(clip) / 16000
    counts = []
    for seconds in (1.5, 2.5, 3.0):
        committed, held, _ = base.stream_step(clip[: int(seconds * 16000)], "en", options, False)
        assert [w.word for w in committed] == whole[: len(committed)]
        assert all(w.end <= seconds for w in committed)  # nothing committed past the audio heard
        counts.append(len(committed))
    assert counts == sorted(counts) and counts[-1] > counts[0]
