"""Small models and masks shared by the cost tests."""

from __future__ import annotations

import torch
from torch import nn


def full(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bool)


def weight_names(model: nn.Module) -> list[str]:
    return [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, groups=4),  # grouped
            nn.BatchNorm2d(12),
            nn.Conv2d(12, 12, 1, groups=12, bias=False),  # depthwise
            nn.Conv2d(12, 6, 3, padding=1, padding_mode="reflect"),
        )
        self.conv1d = nn.Conv1d(6, 4, 2)
        self.head = nn.Linear(4 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, 6, 3, 3]
        x = self.conv1d(x.flatten(2))  # [N, 4, 8]
        return self.head(x.flatten(1))


class Tokens(nn.Module):
    """A linear layer on [batch, tokens, features], one applied twice, and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.mix = nn.Linear(10, 10)
        self.conv = nn.Conv3d(1, 2, (1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(torch.relu(self.mix(self.embed(x))))  # mix called twice
        return self.conv(h[:, None, None]).sum() + h.transpose(1, 2).sum()


class Wrapper(nn.Module):
    """Like a LightningModule: called with (batch, index) first, its network then called on tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.extra = nn.Linear(3, 3)  # outside `net`: not under the captured root

    def forward(self, batch, index=None):
        if isinstance(batch, tuple):
            x, _ = batch
            return self.net(x).sum() + self.net(x[:1]).sum() + self.extra(torch.ones(1, 3)).sum()
        return self.net(batch)
