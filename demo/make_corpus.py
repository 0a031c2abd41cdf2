"""Generate the embedded Mandarin demo corpus (run once; the output is committed under demo/data).

Whisper-base reads espeak-ng's robotic Mandarin badly, which makes it a clear, cheap
domain-adaptation demo. Sentences come from small templates so that we control exactly which words
the training split contains: `test` holds unseen sentences over the training vocabulary, and
`test_new_words` holds sentences that each contain at least one word absent from every training
sentence.

English splits (`retain_en`, `test_en`, and the larger `retain_en_large`, `test_en_large`) come from
the same engine's English voice: a forgetting guard needs English speech to replay and to score, and
the real English clips in demo/data/speech-en are too few (7) to do both.

    python demo/make_corpus.py            # needs espeak-ng (apt) and pypinyin (pip)
    python demo/make_corpus.py --english  # only the English splits
"""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from pypinyin import Style, lazy_pinyin

SEED = 20261121
SAMPLE_RATE = 16000  # Hz, Whisper's input rate
OUT = Path(__file__).resolve().parent / "data"
SPLIT_SIZES = {"train": 320, "dev": 32, "test": 40, "test_new_words": 30}
VOICE_VARIANTS = ["", "+m1", "+m3", "+f1", "+f2", "+f4"]  # espeak-ng speaker variants

SUBJECTS = ["我", "你", "他", "她", "我们", "他们", "老师", "学生", "妈妈", "爸爸", "朋友", "哥哥"]
TIMES = ["今天", "明天", "昨天", "早上", "晚上", "下午", "现在"]
FOODS = ["苹果", "米饭", "面包", "鸡蛋", "包子", "饺子", "水果", "蛋糕"]
DRINKS = ["茶", "牛奶", "果汁", "热水"]
PLACES = ["学校", "商店", "公园", "饭馆", "超市", "银行", "公司", "车站"]
THINGS = ["书", "电影", "报纸", "电视", "照片", "地图"]
ADJECTIVES = ["好", "大", "贵", "便宜", "漂亮", "有意思"]
# Words that appear only in the new-words test split.
NEW_WORDS = {
    "FOODS": ["西瓜", "香蕉", "面条"],
    "DRINKS": ["咖啡", "啤酒"],
    "PLACES": ["医院", "机场", "图书馆"],
    "THINGS": ["手机", "杂志"],
}

TEMPLATES = [
    "{time}{subj}想吃{food}",
    "{subj}{time}去{place}买{food}",
    "{subj}喜欢喝{drink}",
    "{time}{subj}在{place}看{thing}",
    "{subj}觉得这个{thing}很{adj}",
    "{subj}{time}要去{place}",
    "{subj}在{place}喝{drink}",
    "这家{place}的{food}很{adj}",
    "{subj}不想去{place}",
    "{time}{subj}给{subj2}买了{thing}",
]


def expand(template: str, words: dict[str, list[str]]) -> list[str]:
    keys = [k for k in ("subj", "subj2", "time", "food", "drink", "place", "thing", "adj") if "{" + k + "}" in template]
    pools = {"subj": words["SUBJECTS"], "subj2": words["SUBJECTS"], "time": words["TIMES"],
             "food": words["FOODS"], "drink": words["DRINKS"], "place": words["PLACES"],
             "thing": words["THINGS"], "adj": words["ADJECTIVES"]}
    return [template.format(**dict(zip(keys, combo))) for combo in itertools.product(*(pools[k] for k in keys))
            if not ("subj2" in keys and combo[keys.index("subj")] == combo[keys.index("subj2")])]


def sentences(rng: random.Random) -> dict[str, list[str]]:
    known = dict(SUBJECTS=SUBJECTS, TIMES=TIMES, FOODS=FOODS, DRINKS=DRINKS, PLACES=PLACES,
                 THINGS=THINGS, ADJECTIVES=ADJECTIVES)
    seen_pool = sorted({s for t in TEMPLATES for s in expand(t, known)})
    rng.shuffle(seen_pool)
    n_train, n_dev, n_test = SPLIT_SIZES["train"], SPLIT_SIZES["dev"], SPLIT_SIZES["test"]
    splits = {"train": seen_pool[:n_train], "dev": seen_pool[n_train:n_train + n_dev],
              "test": seen_pool[n_train + n_dev:n_train + n_dev + n_test]}
    new_only = {k: v for k, v in NEW_WORDS.items()}
    with_new = dict(known)
    for key, extra in new_only.items():
        with_new[key] = extra
    new_pool = sorted({s for t in TEMPLATES for s in expand(t, with_new)
                       if any(w in s for ws in NEW_WORDS.values() for w in ws)})
    rng.shuffle(new_pool)
    splits["test_new_words"] = new_pool[:SPLIT_SIZES["test_new_words"]]
    train_text = "".join(splits["train"])
    for sentence in splits["test_new_words"]:
        assert any(w in sentence and w not in train_text for ws in NEW_WORDS.values() for w in ws), sentence
    assert not set(splits["train"]) & (set(splits["dev"]) | set(splits["test"]) | set(splits["test_new_words"]))
    return splits


ENGLISH_SEED = 20261122  # its own stream, so adding English left the Mandarin corpus byte-identical
ENGLISH_SPLIT_SIZES = {"retain_en": 64, "test_en": 32}
# A retain set large enough to replay without repeating a clip in an epoch, and a held-out set large
# enough that one word is 0.1% WER (1,092 words), from further sentences of the same pool.
ENGLISH_LARGE_SEED = 7  # its own stream, so adding these left the first English splits byte-identical
ENGLISH_LARGE_SPLIT_SIZES = {"retain_en_large": 320, "test_en_large": 128}
EN_SUBJECTS = ["I", "You", "We", "They", "My sister", "The teacher", "Our neighbour", "The driver", "His friend"]
EN_VERBS = ["bought", "painted", "carried", "borrowed", "cleaned", "found", "sold", "described", "repaired"]
EN_OBJECTS = ["an old bicycle", "the kitchen table", "a heavy suitcase", "two green chairs", "the garden gate",
              "a small wooden boat", "the blue umbrella", "a box of letters", "the broken window"]
EN_TAILS = ["last summer", "before lunch", "near the river", "for the museum", "after the storm",
            "on Sunday morning", "in the city", "with great care"]


def english_sentences(rng: random.Random) -> dict[str, list[str]]:
    pool = [f"{s} {v} {o} {t}." for s, v, o, t in itertools.product(EN_SUBJECTS, EN_VERBS, EN_OBJECTS, EN_TAILS)]
    rng.shuffle(pool)
    splits, start = {}, 0
    for split, size in {**ENGLISH_SPLIT_SIZES, **ENGLISH_LARGE_SPLIT_SIZES}.items():
        splits[split], start = pool[start:start + size], start + size
    return splits


def speak(text: str, voice: str, speed: int, pitch: int, language: str = "zh") -> np.ndarray:
    if language == "zh":
        text = " ".join(lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True))
    espeak_voice = f"cmn-latn-pinyin{voice}" if language == "zh" else f"en-us{voice}"
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", espeak_voice, "-s", str(speed), "-p", str(pitch),
                        "-w", tmp.name, text], check=True)
        audio, rate = sf.read(tmp.name, dtype="float32")
    return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def write_split(split: str, texts: list[str], language: str, rng: random.Random) -> None:
    rows = []
    for i, text in enumerate(texts):
        name = f"audio/{split}_{i:04d}.ogg"
        audio = speak(text, rng.choice(VOICE_VARIANTS), rng.randint(120, 185), rng.randint(25, 75), language)
        audio *= rng.uniform(0.4, 0.95) / max(1e-6, float(np.abs(audio).max()))
        # Opus keeps the committed corpus under 6 MB; speech survives it fine.
        sf.write(OUT / name, audio, SAMPLE_RATE, format="OGG", subtype="OPUS")
        rows.append({"audio": {"path": name}, "sentence": text + ("。" if language == "zh" else ""),
                     "language": language, "duration": round(len(audio) / SAMPLE_RATE, 3)})
    with open(OUT / f"{split}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{split}: {len(rows)} clips")


def main() -> None:
    (OUT / "audio").mkdir(parents=True, exist_ok=True)
    if "--english" not in sys.argv:
        rng = random.Random(SEED)
        for split, texts in sentences(rng).items():
            write_split(split, texts, "zh", rng)
    rng = random.Random(ENGLISH_SEED)
    english = english_sentences(rng)
    large_rng = random.Random(ENGLISH_LARGE_SEED)
    for split, texts in english.items():
        write_split(split, texts, "en", large_rng if split in ENGLISH_LARGE_SPLIT_SIZES else rng)


if __name__ == "__main__":
    main()
