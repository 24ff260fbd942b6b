"""Losses for fine-tuning: causal-LM cross-entropy on response tokens, and knowledge distillation.

Both take logits over the whole sequence and labels in the Hugging Face convention: `labels[b, t]` is the
token at position t, or -100 where the position does not count (prompt, padding). The prediction for
position t comes from the logits at position t - 1, so both losses shift by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the positions whose label is not -100.

    logits: (batch, tokens, vocab); labels: (batch, tokens). Returns (loss, n_counted) where loss is a
    scalar (0 with a gradient path when nothing counts) and n_counted the number of counted tokens.
    """
    shifted_logits = logits[:, :-1, :].float()  # (batch, tokens - 1, vocab)
    shifted_labels = labels[:, 1:]  # (batch, tokens - 1)
    mask = shifted_labels != IGNORE_INDEX
    count = mask.sum()
    if count == 0:
        return shifted_logits.sum() * 0.0, count
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / count, count


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL(teacher || student) of the temperature-softened next-token distributions.

    student_logits, teacher_logits: (batch, tokens, vocab) over the same vocabulary; labels: (batch, tokens),
    -100 where a position does not count. The KL is summed over the vocabulary, averaged over counted
    positions and multiplied by temperature**2 so its gradient scale does not depend on the temperature
    (Hinton et al. 2015, sec. 2). Zero when the two logits agree; a scalar.
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (batch, tokens - 1)
    student = student_logits[:, :-1, :][mask].float() / temperature  # (counted, vocab)
    teacher = teacher_logits[:, :-1, :][mask].float() / temperature
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    student_log_probs = F.log_softmax(student, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)  # (counted,)
    return kl.mean() * temperature**2


def combined_loss(ce: torch.Tensor, kd: torch.Tensor | None, kd_weight: float) -> torch.Tensor:
    """(1 - w) * cross-entropy + w * KD, torchtune's KD recipe; plain cross-entropy without a teacher."""
    if kd is None or kd_weight == 0:
        return ce
    return (1.0 - kd_weight) * ce + kd_weight * kd
