"""A small plain MLP classifier: Linear + GELU layers, no residuals."""

from __future__ import annotations

from torch import Tensor, nn


class MLPClassifier(nn.Module):
    """``depth`` Linear layers (with bias) separated by GELU; returns logits [..., n_classes].

    ``depth`` counts Linear layers: depth=1 is a single linear map ``in_features -> n_classes``.
    """

    def __init__(
        self, in_features: int = 32, hidden: int = 128, n_classes: int = 10, depth: int = 3
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        dims = [in_features] + [hidden] * (depth - 1) + [n_classes]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
