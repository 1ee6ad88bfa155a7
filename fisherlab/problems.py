"""The papers' auto-encoder problems (K App. D; Hinton & Salakhutdinov 2006).

| problem | architecture | activations | loss | batch |
|---|---|---|---|---|
| ``mnist``  | 784-1000-500-250-30-250-500-1000-784 | ReLU …, sigmoid out | BCE | 512 |
| ``faces``  | 625-2000-1000-500-30-500-1000-2000-625 | ReLU …, linear out | MSE | 1024 |
| ``curves`` | 784-400-200-100-50-25-6-25-50-100-200-400-784 | ReLU …, sigmoid out | BCE | 256 |

The sigmoid of the output layer is part of the loss (:class:`~fisherlab.probe.LossKind`
``bce`` on logits), so every model returns the last pre-activation. Layers are named
``"1"``, ``"2"``, … in forward order, as the papers count them ("layer 5").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisherlab._errors import FisherlabError
from fisherlab.data import ImageData, load_images
from fisherlab.probe import LossKind

__all__ = ["PROBLEMS", "AutoEncoder", "Problem", "get_problem", "training_batches"]


class AutoEncoder(nn.Module):
    """A ReLU MLP whose Linear layers are the attributes ``"1"``, ``"2"``, … (module paths).

    Args:
        sizes: Layer widths, input first.
    """

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.n_layers = len(sizes) - 1
        for i in range(self.n_layers):
            self.add_module(str(i + 1), nn.Linear(sizes[i], sizes[i + 1]))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Return the output layer's pre-activation (logits for BCE)."""
        for i in range(1, self.n_layers + 1):
            x = getattr(self, str(i))(x)
            if i < self.n_layers:
                x = self.act(x)
        return x


@dataclass(frozen=True)
class Problem:
    """One of the papers' benchmark problems."""

    name: str
    sizes: tuple[int, ...]
    loss: LossKind
    batch_size: int
    description: str

    @property
    def n_layers(self) -> int:
        """Number of Linear layers."""
        return len(self.sizes) - 1

    def model(self, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoEncoder:
        """A freshly initialised network (PyTorch default init, seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = AutoEncoder(list(self.sizes))
        return net.to(dtype=dtype, device=device)

    def data(self, data_dir: str | None = None, *, seed: int = 0) -> ImageData:
        """Embedded images (no download) or the real files from ``data_dir``."""
        return load_images(self.name, data_dir, seed=seed)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("curves", (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784), LossKind.BCE, 256, "CURVES auto-encoder"),
        Problem("mnist", (784, 1000, 500, 250, 30, 250, 500, 1000, 784), LossKind.BCE, 512, "MNIST auto-encoder"),
        Problem("faces", (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625), LossKind.MSE, 1024, "FACES auto-encoder"),
    )
}


def get_problem(name: str) -> Problem:
    """Look up a problem by name.

    Raises:
        FisherlabError: For an unknown name, listing the known ones.
    """
    if name not in PROBLEMS:
        raise FisherlabError(f"unknown problem {name!r}; choose one of: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def training_batches(images: Tensor, batch_size: int, *, seed: int = 0) -> Iterator[Tensor]:
    """Endless shuffled mini-batches (epoch after epoch, last partial batch dropped).

    Uses its own generator, so nothing else (the probe's sampling included) changes the order.
    When ``batch_size`` exceeds the data set, whole reshuffled data sets are yielded.
    """
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield images[perm[start : start + size]]
