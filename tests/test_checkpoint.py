import copy

import torch

from whisper_lora.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from whisper_lora.lora import apply_lora
from whisper_lora.models import load_model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_roundtrip_keeps_only_the_newest_and_ignores_partial(tiny_model_dir, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    peft_model = apply_lora(model, 4, 8, 0.0, ["q_proj"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    saved = {}
    torch.manual_seed(0)
    features, labels = torch.randn(1, 80, 3000), torch.tensor([[50258, 50259, 400, 401, 50257]])
    for step in (1, 2, 3):  # a real step before each save: weights, moments and learning rate all move
        peft_model(input_features=features, labels=labels).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        save_checkpoint(tmp_path, peft_model, optimizer, scheduler, TrainState(step=step, epoch=1), keep=2)
        saved[step] = (trainable(peft_model), copy.deepcopy(optimizer.state_dict()), scheduler.state_dict())
    assert not all(torch.equal(saved[2][0][n], saved[3][0][n]) for n in saved[3][0])  # the steps differ
    (tmp_path / "checkpoints" / "step-0000009.partial").mkdir()  # a save killed halfway
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000002", "step-0000003"]

    # a fresh model and optimizer, as a resumed run builds them, get step 3 back exactly
    model, _ = load_model(str(tiny_model_dir))
    resumed = apply_lora(model, 4, 8, 0.0, ["q_proj"])
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = load_checkpoint(found[-1], resumed, optimizer, scheduler)
    assert state.step == 3 and state.epoch == 1
    weights, moments, schedule = saved[3]
    assert all(torch.equal(trainable(resumed)[n], weights[n]) for n in weights)
    restored = optimizer.state_dict()
    assert restored["param_groups"][0]["lr"] == moments["param_groups"][0]["lr"] == 0.1 / 4
    assert len(restored["state"]) == len(moments["state"]) > 0
    for key, values in moments["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored["state"][key][name], values[name]), (key, name)
    assert scheduler.state_dict()["last_epoch"] == schedule["last_epoch"] == 3
