"""The papers' auto-encoder problems (K App. D; Hinton & Salakhutdinov 2006).

| problem | architecture | activations | loss | batch |
|---|---|---|---|---|
| ``mnist``  | 784-1000-500-250-30-250-500-1000-784 | ReLU …, sigmoid out | BCE | 512 |
| ``faces``  | 625-2000-1000-500-30-500-1000-2000-625 | ReLU …, linear out | MSE | 1024 |
| ``curves`` | 784-400-200-100-50-25-6-25-50-100-200-400-784 | ReLU …, sigmoid out | BCE | 256 |
| ``cnn`` | cuda-convnet: 3 conv (5×5; 32, 32, 64) + 1 linear | ReLU, pooling | CE | 256 |
| ``deeplinear64`` | 64 × Linear(10, 10), batch norm between | none | MSE (teacher) | 512 |
| ``deeplinear14`` | 784-1000-900-…-50-20-10, batch norm between | none | CE | 512 |
| ``transformer`` | 2 pre-norm blocks, d 64, 4 heads, 128 characters | GELU | CE | 32 |
| ``gpt2`` | Hugging Face GPT-2, bytes; ``--size tiny`` 2 × 64 or ``small`` 12 × 768 | GELU | CE | 8 |

The first three are K App. D; the next three T §4.2-4.3; the two language models train on the
embedded stand-in text. Batch-norm parameters are not probed (the dataset attributes ``skipped_parameters``,
``skipped_modules`` and ``fisher_coverage`` say so). A problem may come in several sizes (``variants``,
``--size``, :meth:`Problem.sized`).

The sigmoid of the output layer is part of the loss (:class:`~fisherlab.losses.LossKind`
``bce`` on logits), so every model returns the last pre-activation. Layers are named
``"1"``, ``"2"``, … in forward order, as the papers count them ("layer 5").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf
from torch.utils.data import BatchSampler, RandomSampler

from fisherlab._errors import FisherlabError
from fisherlab.data import ImageData, load_images
from fisherlab.layers import probeable_layers
from fisherlab.vocabulary import LossKind, ProblemKind

__all__ = [
    "PROBLEMS",
    "AutoEncoder",
    "BasicBlock",
    "ConvNet",
    "DeepLinear",
    "Problem",
    "ProblemKind",
    "ResNet",
    "batch_indices",
    "get_problem",
    "register_problem",
    "training_batches",
]


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


class ConvNet(nn.Module):
    """cuda-convnet as used by Grosse & Martens (2016) and T §4.2: three 5×5 conv layers
    (32, 32, 64 channels, padding 2) with ReLU and 3×3 stride-2 pooling (max, avg, avg), then one
    linear layer; Conv2d/Linear layers are named ``"1"`` to ``"4"``."""

    def __init__(self, in_channels: int = 3, size: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.add_module("1", nn.Conv2d(in_channels, 32, 5, padding=2))
        self.add_module("2", nn.Conv2d(32, 32, 5, padding=2))
        self.add_module("3", nn.Conv2d(32, 64, 5, padding=2))
        side = size
        for _ in range(3):
            side = (side + 2 - 3) // 2 + 1
        self.add_module("4", nn.Linear(64 * side * side, n_classes))
        self.max_pool = nn.MaxPool2d(3, 2, padding=1)
        self.avg_pool = nn.AvgPool2d(3, 2, padding=1)
        self.act = nn.ReLU()
        self.size, self.in_channels = size, in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Logits for flattened or image-shaped input."""
        x = x.reshape(x.shape[0], self.in_channels, self.size, self.size)
        x = self.max_pool(self.act(getattr(self, "1")(x)))
        x = self.avg_pool(self.act(getattr(self, "2")(x)))
        x = self.avg_pool(self.act(getattr(self, "3")(x)))
        return getattr(self, "4")(x.flatten(1))


class DeepLinear(nn.Module):
    """Deep linear network with batch norm after every hidden Linear layer (T §4.3).

    Linear layers are ``"1"``, ``"2"``, …; batch-norm layers ``"bn1"``, … (not probed).
    """

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.n_layers = len(sizes) - 1
        for i in range(self.n_layers):
            self.add_module(str(i + 1), nn.Linear(sizes[i], sizes[i + 1]))
            if i < self.n_layers - 1:
                self.add_module(f"bn{i + 1}", nn.BatchNorm1d(sizes[i + 1]))

    def forward(self, x: Tensor) -> Tensor:
        """Output of the last Linear layer."""
        for i in range(1, self.n_layers + 1):
            x = getattr(self, str(i))(x)
            if i < self.n_layers:
                x = getattr(self, f"bn{i}")(x)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with batch norm, identity or 1×1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18/34 for 32×32 inputs (He et al. 2016, CIFAR variant: 3×3 stem, no max pool),
    built from torch modules, randomly initialised (no weights downloaded). T §4.2."""

    def __init__(self, blocks: tuple[int, int, int, int], n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for i, (n, c_out) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stage = [
                BasicBlock(c_in if j == 0 else c_out, c_out, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)
            ]
            layers.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for flattened or image-shaped ``3×32×32`` input."""
        x = x.reshape(x.shape[0], 3, 32, 32)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nnf.adaptive_avg_pool2d(x, 1), 1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + proj(causal attention(qkv(ln1 x)))``, then ``x + fc2(gelu(fc1(ln2 x)))``."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, d]`` to ``[N, T, d]``."""
        n, t, d = x.shape
        q, k, v = (
            z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1)
        )
        attended = nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nnf.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """A small decoder-only (GPT-style) character model: token and position embeddings, pre-norm
    blocks with causal attention, a final layer norm and a Linear head to the vocabulary logits.

    The Linear layers (``blocks.<i>.qkv``, ``.proj``, ``.fc1``, ``.fc2``, ``head``) act on every
    position: their per-sample Fisher factors have ``T`` = sequence length (weight sharing). The
    embeddings (``embed``; ``position``, called on ``[1, T]`` positions broadcast over the batch, as
    GPT-2's) and the layer norms are probed too (``--layers all``: every parameter, ``fisher_coverage`` 1).
    """

    def __init__(
        self, vocab: int = 128, d_model: int = 64, heads: int = 4, n_blocks: int = 2, length: int = 128
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(length, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads) for _ in range(n_blocks))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[N, T, vocab]`` of the next token at every position of ``tokens [N, T]``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # [1, T], broadcast over the batch
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _autoencoder(sizes: tuple[int, ...]) -> nn.Module:
    return AutoEncoder(list(sizes))


def _gpt2(sizes: tuple[int, ...]) -> nn.Module:
    """GPT-2 of ``sizes`` (:mod:`fisherlab.gpt2`): ``transformers`` is imported here, on first use only."""
    from fisherlab.gpt2 import gpt2_model

    return gpt2_model(sizes)


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: a network, its data and its loss.

    Args:
        name: CLI name (``--problem``).
        sizes: Layer widths of the MLPs (input first); for ``cnn`` the input ``(C, H, W)``; for
            ``transformer`` ``(vocabulary, d_model, heads, blocks, sequence length)``; for ``gpt2``
            ``(vocabulary, d_model, heads, layers, context)``.
        loss: Negative log-likelihood of the output.
        batch_size: The paper's batch size.
        description: One line for help texts.
        kind: Where the targets come from (:class:`ProblemKind`).
        default_layers: Layers probed when ``--layers`` is not given.
        build: ``sizes -> nn.Module``: a freshly initialised network (seeded by :meth:`model`).
        source: The data set :func:`~fisherlab.data.load_images` loads (default: ``name``); ignored
            by ``teacher`` problems, whose data are generated.
        variants: The named sizes ``--size`` chooses from, ``(name, sizes)`` pairs, the first
            equal to ``sizes`` (the default); empty for a problem that comes in one size.
    """

    name: str
    sizes: tuple[int, ...]
    loss: LossKind
    batch_size: int
    description: str
    kind: ProblemKind = ProblemKind.AUTOENCODER
    default_layers: tuple[str, ...] = ("5",)
    build: Callable[[tuple[int, ...]], nn.Module] = field(default=_autoencoder, repr=False)
    source: str = ""
    variants: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def sized(self, size: str | None) -> Problem:
        """This problem at the named size (``--size``): the same problem with that variant's
        ``sizes``; ``None`` is the problem as registered.

        Raises:
            FisherlabError: A size the problem does not have, or any size for a problem that comes
                in one size, naming the sizes there are.
        """
        if size is None:
            return self
        named = dict(self.variants)
        if size not in named:
            if not named:
                offered = [f"{p.name} ({', '.join(dict(p.variants))})" for p in PROBLEMS.values() if p.variants]
                raise FisherlabError(
                    f"--size {size}: problem {self.name} comes in one size; --size applies to "
                    f"{', '.join(offered) or 'no registered problem'}"
                )
            raise FisherlabError(f"--size {size}: problem {self.name} comes in sizes {', '.join(named)}")
        return replace(self, sizes=named[size])

    def layer_names(self) -> list[str]:
        """Names of the probeable layers (every registered layer kind), as ``--layers`` takes them."""
        with torch.device("meta"):
            return list(probeable_layers(self.model(device="meta")))

    def model(
        self, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> nn.Module:
        """A freshly initialised network (PyTorch default init, seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = self.build(self.sizes)
        return net.to(dtype=dtype, device=device)

    def data(self, data_dir: str | None = None, *, seed: int = 0) -> ImageData:
        """Embedded data (no download) or the real files from ``data_dir``.

        Raises:
            FisherlabError: Missing files, or real files without the labels a classifier needs.
        """
        if self.kind == "language":
            return load_images(self.source or "text", data_dir, seed=seed)
        if self.kind == "teacher":
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(12_000, self.sizes[0], generator=gen, dtype=torch.float32)  # whatever the default dtype
            return ImageData(
                x[:10_000], x[10_000:], "generated: Gaussian inputs, targets from a fixed random linear teacher"
            )
        data = load_images(self.source or self.name, data_dir, seed=seed)
        if self.kind == "classifier" and data.train_labels is None:
            raise FisherlabError(f"{self.name} needs class labels: add train-labels-idx1-ubyte[.gz] to {data_dir}")
        return data

    def targets(self, x: Tensor, labels: Tensor | None, *, seed: int = 0) -> Tensor:
        """Training targets of inputs ``x`` for this problem's ``kind``: the inputs (auto-encoders),
        the class labels (classifiers), or a fixed random linear teacher's output (seeded by ``seed``;
        the same map for training and validation data)."""
        if self.kind == "autoencoder":
            return x
        if self.kind == "language":  # next-token targets of character windows [N, T + 1]
            return x[:, 1:]
        if self.kind == "classifier":
            if labels is None:
                raise FisherlabError(f"{self.name} needs class labels")
            return labels.to(x.device)
        gen = torch.Generator().manual_seed(seed + 7)
        teacher = (
            torch.randn(self.sizes[0], self.sizes[-1], generator=gen, dtype=torch.float32).to(x) / self.sizes[0] ** 0.5
        )
        return x @ teacher

    def batches(
        self,
        data: ImageData,
        *,
        batch_size: int | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless training batches ``(x, y)`` for this problem (targets per ``kind``, :meth:`targets`)."""
        x = data.train.to(device=device, dtype=None if self.kind == "language" else dtype)  # tokens stay integers
        y = self.targets(x, data.train_labels, seed=seed)
        x = self.inputs(x)
        return ((x[i], y[i]) for i in batch_indices(x.shape[0], batch_size or self.batch_size, seed=seed))

    def inputs(self, x: Tensor) -> Tensor:
        """The network's input for data rows ``x``: all but the last token of a character window, else ``x``."""
        return x[:, :-1] if self.kind == "language" else x


#: Every registered problem by name: the choices of ``--problem`` and of the analyses.
PROBLEMS: dict[str, Problem] = {}


def register_problem(problem: Problem, *, overwrite: bool = False) -> Problem:
    """Add ``problem`` to :data:`PROBLEMS` (``fisherlab probe --problem NAME`` then runs it)."""
    if problem.name in PROBLEMS and not overwrite:
        raise FisherlabError(f"problem {problem.name!r} is already registered")
    PROBLEMS[problem.name] = problem
    return problem


_CLASSIFIER, _TEACHER, _LANGUAGE = ProblemKind.CLASSIFIER, ProblemKind.TEACHER, ProblemKind.LANGUAGE
_CIFAR = "cifar10"
#: GPT-2 widths ``(vocabulary, d_model, heads, layers, context)``: bytes, 2 blocks of width 64.
_GPT2_TINY = (256, 64, 4, 2, 128)

for _problem in (
    Problem(
        "transformer",
        (128, 64, 4, 2, 128),
        LossKind.CE,
        32,
        "small pre-norm transformer: 2 blocks, d 64, 4 heads, causal attention, 128-character sequences",
        _LANGUAGE,
        ("blocks.1.fc1",),
        build=lambda sizes: Transformer(*sizes),
        source="text",
    ),
    Problem(
        "gpt2",
        _GPT2_TINY,
        LossKind.CE,
        8,  # 8 x 128 tokens: every layer, the papers' five methods, both errors in ~15 s on one CPU thread
        "GPT-2 (Hugging Face transformers, fisherlab[hf]), byte vocabulary: --size tiny (2 x 64, 4 heads; "
        "the default) or small (12 x 768, 12 heads, context 1024)",
        _LANGUAGE,
        ("transformer.h.1.mlp.c_fc",),
        build=_gpt2,
        source="text",
        variants=(("tiny", _GPT2_TINY), ("small", (256, 768, 12, 12, 1024))),
    ),
    Problem(
        "curves", (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784), LossKind.BCE, 256, "CURVES auto-encoder"
    ),
    Problem("mnist", (784, 1000, 500, 250, 30, 250, 500, 1000, 784), LossKind.BCE, 512, "MNIST auto-encoder"),
    Problem("faces", (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625), LossKind.MSE, 1024, "FACES auto-encoder"),
    Problem(
        "cnn",
        (3, 32),
        LossKind.CE,
        256,
        "cuda-convnet on CIFAR-10 (T §4.2)",
        _CLASSIFIER,
        ("2",),
        build=lambda sizes: ConvNet(*sizes[:2]),
        source=_CIFAR,
    ),
    Problem(
        "resnet18",
        (3, 32),
        LossKind.CE,
        128,
        "ResNet-18 (T §4.2; CIFAR-100 there, CIFAR-10 stand-in here)",
        _CLASSIFIER,
        ("fc",),
        build=lambda sizes: ResNet((2, 2, 2, 2)),
        source=_CIFAR,
    ),
    Problem(
        "resnet34",
        (3, 32),
        LossKind.CE,
        512,
        "ResNet-34 (T §4.2; SVHN there, CIFAR-10 stand-in here)",
        _CLASSIFIER,
        ("fc",),
        build=lambda sizes: ResNet((3, 4, 6, 3)),
        source=_CIFAR,
    ),
    Problem(
        "deeplinear64",
        (10,) * 65,
        LossKind.MSE,
        512,
        "64 linear layers of 10 units with batch norm (T §4.3)",
        _TEACHER,
        ("32",),
        build=lambda sizes: DeepLinear(list(sizes)),
    ),
    Problem(
        "deeplinear14",
        (784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10),
        LossKind.CE,
        512,
        "784-1000-…-20-10 linear network with batch norm on MNIST (T §4.3)",
        _CLASSIFIER,
        ("10",),
        build=lambda sizes: DeepLinear(list(sizes)),
        source="mnist",
    ),
):
    register_problem(_problem)


def get_problem(name: str) -> Problem:
    """Look up a problem by name.

    Raises:
        FisherlabError: For an unknown name, listing the known ones.
    """
    if name not in PROBLEMS:
        raise FisherlabError(f"unknown problem {name!r}; choose one of: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def batch_indices(n: int, batch_size: int, *, seed: int = 0) -> Iterator[Tensor]:
    """Endless shuffled index batches, epoch after epoch, last partial batch dropped.

    ``torch.utils.data.RandomSampler`` with its own seeded generator inside a ``BatchSampler``,
    so nothing else (the probe's sampling included) changes the order. When ``batch_size``
    exceeds ``n``, whole reshuffled data sets are yielded.
    """
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    batches = BatchSampler(sampler, min(batch_size, n), drop_last=True)
    for epoch in itertools.count():
        del epoch
        for indices in batches:
            yield torch.as_tensor(indices)


def training_batches(images: Tensor, batch_size: int, *, seed: int = 0) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of ``images`` (see :func:`batch_indices`)."""
    return (images[i] for i in batch_indices(images.shape[0], batch_size, seed=seed))
