"""The value head: a small MLP (or a linear layer) on the LLM's last hidden state -> the expected reward.

``trainer.stage: value`` (:mod:`medmm.training.stages.value`) trains it; the search strategies
(``best_of_n``, ``value_beam``, ``mcts`` in :mod:`medmm.inference.strategies`) read it as
``model.value_head``. It lives in the medmm model folder beside the rest and loads with it::

    value_head.safetensors    the head's weights; its sizes and the training summary in the metadata
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_NAME = "value_head.safetensors"


class ValueHead(nn.Module):
    """``(..., H)`` hidden states -> ``(...)`` predicted reward of the answer so far.

    Args:
        hidden_size: the LLM's hidden size H.
        width: hidden units of the MLP (LayerNorm -> Linear -> GELU -> Linear); 0 = one linear layer.
    """

    def __init__(self, hidden_size: int, width: int = 0):
        super().__init__()
        self.hidden_size, self.width = int(hidden_size), int(width)
        self.info: dict = {}
        """What it was trained on (the value stage's summary), saved in the file's metadata."""
        if width:
            self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                     nn.Linear(width, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.net(hidden.to(device=p.device, dtype=p.dtype)).squeeze(-1)

    def sizes(self) -> dict:
        return {"hidden_size": self.hidden_size, "width": self.width}


def save_value_head(head: ValueHead, folder: str | Path, info: dict | None = None) -> Path:
    """Write ``folder/value_head.safetensors`` (sizes and ``info`` in its metadata)."""
    from safetensors.torch import save_file

    path = Path(folder) / VALUE_HEAD_NAME
    sd = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", "sizes": json.dumps(head.sizes()),
                                       "info": json.dumps(info or {})})
    return path


def load_value_head(folder: str | Path) -> ValueHead | None:
    """The value head saved in a model folder, or None when the folder has none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_NAME
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        sizes = json.loads(meta["sizes"])
        head = ValueHead(sizes["hidden_size"], sizes["width"])
        head.load_state_dict(load_file(str(path)), strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a medmm value head ({e})") from e
    head.info = json.loads(meta.get("info", "{}"))
    return head.eval()


STEP_ENDS = (".", "!", "?")


def closes_step(last: str, previous: str, mode: str) -> bool:
    """Whether a token whose text is ``last`` (after one whose text is ``previous``) ends a step.

    ``line``: the token holds a newline. ``sentence``: also a token ending in . ! or ? whose punctuation
    does not follow a digit (so "6.9" is not cut). The value stage and the search strategies share this.
    """
    if "\n" in last:
        return True
    if mode == "sentence":
        t = last.rstrip(" ")
        if t.endswith(STEP_ENDS):
            before = t[:-1] or previous
            return not before[-1:].isdigit()
    return False
