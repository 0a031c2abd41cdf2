"""`whisper-lora push`: a model folder and its card to the Hugging Face Hub (huggingface_hub's own upload)."""
from __future__ import annotations

from pathlib import Path

from ..config import PushConfig
from ..errors import UserError
from ..model_card import CARD

LEFT_BEHIND = ["*.partial/**", ".*", "**/.*", "__pycache__/**"]  # half-written folders, hidden files


def run(config: PushConfig) -> str:
    # ---- set up: a folder with a card the Hub will parse
    from huggingface_hub import HfApi, ModelCard

    folder = Path(config.folder)
    if not folder.is_dir():
        raise UserError("is not a folder", folder)
    if not (folder / CARD).is_file():
        raise UserError("has no model card (README.md): push a folder that train (its adapter/), merge or export "
                        "wrote", folder)
    try:
        card = ModelCard.load(folder / CARD)
    except Exception as exc:  # noqa: BLE001  (the Hub would refuse it the same way)
        raise UserError(f"its model card does not parse ({exc})", folder / CARD) from None
    if not card.data.base_model:
        print(f"warning: {folder / CARD} names no base_model")

    # ---- upload
    api = HfApi(token=config.token)
    try:
        repo = api.create_repo(config.repo_id, repo_type="model", private=config.private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=config.repo_id, repo_type="model",
                                   revision=config.revision, ignore_patterns=LEFT_BEHIND,
                                   commit_message=config.commit_message or f"Upload {folder.name} with whisper-lora")
    # no network, no token, no rights: one line (the Hub client's transport raises its own kinds: httpx's, OSError)
    except Exception as exc:  # noqa: BLE001
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"could not push to {config.repo_id}: {reason}", folder) from None
    print(f"pushed {folder} to {repo} ({getattr(commit, 'commit_url', commit)})")
    return str(repo)
