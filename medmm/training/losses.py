"""Preference losses as pure functions of sequence log-probabilities: DPO (four variants), SimPO, ORPO.

Every function takes per-pair tensors of shape ``(B,)``: the summed log-probability of each answer's tokens
under the policy (``chosen_logps``, ``rejected_logps``), the same under the reference where the loss has one,
and the answers' token counts where the loss normalises by length. Each returns ``(losses, chosen_rewards,
rejected_rewards)``, all ``(B,)``; the training loss is ``losses.mean()``. The formulas are TRL's (``DPOTrainer``,
``CPOTrainer`` with ``loss_type="simpo"``, ``ORPOTrainer``); ``tests/test_dpo.py`` checks them against TRL's own code
to 1e-6. No model, no I/O: the stages in ``medmm.training.stages.dpo`` compute the log-probs and call these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants on the log-ratios ``policy - reference`` of each answer.

    With ``h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)``:

    - ``sigmoid`` (DPO; Rafailov et al. 2023): ``-(1-e) log s(beta h) - e log s(-beta h)``, ``e`` = label smoothing
      (0 = plain DPO; > 0 = conservative DPO, the labels flipped with probability e);
    - ``ipo`` (Azar et al. 2023): ``(h' - 1/(2 beta))^2`` where ``h'`` uses each log-ratio divided by its answer's
      token count (``chosen_lengths``/``rejected_lengths`` required; TRL's and the IPO authors' normalisation);
    - ``hinge`` (SLiC): ``relu(1 - beta h)``;
    - ``robust`` (rDPO; Chowdhury et al. 2024): ``(-(1-e) log s(beta h) + e log s(-beta h)) / (1 - 2e)``, unbiased
      under labels flipped with probability ``e``.

    Rewards are ``beta * (logps - ref_logps)`` (summed log-ratios, as TRL logs them).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are detached.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type ipo normalises by answer length: pass chosen_lengths and rejected_lengths")
        h = (chosen_logratios / chosen_lengths.clamp(min=1.0)) - (rejected_logratios / rejected_lengths.clamp(min=1.0))
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_type robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss_type '{loss_type}'; known: {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): no reference; the reward is ``beta`` times the mean log-prob per answer token.

    ``losses = -(1-e) log s(beta m - gamma) - e log s(-(beta m - gamma))`` with ``m`` the difference of the mean
    per-token log-probs and ``gamma`` the target reward margin (TRL ``CPOTrainer``, ``loss_type="simpo"``,
    ``simpo_gamma``).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are detached.
    """
    chosen_avg = chosen_logps / chosen_lengths.clamp(min=1.0)  # (B,)
    rejected_avg = rejected_logps / rejected_lengths.clamp(min=1.0)
    logits = (chosen_avg - rejected_avg) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (branch at ``-ln 2``; Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024), on mean per-token log-probs; no reference.

    ``losses = -beta log s(log odds(chosen) - log odds(rejected))`` where ``odds(y) = p / (1 - p)`` and ``p`` is the
    mean per-token probability; the ORPO objective adds the chosen answer's NLL (the stage does). TRL's
    ``ORPOTrainer.odds_ratio_loss`` returns ``beta log s(...)``, subtracted from the NLL: the same loss.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards ``beta * mean log-prob``, detached.
    """
    chosen_avg = (chosen_logps / chosen_lengths.clamp(min=1.0)).float()  # (B,)
    rejected_avg = (rejected_logps / rejected_lengths.clamp(min=1.0)).float()
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen-answer token over the batch (the SFT term of RPO and ORPO)."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1.0)


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the chosen reward is higher, 0 when lower, 1/2 on a tie.

    A tie is a coin flip: at step 1 the policy is its reference, every DPO reward is 0, and the accuracy reads
    0.5 (TRL counts ties as wrong and reads 0).
    """
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
