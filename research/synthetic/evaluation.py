"""Loss and accuracy on answer tokens only.

The language-model head is applied only at the positions that predict an answer (``labels[:, 1:] != -100``), so a
long sequence never builds full ``[B, T, vocab]`` logits. Accuracy is exact per token (argmax equals the answer)
and per sequence (every answer of the sequence right).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.nn.functional as F

from .tasks import IGNORE


def autocast(device: torch.device, bf16: bool) -> ContextManager:
    """bf16 autocast on CUDA when asked, else nothing (fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def answer_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the answer-predicting positions of a ``KimiLinearForCausalLM``.

    Returns ``(logits [N, vocab] float32, targets [N], asked [B, T-1] bool)``: ``asked[b, t]`` marks position ``t``
    predicting answer ``labels[b, t + 1]``; the N rows are those positions in row-major order.
    """
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    asked = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][asked]).float()
    return logits, targets[asked], asked


def answer_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch."""
    logits, targets, _ = answer_logits(model, input_ids, labels)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int, bf16: bool = False
) -> dict[str, float]:
    """Answer-token loss, per-token accuracy and per-sequence accuracy of ``model`` on a fixed batch.

    ``batch`` holds ``input_ids`` / ``labels`` ``[n, T]`` (on any device; moved to the model's). The model is put
    in eval mode and given back in the mode it was in.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, answers, seq_right, seqs = 0.0, 0, 0, 0, 0
    try:
        for start in range(0, batch["input_ids"].shape[0], batch_size):
            ids = batch["input_ids"][start : start + batch_size].to(device)
            labels = batch["labels"][start : start + batch_size].to(device)
            with autocast(device, bf16):
                logits, targets, asked = answer_logits(model, ids, labels)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            hit = logits.argmax(-1) == targets
            correct += int(hit.sum())
            answers += targets.numel()
            # a sequence is right when none of its answers is wrong
            wrong = torch.zeros_like(asked)
            wrong[asked] = ~hit
            seq_right += int((~wrong.any(1) & asked.any(1)).sum())
            seqs += int(asked.any(1).sum())
    finally:
        model.train(was_training)
    if answers == 0:
        raise ValueError("the evaluation batch has no answer tokens (every label is -100)")
    return {"eval_loss": loss_sum / answers, "accuracy": correct / answers, "seq_accuracy": seq_right / seqs}
