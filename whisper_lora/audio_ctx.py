"""How much of its 30 s window the encoder sees: `--audio-ctx full|auto|SECONDS`.

Whisper's encoder encodes 3,000 log-mel frames (30 s) whatever the audio holds, and on a CPU that pass is
most of what a short clip costs. The encoder is a stack of self-attention layers over positions; given
fewer frames (positional embeddings sliced to match, kv.Network.encode) it encodes just those, at a cost
close to linear in their number, and the decoder cross-attends to fewer positions too. whisper.cpp calls
this `audio_ctx` (`-ac`, counted in encoder positions, 50 per second: `-ac 512` is 10.24 s; here contexts
are whole seconds, so `--audio-ctx 10` is the nearest).

* `full`: 3,000 frames, exactly what Whisper was trained on and what every other tool does.
* `auto`: the frames that hold audio plus `MARGIN_SECONDS`, rounded up to whole `STEP_SECONDS`, and
  never under `AUTO_FLOOR_SECONDS`. A model as released reads short contexts worse (the decoder starts to
  repeat itself, FUTO's ACFT paper); the floor is where the measured loss stays small for an untrained
  model (bench/results/context_vm.json), and an adapter trained with `train --acft` reads shorter ones.
* a number: `auto` with that floor in seconds (`--audio-ctx 5`). Speech is never cut: a window holding
  more audio than the number gets the context its audio needs.
* `default` (the flag's default): `full` for files and requests, which then read exactly as Whisper
  reads them everywhere else, and `auto` for live streams, whose buffers are short and whose latency is
  the point (bench/results/realtime_vm.json).

Contexts are whole seconds so that windows of similar length share a shape: the server batches
encoder work by shape (it groups, it does not pad: a padded row would just be a longer context).
"""
from __future__ import annotations

import math

from .constants import FRAMES_PER_SECOND, N_FRAMES
from .errors import UserError

FULL, AUTO, DEFAULT = "full", "auto", "default"
AudioContext = str | float  # "full", "auto", or a floor in seconds
STREAM_DEFAULT = AUTO  # what `default` means for a live stream

# Chosen by measurement (bench/context_bench.py, bench/results/context_vm.json: 55 English clips of 2-9 s,
# each alone, whisper-base as released, AMD EPYC, 2 cores): 10 s and 8 s read the 7 real clips exactly as
# `full` (15.0% WER both) at 0.35x / 0.29x its time; at 5 s the real clips fall into repetition loops
# (332% WER). 10 s keeps a step of margin above where it broke.
AUTO_FLOOR_SECONDS = 10.0
# An adapter trained with `train --acft` learned contexts down to the audio plus the margin; it records this
# floor (decoding.json) and every command reads it at that floor unless told otherwise. Measured on the
# ready adapter (configs/acft-base.yaml, bench/results/context_vm_acft.json): at 5 s it reads the real
# clips at 17.5% WER where the base model loops (332.5%); at 3 s it loops too.
ACFT_FLOOR_SECONDS = 5.0
MARGIN_SECONDS = 1.0  # heard after the audio's end: the decoder sees that the speech stopped
STEP_SECONDS = 1.0  # contexts are rounded up to this, so windows of similar length batch together
MIN_SECONDS = 1.0  # below this a context is too short to hold a word


def parse_audio_ctx(value: AudioContext | int | None) -> AudioContext | None:
    """`--audio-ctx` as users type it (`full`, `auto`, `10`, `7.5`, `default`), checked, in its canonical
    form; `default` (or None) is None: each path's own default."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (FULL, AUTO):
            return text
        if text == DEFAULT:
            return None
        try:
            value = float(text.removesuffix("s"))
        except ValueError:
            raise UserError(f"--audio-ctx must be full, auto, default or a number of seconds, not {value!r}") from None
    seconds = float(value)
    if not math.isfinite(seconds) or not MIN_SECONDS <= seconds <= N_FRAMES / FRAMES_PER_SECOND:
        raise UserError(f"--audio-ctx {value}: give seconds between {MIN_SECONDS:g} and "
                        f"{N_FRAMES // FRAMES_PER_SECOND} (or full, or auto)")
    return seconds


def encoder_frames(content_frames: int, audio_ctx: AudioContext | None) -> int:
    """Log-mel frames to encode for a window holding `content_frames` frames of audio (even: the encoder's
    second convolution has stride 2, one output position per two frames)."""
    if audio_ctx is None or audio_ctx == FULL:
        return N_FRAMES
    floor = AUTO_FLOOR_SECONDS if audio_ctx == AUTO else float(audio_ctx)
    step = round(STEP_SECONDS * FRAMES_PER_SECOND)
    wanted = max(content_frames + MARGIN_SECONDS * FRAMES_PER_SECOND, floor * FRAMES_PER_SECOND)
    frames = math.ceil(wanted / step) * step
    return min(N_FRAMES, frames + frames % 2)


def describe(audio_ctx: AudioContext | None) -> str:
    return DEFAULT if audio_ctx is None else audio_ctx if isinstance(audio_ctx, str) else f"{audio_ctx:g}"
