import pytest
import torch

from whisper_lora.errors import UserError
from whisper_lora.lora import apply_lora, merge_into_base
from whisper_lora.models import load_model


def test_default_targets_cover_encoder_and_decoder(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert any(".encoder." in n for n in adapted) and any(".decoder." in n for n in adapted)
    assert all(n.endswith(("q_proj", "v_proj")) for n in adapted)


def test_unknown_target_module_lists_the_real_ones(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    with pytest.raises(UserError, match="--target-modules query not found.*q_proj"):
        apply_lora(model, 4, 8, 0.0, ["query"])


def test_merge_refuses_non_finite_weights(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj"])
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(UserError, match="NaN or infinite"):
        merge_into_base(peft_model)
