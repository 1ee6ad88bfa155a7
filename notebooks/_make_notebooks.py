"""Regenerate the notebooks (outputs empty) from the cell sources below: python notebooks/_make_notebooks.py"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """import os
SMOKE = os.environ.get("FISHERLAB_SMOKE") == "1"   # small settings when the test suite runs this notebook
import matplotlib
if SMOKE:
    matplotlib.use("Agg")
from pathlib import Path
import tempfile
import torch
import fisherlab as fl
from fisherlab import plots
OUT = Path(tempfile.mkdtemp()) if SMOKE else Path("../data")
OUT.mkdir(exist_ok=True)"""

NOTEBOOKS = {
    "01_probe_one_layer.ipynb": [
        (
            "md",
            "# Probe a model and inspect one layer\n\nThe exact Fisher block of layer 5 of the CURVES auto-encoder next to KFAC and the four approximations of Koroko et al. (K): heatmaps, spectra, error 1 and error 2.",
        ),
        ("code", SETUP),
        (
            "code",
            """problem = fl.get_problem("curves")
model = problem.model(seed=0, dtype=torch.float64)
data = problem.data(seed=0)
x = data.train[: 64 if SMOKE else 256].double()
snap = fl.Probe(model, problem.loss, layers=["5"], fisher="mc")(x, x)
block = snap.blocks()["5"]
print(block.factors.a.shape, block.factors.g.shape, "block side", block.dim)""",
        ),
        (
            "code",
            """approx = fl.approximate_all(block, list(fl.Method))
ref = fl.BlockReference.of(block)
for m, a in approx.items():
    print(f"{m:15s} error 1 {float(fl.frobenius_error(ref, a.kron)):.4f}   error 2 {float(fl.spectral_error(ref, a.kron)):.4f}   "
          f"iterations {a.iterations}  converged {a.converged}")""",
        ),
        (
            "code",
            """dense = {m: a.kron.as_dense() for m, a in approx.items()}
fig = plots.block_heatmaps(block.as_dense(), dense, max_side=200)""",
        ),
        (
            "code",
            """spectra = {"exact": ref.eigenvalues} | {m: a.kron.eigenvalues() for m, a in approx.items()}
fig = plots.spectra_figure(spectra)""",
        ),
    ],
    "02_error_vs_iteration.ipynb": [
        (
            "md",
            "# Error vs iteration (K Figure 1)\n\nTrain the CURVES auto-encoder with Adam and probe layer 5 every 10 iterations; the dataset is an ordinary xarray object.",
        ),
        ("code", SETUP),
        (
            "code",
            """config = fl.ProbeConfig(problem="curves", layers=("5",), iterations=8 if SMOKE else 500, every=4 if SMOKE else 10)
ds = fl.run_probe(config, OUT / "nb_fig1.nc", overwrite=True, progress=not SMOKE)
ds""",
        ),
        ("code", """fig = plots.error_figure(ds)"""),
        (
            "code",
            """# dim "method" collides with .sel's own keyword: select with a dict
err = ds.frobenius_error.sel({"layer": "5"})
(err.sel({"method": "kfac"}) >= err).all("method").mean().item()   # fraction of snapshots where KFAC is the worst""",
        ),
    ],
    "03_two_level.ipynb": [
        (
            "md",
            (
                "# Two-level KFAC: gaps and energy errors (T Figure 5)\n\nE(β*) − E(0) for each coarse space and TKO, and the distance of every increment to the exact damped natural gradient (Woodbury).\n\n"
                "**Expected time: about 1–2 min on a laptop CPU** (3 snapshots of every layer, KFAC and KPSVD, batch 128). "
                "Two-level runs probe every layer, so each snapshot costs far more than a one-layer probe; the paper-scale settings "
                "(commented in the code cell below) take hours on a CPU."
            ),
        ),
        ("code", SETUP),
        (
            "code",
            """# about 1-2 min on a laptop CPU; paper scale (T Figure 5, hours on a CPU, use a GPU):
#   iterations=1000, every=50, batch_size=None (the paper's 256), methods=tuple(fl.Method)
SPACES = ("nicolaides", "spectral", "krylov_nicolaides", "residuals", "krylov_residuals", "taylor", "tko")  # T §3.3, §4.4
config = fl.ProbeConfig(problem="curves", two_level=True, damping=1e-3, metrics=("frobenius_error",),
                        iterations=1 if SMOKE else 40, every=1 if SMOKE else 20, batch_size=32 if SMOKE else 128,
                        methods=("kfac",) if SMOKE else ("kfac", "kpsvd"),
                        coarse_spaces=("nicolaides", "residuals", "tko") if SMOKE else SPACES)
ds = fl.run_probe(config, OUT / "nb_gap.nc", overwrite=True, progress=not SMOKE)
ds.gap.to_pandas()""",
        ),
        ("code", """fig = plots.two_level_figure(ds)"""),
        (
            "code",
            """(ds.energy_two_level / ds.energy_kfac).to_pandas()   # E(β*) / E(0): how much closer each correction gets""",
        ),
    ],
    "04_optimizers.ipynb": [
        (
            "md",
            (
                "# The methods as optimizers (K Figure 2, T Figures 2–4)\n\n**Expected time: about 1–2 min on a laptop CPU**: a short comparison "
                "(3 epochs of 10 batches each, losses measured on 1 024 images). The paper-scale settings are commented in the code cell "
                "(hours on a CPU); `fisherlab train` or `analyses/fig2_optimizers.py` run them too."
            ),
        ),
        ("code", SETUP),
        (
            "code",
            """from fisherlab.config import TrainConfig
from fisherlab.train import run_training
# about 1-2 min on a laptop CPU; paper scale (K Figure 2, hours on a CPU, use a GPU):
#   epochs=100, max_batches=None, eval_samples=None, lr=(1e-2, 1e-1, 1.0), damping=(1e-3, 1e-2, 1e-1), patience=10
config = TrainConfig(problem="curves", optimizers=("sgd", "adam", "kfac", "kpsvd", "kfac2l_residuals"),
                     epochs=1 if SMOKE else 3, max_batches=1 if SMOKE else 10, eval_samples=256 if SMOKE else 1024)
ds = run_training(config, OUT / "nb_train.nc", overwrite=True, progress=not SMOKE)
ds.train_loss.to_pandas()""",
        ),
        ("code", """fig = plots.training_figure(ds)"""),
    ],
    "05_bring_your_own_model.ipynb": [
        (
            "md",
            "# Bring your own model and data\n\nAny `nn.Module` built from Linear/Conv2d layers, any loss among mse / bce / ce, any batch iterator.",
        ),
        ("code", SETUP),
        (
            "code",
            """import itertools
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 7 * 7, 10))
digits = fl.get_problem("mnist").data()   # bundled stand-in: UCI digits on a 28x28 canvas, with labels
x = torch.nn.functional.avg_pool2d(digits.train.reshape(-1, 1, 28, 28), 4)   # your own images would go here: [N, 1, 7, 7]
y = digits.train_labels
batches = ((x[i], y[i]) for i in itertools.cycle(torch.randperm(len(x)).split(64)[:-1]))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)""",
        ),
        (
            "code",
            """config = fl.ProbeConfig(iterations=6 if SMOKE else 200, every=3 if SMOKE else 20, fisher="exact")
ds = fl.probe_training(model, "ce", batches, optimizer, config, layers=["0", "3"], progress=not SMOKE)
ds.frobenius_error.sel({"layer": "3"}).to_pandas()""",
        ),
        ("code", """fig = plots.error_figure(ds)"""),
        (
            "md",
            "Or keep your own training loop: `FisherProbe.step` probes every `every` steps and leaves training untouched.",
        ),
        (
            "code",
            """probe = fl.FisherProbe(model, loss="ce", every=2, layers=["3"], methods=["kfac", "kpsvd", "deflation"])
for step in range(5 if SMOKE else 50):
    xb, yb = next(batches)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    probe.step(step, xb, yb)
probe.close().frobenius_error.sel({"layer": "3"}).to_pandas()""",
        ),
        (
            "code",
            """# factors captured elsewhere: build the exact Fisher straight from tensors
a, g = torch.randn(32, 1, 6, dtype=torch.float64), torch.randn(32, 1, 1, 4, dtype=torch.float64)
block = fl.ExactBlock(fl.LayerFactors(a, g))
fl.frobenius_error(fl.BlockReference.of(block), fl.kpsvd(block).kron)""",
        ),
    ],
    "06_method_zoo.ipynb": [
        (
            "md",
            (
                "# The method zoo against the exact Fisher (issue 18)\n\nEvery registered method — the papers' five and "
                "EKFAC, TKFAC, KFAC-reduce, Shampoo², Shampoo, eShampoo (SOAP's basis), diagonal, low rank — on layer 5 of the "
                "MNIST auto-encoder and on two Linear layers of the small transformer, scored by error 1 (relative Frobenius) "
                "and error 2 (relative spectral). Figures: error vs iteration coloured by family, and the method × layer "
                "heatmap of median error 1. Then two published claims: EKFAC's gain over KFAC is mostly the eigenvalues, "
                "not the basis; Shampoo² is close to KPSVD (the Frobenius-optimal Kronecker product).\n\n"
                "**Expected time: about 2–4 min on a laptop CPU.** `analyses/zoo_methods.py` runs the full study "
                "(ResNet-18 included); the embedded data are stand-ins, so numbers differ from real MNIST."
            ),
        ),
        ("code", SETUP),
        (
            "code",
            """methods = tuple(fl.METHODS)   # every registered method (--methods all)
config = fl.ProbeConfig(problem="mnist", layers=("5",), methods=methods, iterations=1 if SMOKE else 100,
                        every=1 if SMOKE else 20, batch_size=16 if SMOKE else 512)
ds = fl.run_probe(config, OUT / "nb_zoo_mnist.nc", overwrite=True, progress=not SMOKE)
ds[["frobenius_error", "spectral_error"]].median("iteration").sel({"layer": "5"}).to_pandas()""",
        ),
        ("code", """fig = plots.error_figure(ds)"""),
        ("code", """fig = plots.summary_figure(ds, "frobenius_error")"""),
        (
            "code",
            """# EKFAC = KFAC's eigenbasis with the eigenvalues re-fitted (the diagonal of F in that basis): its error is
# what KFAC's basis leaves; (KFAC - EKFAC) / KFAC is the share of KFAC's error that is the eigenvalues'.
# Shampoo² = c L ⊗ R is one power-SVD step from the identity: how close is it to KPSVD, the optimum?
med = ds.frobenius_error.median("iteration").sel({"layer": "5"})
e1 = {str(m): float(med.sel({"method": m})) for m in med["method"].values}
print(f"EKFAC {e1['ekfac']:.4g} vs KFAC {e1['kfac']:.4g}: eigenvalues' share {(e1['kfac'] - e1['ekfac']) / e1['kfac']:.1%}; "
      f"eShampoo (Shampoo's basis, same re-fit) {e1['eshampoo']:.4g}")
print(f"Shampoo² / KPSVD error 1: {e1['shampoo2'] / e1['kpsvd']:.3f}")""",
        ),
        (
            "md",
            (
                "A layer shared over positions: the transformer's attention input and MLP. KFAC-reduce (inputs averaged, "
                "output derivatives summed over the positions first) against KFAC-expand (`kfac`) and the rest."
            ),
        ),
        (
            "code",
            """config = fl.ProbeConfig(problem="transformer", layers=("blocks.0.proj",) if SMOKE else ("blocks.0.qkv", "blocks.0.fc1"),
                        methods=methods, iterations=1 if SMOKE else 20, every=1 if SMOKE else 20,
                        batch_size=2 if SMOKE else 8, metrics=("frobenius_error",))
tr = fl.run_probe(config, OUT / "nb_zoo_transformer.nc", overwrite=True, progress=not SMOKE)
fig = plots.summary_figure(tr, "frobenius_error")""",
        ),
    ],
    "07_hugging_face.ipynb": [
        (
            "md",
            (
                "# Probe a Hugging Face model\n\nA tiny GPT-2 (`transformers.GPT2LMHeadModel`, random init, no download) "
                "trained a few hundred steps on the embedded stand-in text, in an ordinary Hugging Face loop: dict batches "
                "(`input_ids`, `attention_mask`, `labels` with `-100` at the pads), `loss = model(**batch).loss`. "
                '`fl.FisherProbe(model, loss="causal_lm", layers="all")` probes every parameterised layer — the Conv1D '
                "projections of attention and MLP, both embeddings (`wte` tied to `lm_head`: one block for the shared weight), "
                "every layer norm — and the figure shows each kind's error over training.\n\n"
                "**Expected time: about 2 min on a laptop CPU** (300 training steps, 7 snapshots of 15 layers; 2 min 10 s "
                'measured on a loaded 2-core machine). Needs `pip install "fisherlab[hf]"`.'
            ),
        ),
        ("code", SETUP),
        (
            "code",
            """import transformers
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,   # bytes in, bytes out
                                 bos_token_id=None, eos_token_id=None,              # a byte vocabulary has no special tokens
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)   # no dropout: the probe sees the trained model
model = transformers.GPT2LMHeadModel(config)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; lm_head tied to wte: {model.lm_head.weight is model.transformer.wte.weight}")""",
        ),
        (
            "code",
            """# the embedded stand-in text (docstrings of Python's standard library) as 128-byte sequences, right-padded to
# random lengths the way a collator pads a batch of documents: attention_mask 0 and labels -100 at the pads
windows = fl.get_problem("gpt2").data().train[:, :128]
length, batch_size = (32, 2) if SMOKE else (128, 8)

def dict_batches(windows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        for rows in torch.randperm(len(windows), generator=gen).split(batch_size)[:-1]:
            ids = windows[rows, :length]
            mask = (torch.arange(length) < torch.randint(length // 2, length + 1, (len(rows), 1), generator=gen)).long()
            yield {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

batches = dict_batches(windows)
{k: v.shape for k, v in next(dict_batches(windows)).items()}""",
        ),
        (
            "code",
            """import warnings
# the Kronecker methods do not apply to the layer norms (elementwise blocks): their errors are NaN and the attribute
# methods_not_applicable says so (printed below), instead of this warning
warnings.filterwarnings("ignore", message="methods that do not apply")
steps, every = (2, 2) if SMOKE else (300, 50)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
probe = fl.FisherProbe(model, loss="causal_lm", every=every, layers="all", methods=["kfac", "kpsvd", "ekfac", "diagonal"],
                       out=OUT / "nb_gpt2.nc", overwrite=True)   # error 1 of every layer and method, every `every` steps
for step in range(steps + 1):
    batch = next(batches)
    probe.step(step, batch)            # on the batch this step trains on; leaves training untouched
    if step < steps:
        loss = model(**batch).loss     # Hugging Face's mean over the batch's tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
ds = probe.close()
print(f"fisher_coverage {ds.attrs['fisher_coverage']}, skipped: {ds.attrs['skipped_parameters']}")
print("not applicable:", ds.attrs["methods_not_applicable"])
ds.frobenius_error.isel(iteration=-1).to_pandas().round(3)""",
        ),
        (
            "code",
            """import matplotlib.pyplot as plt

def role(layer):
    \"\"\"attention, MLP, embeddings or norms, from the Hugging Face module path\"\"\"
    return "attention" if ".attn." in layer else "MLP" if ".mlp." in layer else "norms" if ".ln_" in layer else "embeddings"

err = ds.frobenius_error   # [iteration, layer, method]; NaN where a method does not apply (Kronecker methods on a norm)
kinds = ["attention", "MLP", "embeddings", "norms"]
fig, axes = plt.subplots(1, len(kinds), figsize=(15, 3.6), sharey=True, layout="constrained")
for ax, kind in zip(axes, kinds):
    names = [str(layer) for layer in err["layer"].values if role(str(layer)) == kind]
    median = err.sel({"layer": names}).median("layer")
    for method in map(str, err["method"].values):
        if bool(median.sel({"method": method}).notnull().any()):
            color, marker, dashes = plots.method_style(method)
            ax.plot(err["iteration"], median.sel({"method": method}), color=color, marker=marker,
                    linestyle=(0, dashes) if dashes else "-", label=method)
    ax.set(title=f"{kind}: {', '.join(n.removeprefix('transformer.') for n in names[:2])}{', …' if len(names) > 2 else ''}",
           xlabel="training step", yscale="log")
    ax.title.set_fontsize(9)
axes[0].set_ylabel("error 1 (median over the kind's layers)")
axes[0].legend()
fig.suptitle("tiny GPT-2 (2 x 64) on the stand-in text: error 1 per layer kind over training", fontsize=10)""",
        ),
        (
            "md",
            (
                "Each panel is the median over its layers (attention: `c_attn`, `c_proj` of every block; MLP: `c_fc`, "
                "`c_proj`; embeddings: `wpe` and the tied `wte`/`lm_head` block, named `lm_head`; norms: every `ln_*`). "
                "The layer norms have an elementwise block: only the diagonal applies (the Kronecker methods are NaN, "
                "attribute `methods_not_applicable`). Every other layer shares its weight over the 128 positions, so its "
                "block is a sum over positions of Kronecker products: KPSVD, the Frobenius-optimal single Kronecker "
                "product, stays well below KFAC there, and the diagonal is near error 1 = 1 (these blocks are far from "
                "diagonal). `fisherlab plot` draws every layer of the same file, `fisherlab plot --summary` the "
                "method × layer heatmap."
            ),
        ),
    ],
}

TARGET = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent  # the tests write elsewhere and compare

for name, cells in NOTEBOOKS.items():
    made = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for index, cell in enumerate(made):
        cell["id"] = f"cell-{index}"  # stable ids: regenerating does not churn the files
    nb = new_notebook(cells=made)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(TARGET / name))
print("ok")
