"""`whisper-lora merge`: adapter + base -> a standalone transformers model folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import MergeConfig
from ..rundir import clear_output_dir, save_config
from ..errors import UserError
from ..lora import merge_into_base
from ..model_card import CardInfo, inherited, write_card
from ..models import DECODING_FILE, ResolvedModel, load_model, public_name, resolve_model, save_processor

MERGE_CONFIG = "merge_config.yaml"


def run(config: MergeConfig) -> Path:
    # ---- set up
    adapter = Path(config.adapter)
    if (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").is_file():
        raise UserError("is already a whole model (trained with --method full): pass it to --model directly; "
                        "there is nothing to merge", adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError("is not an adapter folder (no adapter_config.json)", adapter)
    out = Path(config.output_dir)
    clear_output_dir(out, config.overwrite, "output folder exists and is not empty")
    base_spec = config.model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = resolve_model(base_spec)

    # ---- merge
    model, processor = load_model(ResolvedModel(base.spec, base.location, adapter=adapter.resolve()))
    merged = merge_into_base(model)

    # ---- save
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    save_processor(processor, out)
    if (adapter / DECODING_FILE).is_file():  # an --acft adapter's encoder context goes with its weights
        shutil.copy(adapter / DECODING_FILE, out / DECODING_FILE)
    save_config(config, out / MERGE_CONFIG)
    carried = inherited(adapter)
    carried["base_model"] = public_name(base_spec)  # the base it was merged into (--model may name another)
    write_card(out, CardInfo(kind="merged", made_from=str(adapter), **carried))
    print(f"merged model written to {out}")
    return out
