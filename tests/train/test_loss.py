import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from molre.train.loss import FocalLoss, prevalence_alpha


@pytest.mark.parametrize("alpha", [0.25, 0.7, None])
def test_scalar_alpha_equals_torchvision(alpha):
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 75) * 3, (torch.rand(6, 75) < 0.2).float()
    ours = FocalLoss(gamma=2.0, alpha=alpha)(logits, targets)
    ref = sigmoid_focal_loss(
        logits, targets, alpha=-1 if alpha is None else alpha, gamma=2.0, reduction="mean"
    )
    torch.testing.assert_close(ours, ref)


def test_per_class_alpha_and_unknown_mask():
    torch.manual_seed(1)
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    alpha = np.array([0.9, 0.5, 0.25], dtype=np.float32)
    loss = FocalLoss(gamma=1.5, alpha=alpha)
    per_class = [
        sigmoid_focal_loss(logits[:, c], targets[:, c], alpha=float(alpha[c]), gamma=1.5) for c in range(3)
    ]
    torch.testing.assert_close(loss.elementwise(logits, targets), torch.stack(per_class, dim=1))
    known = torch.tensor([[1.0, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]])
    masked = loss(logits, targets, known)
    expected = (loss.elementwise(logits, targets) * known).sum() / known.sum()
    torch.testing.assert_close(masked, expected)
    changed = targets.clone()
    changed[0, 2] = 0  # an unknown entry: its value must not matter
    torch.testing.assert_close(loss(logits, changed, known), masked)


def test_prevalence_alpha_weights_rare_findings_more():
    labels = np.zeros((100, 3))
    labels[:50, 0], labels[:5, 1] = 1, 1
    alpha = prevalence_alpha(labels, clip=(0.25, 0.95))
    np.testing.assert_allclose(alpha, [0.5, 0.95, 0.95])
    known = np.ones_like(labels)
    known[50:, 0] = 0  # only the positives of class 0 are annotated -> prevalence 1 -> clipped to 0.25
    assert prevalence_alpha(labels, known)[0] == pytest.approx(0.25)
