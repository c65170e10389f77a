"""The student/teacher projection head: NeCo's 3-layer MLP applied to every patch token."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """`num_layers` linear layers (GELU between them) mapping backbone width to `out_dim`.

    The recipe is 3 layers, hidden 2048, output 256. The head only exists during
    post-pretraining: ordering is learned in its output space while the backbone's own
    features, the thing that is exported, are shaped through it.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection head needs at least one layer, got num_layers={num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens)
