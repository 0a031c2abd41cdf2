"""VAD windows as pure functions: which audio a batched decoder window holds, and where its times land."""
import numpy as np
import pytest

from whisper_lora.vad import SpeechRegion as R
from whisper_lora.vad import SpeechWindow, pack_regions, speech_windows


def spans(window: SpeechWindow) -> list[tuple[float, float]]:
    return [(r.start, r.end) for r in window.spans]


def test_short_pauses_stay_whole_and_long_ones_shrink():
    regions = [R(1.0, 3.0), R(3.8, 6.0), R(40.0, 42.0)]
    (window,) = speech_windows(regions, duration=50.0, kept_pause=2.0)
    # 1 s lead-in halved, the 0.8 s pause kept whole, the 34 s silence cut down to 2 s (1 s each side)
    assert spans(window) == [pytest.approx((0.5, 7.0)), pytest.approx((39.0, 43.0))]
    assert window.speech == tuple(regions) and window.duration == pytest.approx(10.5)
    assert window.to_original(2.5) == pytest.approx(3.0)
    assert window.to_original(8.0) == pytest.approx(40.5)
    # without kept pauses the regions are glued back to back (what made Whisper drop words)
    (glued,) = speech_windows(regions, duration=50.0, kept_pause=0.0)
    assert spans(glued) == [(1.0, 3.0), (3.8, 6.0), (40.0, 42.0)]


def test_times_in_a_pause_move_to_the_speech_next_to_them():
    """A segment never starts or ends in a pause: not in a kept one, and not on the far side of a cut one."""
    window = SpeechWindow((R(0.5, 7.0), R(39.0, 43.0)), (R(1.0, 3.0), R(3.8, 6.0), R(40.0, 42.0)))
    assert window.to_original(0.1) == pytest.approx(1.0)  # lead-in: forward to the speech
    assert window.to_original(3.0) == pytest.approx(3.8)  # inside the kept pause: a start goes forward
    assert window.to_original(3.0, is_end=True) == pytest.approx(3.0)  # an end goes back
    assert window.to_original(6.0) == pytest.approx(40.0)  # just before the cut: on to the next speech
    assert window.to_original(6.5, is_end=True) == pytest.approx(6.0)
    assert window.to_original(99.0, is_end=True) == pytest.approx(42.0)
    assert window.to_window(40.0) == pytest.approx(7.5)


def test_windows_hold_at_most_30_s_and_every_region_whole_once():
    rng = np.random.default_rng(0)
    t, regions = 0.0, []
    for _ in range(80):
        t += rng.uniform(0.2, 6.0)
        length = rng.uniform(0.3, 29.0) if rng.random() < 0.1 else rng.uniform(0.3, 8.0)
        regions.append(R(t, t + length))
        t += length
    windows = speech_windows(regions, duration=t + 3.0)
    assert all(w.duration <= 30 + 1e-9 for w in windows)
    pieces = [r for w in windows for r in w.spans]
    assert [r for w in windows for r in w.speech] == regions  # each window knows the speech it holds
    assert all(a.end <= b.start + 1e-9 for a, b in zip(pieces, pieces[1:]))  # in order, no overlap
    for region in regions:
        assert sum(p.start <= region.start + 1e-9 and region.end <= p.end + 1e-9 for p in pieces) == 1


def test_the_rest_of_a_window_after_a_time():
    speech = (R(10, 14), R(20, 21), R(21.5, 22), R(30, 31))
    window = SpeechWindow((R(10, 14), R(20, 22), R(30, 31)), speech)  # window times 0-4, 4-6, 6-7
    assert spans(window.after(1.0)) == [(11, 14), (20, 22), (30, 31)]
    assert spans(window.after(4.0)) == [(20, 22), (30, 31)] and window.after(4.0).speech == speech[1:]
    assert spans(window.after(6.5)) == [(30.5, 31)]
    assert window.after(7.0) is None
    # regions still to come, and seconds left of the region under way
    assert window.unheard(1.0) == (3, 3.0)
    assert window.unheard(4.0) == (3, 0.0)
    assert window.unheard(4.5) == (2, 0.5)
    assert window.unheard(6.5) == (0, 0.5)
    audio = np.arange(40 * 16000, dtype=np.float32)
    assert len(window.samples(audio)) == 7 * 16000


def test_pack_regions_counts_only_the_audio_in_a_window():
    regions = [R(0, 10), R(50, 60), R(100, 110), R(120, 121)]
    assert [len(w) for w in pack_regions(regions)] == [3, 1]  # 30 s of audio, then the rest
    assert [len(w) for w in pack_regions(regions, max_seconds=20)] == [2, 2]
