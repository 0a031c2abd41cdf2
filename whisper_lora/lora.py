"""Training methods on a Whisper model: LoRA, DoRA, AdaLoRA (all through peft) or full fine-tuning.

`apply_adapter` turns a loaded model into the model to train for an `AdapterSpec` (a stage's options);
`adapter_step_hook` is the per-optimizer-step call AdaLoRA needs (its rank budget is reallocated from
gradient sensitivities, which no optimizer or accelerate does for it); `save_adapter` writes what the
run produces (a peft adapter folder, or a whole transformers model for `full`); `merge_into_base`
folds an adapter in; `trainable_state` / `load_trainable_state` are what a resume checkpoint holds.
`check_quantisation` refuses 8/4-bit base weights up front where bitsandbytes cannot run.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import UserError
from .models import DECODING_FILE, save_processor

# Whisper's linear layers by role (names as in transformers' WhisperAttention / WhisperEncoderLayer).
# Whisper has exactly one more linear layer, proj_out, the output head; it shares its weight with the
# decoder's token embedding, so adapting it would also change the embedding (and peft's own
# "all-linear" shortcut leaves the output layer out for that reason). Hence all-linear selects the same
# layers as attention-mlp; tests check that this equals what peft's "all-linear" picks on Whisper.
TARGET_PRESETS = {
    "qv": ["q_proj", "v_proj"],  # the LoRA paper's choice and the usual Whisper recipe
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # Whisper-Finetune's set
    "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # = attention-mlp, see above
}
ADALORA_TINIT_SHARE = 0.1  # default warm-up before pruning starts, as a share of all optimizer steps
ADALORA_TFINAL_SHARE = 0.2  # default final phase at the target budget
QUANT_PIP = "pip install 'whisper-lora[quant]'"
BITSANDBYTES_MIN = (0, 48)  # transformers 5 needs 0.46.1; 0.48 also lets an 8-bit model take .to(device)
_ADALORA_STATE = "__adalora__."  # key prefix of the rank allocator's state inside trainable_state()


@dataclass(frozen=True)
class AdapterSpec:
    """What to train: the method and its settings, as `train`'s options of the same names give them."""
    method: str = "lora"
    lora_targets: str = "qv"
    target_modules: tuple[str, ...] = ()
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    freeze_encoder: bool = False  # adapt the decoder only
    gradient_checkpointing: bool = False
    adalora_init_r: int | None = None
    adalora_tinit: int | None = None
    adalora_tfinal: int | None = None
    adalora_interval: int = 10
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    @classmethod
    def of(cls, options) -> AdapterSpec:
        """The spec from any object with these attribute names (a stage's config)."""
        return cls(**{f.name: tuple(v) if isinstance(v := getattr(options, f.name), list) else v for f in fields(cls)})

    @property
    def adalora_initial_rank(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else max(self.lora_r + 1, self.lora_r * 3 // 2)


def target_names(preset: str, explicit: list[str] | None = None) -> list[str]:
    if explicit:
        return list(explicit)
    return list(TARGET_PRESETS[preset])


def _peft_targets(model, target_modules: list[str], decoder_only: bool) -> list[str] | str:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in target_modules if m not in present]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--target-modules {', '.join(unknown)} not found in the model; Whisper's linear "
                        f"layers are {', '.join(linear)}")
    # peft reads a string as a regex matched against full module names; the decoder's cross-attention
    # (decoder.layers.N.encoder_attn) is decoder, so it stays adapted.
    return rf".*decoder\..*\.({'|'.join(target_modules)})" if decoder_only else list(target_modules)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], decoder_only: bool = False,
               use_dora: bool = False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", use_dora=use_dora,
                        target_modules=_peft_targets(model, target_modules, decoder_only))
    return get_peft_model(model, config)


def adalora_schedule(config: AdapterSpec, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal): the configured values, or 10% / 20% of the run."""
    tinit = config.adalora_tinit if config.adalora_tinit is not None else int(ADALORA_TINIT_SHARE * total_steps)
    tfinal = config.adalora_tfinal if config.adalora_tfinal is not None else int(ADALORA_TFINAL_SHARE * total_steps)
    if tinit < 0 or tfinal < 0:
        raise UserError(f"--adalora-tinit and --adalora-tfinal must be >= 0, got {tinit} and {tfinal}")
    if tinit + tfinal >= total_steps:
        raise UserError(f"--adalora-tinit ({tinit}) + --adalora-tfinal ({tfinal}) leave no step of the "
                        f"{total_steps} for reallocating ranks; lower them or train longer")
    return tinit, tfinal


def apply_adapter(model, config: AdapterSpec, total_steps: int):
    """The model to train for `config.method`, with `--freeze-encoder` honoured by every method.

    A model loaded in 8 or 4 bits first goes through peft's `prepare_model_for_kbit_training` (norms
    and other unquantised weights in fp32 for stable training, base frozen).
    """
    if config.method == "full":
        model.requires_grad_(True)
        if config.freeze_encoder:
            model.get_encoder().requires_grad_(False)
        return model
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = target_names(config.lora_targets, config.target_modules)
    if config.method in ("lora", "dora"):
        return apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, targets,
                          decoder_only=config.freeze_encoder, use_dora=config.method == "dora")
    if config.method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        if config.adalora_initial_rank <= config.lora_r:
            # peft's allocator would ask torch.kthvalue for the 0th value at its first pruning and crash.
            raise UserError(f"--adalora-init-r ({config.adalora_init_r}) must be greater than --lora-r "
                            f"({config.lora_r}): AdaLoRA prunes from the initial rank down to the target")
        if config.adalora_interval <= 0:
            raise UserError(f"--adalora-interval must be positive, got {config.adalora_interval}")
        tinit, tfinal = adalora_schedule(config, total_steps)
        # `r` is left at peft's default: AdaLoRA ignores it (and warns) in favour of init_r/target_r.
        adalora = AdaLoraConfig(init_r=config.adalora_initial_rank, target_r=config.lora_r, tinit=tinit, tfinal=tfinal,
                                deltaT=config.adalora_interval, total_step=total_steps,
                                lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                                target_modules=_peft_targets(model, targets, config.freeze_encoder))
        return get_peft_model(model, adalora)
    raise UserError(f"unknown --method {config.method!r}; choose lora, dora, adalora or full")


def _adalora(model):
    """The AdaLoraModel inside a (possibly DDP-wrapped) peft model, or None."""
    from peft.tuners.adalora import AdaLoraModel

    model = getattr(model, "module", model)
    base = getattr(model, "base_model", None)
    return base if isinstance(base, AdaLoraModel) else None


def adapter_step_hook(model, step: int) -> None:
    """Call after every optimizer step, before zero_grad, with the number of optimizer steps done.

    AdaLoRA scores each rank by |weight x gradient|, so the gradients of the step must still be there;
    it then zeroes the least important singular values (lora_E) to the scheduled budget, which must
    come after optimizer.step() or the step would write them back. `step` counts from 1, so that the
    last step of a run with tfinal = 0 still fixes the final rank pattern. No-op for other methods.
    """
    adalora = _adalora(model)
    if adalora is not None:
        adalora.update_and_allocate(step)


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


def _swap_in(staging: Path, folder: Path) -> None:
    import shutil

    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, processor, folder: Path, base_model_spec: str, decoding: dict | None = None) -> None:
    """What training produces, loadable by every whisper-lora command.

    For a peft model: an adapter folder that `PeftModel.from_pretrained` loads. The recorded base
    model is what the user passed to --model (or 'default'), not a cache path, so the folder keeps
    working on another machine. For `--method full` (a plain transformers model): a complete model
    folder (weights, config, generation config, processor), which --model accepts like any other.
    """
    import shutil

    # Written beside the target and swapped in, so a kill mid-save never leaves a half folder.
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if not is_adapter(model):
        model.save_pretrained(staging)
    else:
        peft_config = model.peft_config["default"]
        previous = peft_config.base_model_name_or_path
        peft_config.base_model_name_or_path = base_model_spec
        try:
            with warnings.catch_warnings():
                if _adalora(model) is not None:
                    # AdaLoRA may prune a layer to rank 0; peft takes such empty matrices for unsaved
                    # DeepSpeed/FSDP shards and warns, wrongly here.
                    warnings.filterwarnings("ignore", message=r".*have invalid shape")
                model.save_pretrained(staging)
        finally:
            peft_config.base_model_name_or_path = previous
    save_processor(processor, staging)
    if decoding:  # how the adapter wants to be read (an --acft adapter: its encoder context floor)
        import json

        (staging / DECODING_FILE).write_text(json.dumps(decoding, indent=2))
    _swap_in(staging, folder)


def merge_into_base(peft_model):
    """Fold the adapter into the base weights; refuse to write a model with NaN/inf weights."""
    merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise UserError(f"merged weight {name} has NaN or infinite values; the adapter is broken")
    return merged


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Everything training changes, for resume checkpoints, under every method.

    Taken from the live parameters rather than peft's `get_peft_model_state_dict`, which cuts AdaLoRA
    matrices down to the current rank pattern (they could then not be loaded back into the full-rank
    model being trained) and which a fully fine-tuned model does not have. AdaLoRA's rank allocator
    (sensitivity averages, rank pattern) is included so that a resumed run prunes exactly as an
    uninterrupted one.
    """
    # Copies: on CPU .cpu() would alias the live weights, and the snapshot would go on training.
    state = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    adalora = _adalora(model)
    if adalora is not None:
        allocator = adalora.rankallocator
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            for name, tensor in getattr(allocator, kind).items():
                state[f"{_ADALORA_STATE}{kind}.{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
        pattern = adalora.peft_config[adalora.trainable_adapter_name].rank_pattern
        for name, keep in (pattern or {}).items():
            state[f"{_ADALORA_STATE}rank_pattern.{name}"] = torch.as_tensor(keep, dtype=torch.bool).view(-1)
    return state


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put back what `trainable_state` took; refuse a state written under another method or targets."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    weights = {k: v for k, v in state.items() if not k.startswith(_ADALORA_STATE)}
    if set(weights) != trainable:
        unknown, missing = sorted(set(weights) - trainable), sorted(trainable - set(weights))
        raise UserError(f"checkpoint does not fit this run (another --method, --lora-targets or --freeze-encoder?): "
                        f"{len(missing)} trained weights missing (e.g. {missing[:1]}), {len(unknown)} unknown "
                        f"(e.g. {unknown[:1]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    adalora = _adalora(model)
    if adalora is None:
        return
    allocator = adalora.rankallocator
    allocator.reset_ipt()
    inner = dict(adalora.model.named_parameters())  # the allocator names weights without peft's prefix
    pattern = {}
    for key, value in state.items():
        if not key.startswith(_ADALORA_STATE):
            continue
        kind, name = key[len(_ADALORA_STATE):].split(".", 1)
        if kind == "rank_pattern":
            pattern[name] = value.tolist()
        else:
            getattr(allocator, kind)[name] = value.to(inner[name].device)
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = pattern or None


def check_quantisation(config: AdapterSpec) -> str | None:
    """"8bit", "4bit" or None for `load_model(quantization=...)`; raises before anything heavy when
    bitsandbytes is missing or too old (since 0.49 it runs on CPUs too)."""
    kind = "8bit" if config.load_in_8bit else "4bit" if config.load_in_4bit else None
    if kind is None:
        return None
    flag = f"--load-in-{kind}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag} needs the bitsandbytes package: {QUANT_PIP}")
    found = importlib.metadata.version("bitsandbytes")
    if tuple(int(p) for p in found.split(".")[:2] if p.isdigit()) < BITSANDBYTES_MIN:
        wanted = ".".join(map(str, BITSANDBYTES_MIN))
        raise UserError(f"{flag} needs bitsandbytes >= {wanted}, found {found}: pip install -U 'whisper-lora[quant]'")
    return kind
