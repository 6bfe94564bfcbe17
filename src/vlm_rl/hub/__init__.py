"""Share trained policies and reward models on the Hugging Face Hub, or on a self-hosted hub.

    commit_url = push_folder("runs/grpo/final", "me/tiny-llava-grpo", card=dict(kind="policy", ...))
    commit_url = push_run("runs/grpo", "me/tiny-llava-grpo")    # final/ with a card built from the run
    path = download("me/tiny-llava-grpo")

`push_folder` uploads a folder with a generated model card (`write_model_card`, in cards.py)
through `huggingface_hub`; the card is written into a temporary copy, never into the run folder.
client.py turns every hub failure into a `HubError` that says what failed and what to do; runs.py
decides what a run folder pushes (`push_run`, `push_or_explain`, `push_after_training`).
Importing this package imports `huggingface_hub`: trainers import it only when they push.
"""

from vlm_rl.hub.cards import write_model_card
from vlm_rl.hub.client import HubError, download, push_folder
from vlm_rl.hub.runs import (
    REWARD_MODEL_CARD_HYPERPARAMETERS,
    RL_CARD_HYPERPARAMETERS,
    push_after_training,
    push_checkpoint,
    push_or_explain,
    push_run,
)

__all__ = [
    "REWARD_MODEL_CARD_HYPERPARAMETERS",
    "RL_CARD_HYPERPARAMETERS",
    "HubError",
    "download",
    "push_after_training",
    "push_checkpoint",
    "push_folder",
    "push_or_explain",
    "push_run",
    "write_model_card",
]
