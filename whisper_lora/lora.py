"""LoRA through peft: apply to a Whisper model, save an adapter users can load, merge safely."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .models import save_processor


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], decoder_only: bool = False):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in target_modules if m not in present]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--target-modules {', '.join(unknown)} not found in the model; Whisper's linear "
                        f"layers are {', '.join(linear)}")
    # peft reads a string as a regex matched against full module names.
    targets = (rf".*decoder\..*\.({'|'.join(target_modules)})" if decoder_only else list(target_modules))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def save_adapter(peft_model, processor, folder: Path, base_model_spec: str) -> None:
    """An adapter folder that `PeftModel.from_pretrained` and every whisper-lora command load.

    The recorded base model is what the user passed to --model (or 'default'), not a cache path, so
    the folder keeps working on another machine.
    """
    import shutil

    # Written beside the target and swapped in, so a kill mid-save never leaves a half adapter.
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    peft_config = peft_model.peft_config["default"]
    previous = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = base_model_spec
    try:
        peft_model.save_pretrained(staging)
    finally:
        peft_config.base_model_name_or_path = previous
    save_processor(processor, staging)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def merge_into_base(peft_model):
    """Fold the adapter into the base weights; refuse to write a model with NaN/inf weights."""
    merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise UserError(f"merged weight {name} has NaN or infinite values; the adapter is broken")
    return merged
