"""Model cards: the README.md the Hugging Face Hub reads, in every folder `train`, `merge` and `export` write.

The metadata block is built with `huggingface_hub`'s own ModelCardData and EvalResult, so the Hub (and
`ModelCard.load`) parse it: base model, languages, library, tags, the datasets named by the manifests, and a
`model-index` with the CER/WER measured on them (training's dev score, `evaluate`'s, an export's parity
gate in its runtime), in the shape the Hub's leaderboards read. The body says what the folder is, how to
load it, the scores as a table and the training config. A folder made from another (merge, export) inherits
its source card's datasets, languages, base model, training config and scores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .rundir import RESOLVED_CONFIG

CARD = "README.md"
RESULTS = "eval_results.json"  # the scores behind the card's model-index, kept as data
TRAINING_CONFIG = "training_config.yaml"  # the training run's resolved config, carried from folder to folder
HINT = "model cards need huggingface_hub: pip install 'whisper-lora[hub]'"

LIBRARY = {"adapter": "peft", "merged": "transformers", "ct2": "ctranslate2", "ggml": "whisper.cpp",
           "openai": "openai-whisper"}
WHAT = {"adapter": "a LoRA adapter (peft) for", "merged": "a fine-tuned (LoRA merged)",
        "ct2": "a CTranslate2 (faster-whisper) export of a fine-tuned", "ggml": "a whisper.cpp (GGML) export of a fine-tuned",
        "openai": "an openai-whisper checkpoint of a fine-tuned"}
USAGE = {
    "adapter": "from peft import PeftModel\nfrom transformers import WhisperForConditionalGeneration\n\n"
               "base = WhisperForConditionalGeneration.from_pretrained(\"{base}\")\n"
               "model = PeftModel.from_pretrained(base, \"{repo}\")\n"
               "# or: whisper-lora transcribe audio.wav --model {repo}",
    "merged": "from transformers import pipeline\n\nasr = pipeline(\"automatic-speech-recognition\", model=\"{repo}\")",
    "ct2": "from faster_whisper import WhisperModel\n\nmodel = WhisperModel(\"{repo}\")\n"
           "segments, info = model.transcribe(\"audio.wav\")",
    "ggml": "# whisper.cpp\nwhisper-cli -m ggml-model.bin -f audio.wav\n# Python: pywhispercpp\n"
            "from pywhispercpp.model import Model\nsegments = Model(\"ggml-model.bin\").transcribe(\"audio.wav\")",
    "openai": "import whisper\n\nmodel = whisper.load_model(\"model.pt\")\n"
              "model.set_alignment_heads(torch.load(\"model.pt\")[\"alignment_heads\"])  # word timestamps\n"
              "result = model.transcribe(\"audio.wav\")",
}


@dataclass
class Score:
    """One measured score: `metric` (cer|wer) in percent on a manifest, by a runtime."""
    metric: str
    value: float  # percent
    manifest: str
    dataset: str  # the dataset's id: the hub dataset `prepare` read, else the manifest's folder/stem
    split: str
    runtime: str = "transformers"
    clips: int | None = None
    source: str = "evaluate"  # evaluate | train (dev score) | export (parity gate)

    @classmethod
    def of(cls, metric: str, fraction: float, manifest: str | Path, runtime: str = "transformers",
           clips: int | None = None, source: str = "evaluate") -> "Score":
        dataset, split = dataset_of(manifest)
        return cls(metric, round(100 * fraction, 2), str(manifest), dataset, split, runtime, clips, source)


def dataset_of(manifest: str | Path) -> tuple[str, str]:
    """(dataset id, split) for a manifest: the Hugging Face dataset `prepare` converted it from when its
    config.yaml says so, else `folder/stem`; the split is the manifest's stem (train, dev, test...)."""
    path = Path(manifest)
    prepared = path.parent / RESOLVED_CONFIG
    if prepared.is_file():
        try:
            source = str((yaml.safe_load(prepared.read_text()) or {}).get("source") or "")
        except yaml.YAMLError:
            source = ""
        if source and "/" in source and not Path(source).exists():  # a hub id, not a local folder
            return source, path.stem
    return f"{path.parent.name or 'local'}/{path.stem}", path.stem


@dataclass
class CardInfo:
    kind: str  # adapter | merged | ct2 | ggml | openai
    base_model: str
    languages: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # manifests the model was trained on
    scores: list[Score] = field(default_factory=list)
    training_config: dict | None = None
    made_from: str | None = None  # the folder a merge or export read
    files: str | None = None  # the file users load, when it is not the folder


def _hub():
    try:
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
    except ImportError:
        raise ImportError(HINT) from None
    return EvalResult, ModelCard, ModelCardData


def read_scores(folder: Path) -> list[Score]:
    path = Path(folder) / RESULTS
    if not path.is_file():
        return []
    return [Score(**row) for row in json.loads(path.read_text(encoding="utf-8"))]


def inherited(source: Path) -> dict:
    """What a folder made from `source` keeps of its card: languages, datasets, training config, scores."""
    source = Path(source)
    found: dict = {"scores": read_scores(source)}
    if (source / TRAINING_CONFIG).is_file():
        found["training_config"] = yaml.safe_load((source / TRAINING_CONFIG).read_text())
    if (source / CARD).is_file():
        try:
            _, ModelCard, _ = _hub()
            data = ModelCard.load(source / CARD).data
            found["languages"] = list(data.language or []) if not isinstance(data.language, str) else [data.language]
            found["datasets"] = list(data.datasets or [])
            if data.base_model:
                found["base_model"] = data.base_model
        except Exception:  # noqa: BLE001  (a card somebody else wrote: keep what the files say)
            pass
    return found


def write_card(folder: Path, info: CardInfo) -> Path:
    """README.md (metadata + body) and the scores as data, in `folder`."""
    EvalResult, ModelCard, ModelCardData = _hub()
    folder = Path(folder)
    name = folder.name if folder.name not in ("adapter", "adapter-last") else folder.parent.name
    datasets = sorted({*info.datasets, *(s.dataset for s in info.scores if s.source == "train")})
    results = [EvalResult(task_type="automatic-speech-recognition", task_name="Speech Recognition",
                          dataset_type=s.dataset, dataset_name=s.dataset, dataset_split=s.split,
                          metric_type=s.metric, metric_name=f"{s.metric.upper()} ({s.runtime}, {s.source})",
                          metric_value=s.value)
               for s in info.scores]
    tags = ["whisper-lora", "whisper", "automatic-speech-recognition"] + \
        (["lora"] if info.kind in ("adapter", "merged") else []) + ([info.kind] if info.kind not in ("adapter", "merged") else [])
    data = ModelCardData(base_model=info.base_model, language=info.languages or None, library_name=LIBRARY[info.kind],
                         tags=tags, datasets=datasets or None, pipeline_tag="automatic-speech-recognition",
                         model_name=name, eval_results=results or None)
    usage = USAGE[info.kind].format(base=info.base_model, repo=f"YOUR_ORG/{name}")
    lines = [f"# {name}", "", f"{WHAT[info.kind]} [{info.base_model}](https://huggingface.co/{info.base_model}), "
             "made with [whisper-lora](https://github.com/whisper-lora/whisper-lora)"
             + (f" from `{info.made_from}`" if info.made_from else "") + ".", "", "## Use", "",
             "```" + ("bash" if info.kind == "ggml" else "python"), usage, "```", ""]
    if info.scores:
        lines += ["## Results", "", "| dataset | split | metric | value | runtime | clips | measured by |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s.dataset} | {s.split} | {s.metric.upper()} | {s.value:.2f}% | {s.runtime} | "
                  f"{s.clips if s.clips is not None else ''} | {s.source} |" for s in info.scores]
        lines += ["", "Text normalised before scoring (case, punctuation, width, traditional to simplified Chinese).", ""]
    if info.training_config:
        lines += ["## Training", "", "```yaml", yaml.safe_dump(info.training_config, sort_keys=False,
                                                               allow_unicode=True).strip(), "```", ""]
        (folder / TRAINING_CONFIG).write_text(yaml.safe_dump(info.training_config, sort_keys=False, allow_unicode=True))
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    card.save(folder / CARD)
    (folder / RESULTS).write_text(json.dumps([vars(s) for s in info.scores], indent=2, ensure_ascii=False),
                                  encoding="utf-8")
    return folder / CARD


def add_scores(folder: Path, scores: list[Score]) -> Path | None:
    """`evaluate`'s scores into the card of a folder whisper-lora wrote (None for any other folder),
    replacing earlier ones of the same manifest, metric and runtime; the rest of the card as it was."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        return None
    _, ModelCard, _ = _hub()
    data = ModelCard.load(folder / CARD).data
    kind = {library: kind for kind, library in LIBRARY.items()}.get(data.library_name)
    if "whisper-lora" not in (data.tags or []) or kind is None:
        return None
    carried = inherited(folder)
    kept = [s for s in carried["scores"]
            if not any((s.manifest, s.metric, s.runtime) == (n.manifest, n.metric, n.runtime) for n in scores)]
    carried["scores"] = kept + list(scores)
    carried.setdefault("base_model", data.base_model)
    return write_card(folder, CardInfo(kind=kind, **carried))
