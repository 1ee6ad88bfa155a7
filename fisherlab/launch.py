"""Before a ``fisherlab probe`` run of a paper problem: the layers it names, whether a snapshot fits in
memory, the process group ``torchrun`` describes, and the problem's model, optimizer and batches.

Each refuses a run that cannot work with one line, before any work: unknown layers
(:func:`resolve_layers`), a snapshot beyond the memory there is (:func:`check_memory`), a
process that disagrees with the others on the configuration (:func:`join_process_group`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
from torch import Tensor, nn
from torch import distributed as dist

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.data import ImageData
from fisherlab.distributed import init_from_environment
from fisherlab.layers import kronecker_layers, layer_kind, layer_structure, probeable_layers
from fisherlab.problems import Problem
from fisherlab.results import config_json
from fisherlab.vocabulary import BlockStructure

__all__ = [
    "available_bytes",
    "build_training",
    "check_memory",
    "join_process_group",
    "resolve_layers",
    "snapshot_bytes",
]


def resolve_layers(problem: Problem, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The layers ``--layers`` names on ``problem``: ``all`` is every probeable layer (every registered
    kind: embeddings and layer norms too), ``trainable`` those with a trainable parameter (all of them:
    a problem's model trains every parameter).

    Raises:
        FisherlabError: Unknown layer names, listing the problem's layers.
    """
    known = problem.layer_names()
    if tuple(layers) in (("all",), ("trainable",)):
        return tuple(known)
    bad = [name for name in layers if name not in known]
    if bad or not layers:
        listing = f"1 to {known[-1]}" if all(n.isdigit() for n in known) else ", ".join(known)
        raise FisherlabError(f"unknown layers {bad} for {problem.name}: it has layers {listing} (or all, trainable)")
    return tuple(layers)


def snapshot_bytes(problem: Problem, data: ImageData, config: ProbeConfig, batch_size: int) -> dict[str, float]:
    """An estimate of the memory one snapshot of a ``fisherlab probe`` run holds at once, in bytes:
    ``factors`` (every probed layer's per-sample factors, ``N (T d_in + V T d_out)`` numbers in float64)
    and ``gram`` (the largest layer's ``N V x N V`` Gram matrix); shapes from a forward pass on the meta
    device (no memory, no compute). ``V``: ``--mc-samples``, the number of outputs for ``exact``, 1 for
    ``empirical``."""
    model = problem.model(device="meta").eval()  # one sample: batch norm in training mode would refuse it
    layers = probeable_layers(model)
    probed = kronecker_layers(model) if config.two_level else {name: layers[name] for name in config.layers}
    shapes: dict[str, tuple[int, int, int]] = {}  # name -> (T, d_in, d_out)

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            shapes[name] = _factor_shape(module, inputs[0], output, batch_size)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in probed.items()]
    try:
        output = model(problem.inputs(data.train[:1].to("meta")))
    finally:
        for handle in handles:
            handle.remove()
    v = {"mc": config.mc_samples, "exact": output[0].numel(), "empirical": 1}[config.fisher.value]
    n = batch_size
    factors = sum(n * (t * d_in + v * t * d_out) * 8 for t, d_in, d_out in shapes.values())
    return {"factors": float(factors), "gram": float((n * v) ** 2 * 8), "directions": v}


def _factor_shape(module: nn.Module, x: Tensor, output: Tensor, n: int) -> tuple[int, int, int]:
    """``(T, d_in, d_out)`` of one call's factors from its input and output shapes (meta tensors: no data)."""
    structure, kind = layer_structure(module), layer_kind(module)
    if structure is BlockStructure.ELEMENTWISE:
        return 1, 1, sum(p.numel() for p in module.parameters(recurse=False))
    if kind is not None and kind.one_hot is not None:  # compact one-hot: at most N T columns
        t = x[0].numel()
        return t, min(n * t, kind.one_hot(module)), output.shape[-1]
    if isinstance(module, nn.Conv2d):
        d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output[0].numel() // module.out_channels, d_in + (module.bias is not None), module.out_channels
    d_in = x.shape[-1]
    return x[0].numel() // d_in, d_in + (getattr(module, "bias", None) is not None), output.shape[-1]


def available_bytes(device: torch.device) -> float | None:
    """Memory a run may still take: free GPU memory on CUDA, ``MemAvailable`` on Linux; ``None`` if unknown."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(problem: Problem, data: ImageData, config: ProbeConfig, device: torch.device) -> None:
    """Refuse, before any work, a run whose snapshot cannot fit in memory (instead of the OOM killer).

    Raises:
        FisherlabError: The estimate of :func:`snapshot_bytes` exceeds the available memory; names the
            setting that matters most.
    """
    available = available_bytes(device)
    if available is None:
        return
    n = config.batch_size or problem.batch_size
    need = snapshot_bytes(problem, data, config, min(n, data.train.shape[0]))
    total = need["factors"] + need["gram"]
    if total <= available:
        return
    v = int(need["directions"])
    settings = {
        "mc-samples": f"--mc-samples {v}" if config.fisher.value == "mc" and v > 1 else "",
        "layers": f"the --layers probed ({len(config.layers)})" if len(config.layers) > 1 else "",
        "batch-size": f"--batch-size {n}",
    }
    order = (
        ["mc-samples", "batch-size", "layers"]
        if need["gram"] > need["factors"]
        else ["mc-samples", "layers", "batch-size"]
    )
    named = [settings[key] for key in order if settings[key]]
    raise FisherlabError(
        f"a snapshot needs about {total / 2**30:.1f} GiB (per-sample factors {need['factors'] / 2**30:.1f} GiB, "
        f"Gram matrix of {n} x {v} directions {need['gram'] / 2**30:.1f} GiB) but {available / 2**30:.1f} GiB of "
        f"{'GPU ' if device.type == 'cuda' else ''}memory are available; lower {' or '.join(named)}"
    )


def join_process_group(device: torch.device, config: ProbeConfig) -> bool:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA) after a handshake
    of world size and configuration (:func:`~fisherlab.distributed.init_from_environment`: a
    mismatch fails at once, with one line); ``True`` when this call joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=int(os.environ.get("FISHERLAB_DIST_TIMEOUT", "300")))
    init_from_environment(backend, timeout, settings=config_json(config))
    return True


def build_training(
    problem: Problem, data: ImageData, config: ProbeConfig, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, torch.optim.Optimizer, Iterator[tuple[Tensor, Tensor]]]:
    """The paper problem's model (seeded), optimizer (``config.optimizer``: Adam, or SGD with momentum 0.9)
    and endless batches, as :func:`~fisherlab.probe_loop.probe_training` trains and probes them."""
    model = problem.model(seed=config.seed, dtype=dtype, device=device)
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr or 1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr or 1e-2, momentum=0.9)
    batches = problem.batches(data, batch_size=config.batch_size, seed=config.seed, device=device, dtype=dtype)
    return model, optimizer, batches
