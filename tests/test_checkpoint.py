import torch

from whisper_lora.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from whisper_lora.lora import apply_lora
from whisper_lora.models import load_model


def test_roundtrip_keeps_only_the_newest_and_ignores_partial(tiny_model_dir, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, peft_model, optimizer, scheduler, TrainState(step=step, epoch=1), keep=2)
    (tmp_path / "checkpoints" / "step-0000009.partial").mkdir()  # a save killed halfway
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000002", "step-0000003"]
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.zero_()
    state = load_checkpoint(found[-1], peft_model, optimizer, scheduler)
    assert state.step == 3 and state.epoch == 1
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_A" in n)
