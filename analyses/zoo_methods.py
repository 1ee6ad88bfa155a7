"""Every registered method (the papers' five and the field's zoo: EKFAC, TKFAC, KFAC-reduce, Shampoo²,
Shampoo, eShampoo, diagonal, low rank) against the exact Fisher on three problems (issue 18):

* ``mnist``: the MNIST auto-encoder, layer 5 (30 → 250), batch 512 (embedded stand-in data);
* ``transformer``: every Linear layer of the small transformer, batch 8;
* ``resnet18``: all 21 layers of ResNet-18, batch 8.

For each problem it writes the dataset ``data/zoo_<problem>.nc``, the error figure
``data/zoo_<problem>.png`` and the method × layer heatmap of median error 1
``data/zoo_<problem>-summary.png``, then prints a table of median errors per method (median over
snapshots and layers) and what the runs say of two published claims: EKFAC's gain over KFAC is mostly
the eigenvalues, not the basis; Shampoo² is close to KPSVD (the Frobenius-optimal Kronecker product).

    python analyses/zoo_methods.py                          # all three problems (long on a CPU: use a GPU)
    python analyses/zoo_methods.py --problem mnist          # one problem
    python analyses/zoo_methods.py --smoke                  # tiny settings, data/smoke/ (the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr
from _common import default_input, obtain, script_parser

from fisherlab._errors import FisherlabError
from fisherlab.config import ProbeConfig
from fisherlab.method_registry import resolve_methods
from fisherlab.plots import error_figure, method_order, save_figure, summary_figure, summary_medians

STEM = "zoo"
#: Per problem: (layers, batch size, iterations, every) at full scale and in smoke mode.
SETTINGS: dict[str, dict[bool, tuple[tuple[str, ...], int | None, int, int]]] = {
    "mnist": {False: (("5",), 512, 200, 20), True: (("5",), 16, 1, 1)},
    "transformer": {False: (("all",), 8, 100, 50), True: (("blocks.0.proj",), 2, 1, 1)},
    "resnet18": {False: (("all",), 8, 20, 10), True: (("fc",), 2, 1, 1)},
}


def configure(problem: str, *, smoke: bool, data_dir: str | None = None) -> ProbeConfig:
    """The run of ``problem``: every registered method, error 1 and error 2."""
    layers, batch_size, iterations, every = SETTINGS[problem][smoke]
    return ProbeConfig(
        problem=problem,
        data_dir=data_dir,
        layers=layers,
        batch_size=batch_size,
        iterations=iterations,
        every=every,
        methods=resolve_methods(["all"]),
    )


def median_errors(ds: xr.Dataset) -> xr.Dataset:
    """Median of each error metric per method: over snapshots (per layer), then over layers."""
    metrics = [m for m in ("frobenius_error", "spectral_error") if m in ds]
    return xr.Dataset({m: summary_medians(ds, m).median("layer", skipna=True) for m in metrics})


def claims(ds: xr.Dataset) -> dict[str, float]:
    """What a run says of the two claims, from the median error 1 (and error 2) per method.

    * ``eigenvalue_share``: ``(KFAC − EKFAC) / KFAC``, the part of KFAC's error 1 that re-fitting the
      eigenvalues in KFAC's own basis removes (EKFAC's error is what that basis leaves);
      ``scale_share`` the part a single scalar removes (TKFAC); ``basis_gain`` ``(EKFAC − eShampoo) / EKFAC``,
      what a different basis (Shampoo's) with the same re-fit gains over KFAC's.
    * ``shampoo2_over_kpsvd``: error 1 of Shampoo² over KPSVD's (1 = as good as the optimum), and ``_2`` error 2's.
    """
    med = median_errors(ds)
    e1 = {str(m): float(v) for m, v in zip(med["method"].values, med["frobenius_error"].values, strict=True)}
    out = {
        "kfac": e1["kfac"],
        "ekfac": e1["ekfac"],
        "tkfac": e1["tkfac"],
        "eshampoo": e1["eshampoo"],
        "kpsvd": e1["kpsvd"],
        "shampoo2": e1["shampoo2"],
        "eigenvalue_share": (e1["kfac"] - e1["ekfac"]) / e1["kfac"],
        "scale_share": (e1["kfac"] - e1["tkfac"]) / e1["kfac"],
        "basis_gain": (e1["ekfac"] - e1["eshampoo"]) / e1["ekfac"],
        "shampoo2_over_kpsvd": e1["shampoo2"] / e1["kpsvd"],
    }
    if "spectral_error" in med:
        e2 = {str(m): float(v) for m, v in zip(med["method"].values, med["spectral_error"].values, strict=True)}
        out["shampoo2_over_kpsvd_2"] = e2["shampoo2"] / e2["kpsvd"]
    return out


def report(results: dict[str, xr.Dataset]) -> str:
    """The table of median errors per method (one column pair per problem) and the two claims."""
    meds = {p: median_errors(ds) for p, ds in results.items()}
    methods = method_order([str(m) for med in meds.values() for m in med["method"].values])
    head = "method".ljust(16) + "".join(f"{p + ' e1':>16}{p + ' e2':>16}" for p in meds)
    lines = ["median error per method (over snapshots, then layers):", head]
    for method in methods:
        row = method.ljust(16)
        for med in meds.values():
            for metric in ("frobenius_error", "spectral_error"):
                ok = metric in med and method in med["method"].values
                value = float(med[metric].sel({"method": method})) if ok else np.nan
                row += f"{value:16.4g}"
        lines.append(row)
    for problem, ds in results.items():
        try:
            c = claims(ds)
        except KeyError:  # a run without one of the methods the claims need
            continue
        lines.append(
            f"{problem}: EKFAC vs KFAC error 1 {c['ekfac']:.3g} vs {c['kfac']:.3g}: re-fitting the eigenvalues "
            f"removes {100 * c['eigenvalue_share']:.1f}% of KFAC's error (a scalar, TKFAC: "
            f"{100 * c['scale_share']:.1f}%), KFAC's basis leaves {c['ekfac']:.3g}; "
            f"Shampoo's basis with the same re-fit (eShampoo) {c['eshampoo']:.3g}"
        )
        lines.append(
            f"{problem}: Shampoo² vs KPSVD error 1 {c['shampoo2']:.3g} vs {c['kpsvd']:.3g} "
            f"(ratio {c['shampoo2_over_kpsvd']:.3f}"
            + (f"; error 2 ratio {c['shampoo2_over_kpsvd_2']:.3f})" if "shampoo2_over_kpsvd_2" in c else ")")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__ or "", STEM, [*SETTINGS, "all"], "all")  # --input/--output: one problem only
    args = parser.parse_args(argv)
    problems = list(SETTINGS) if args.problem == "all" else [args.problem]
    results: dict[str, xr.Dataset] = {}
    try:
        if len(problems) > 1 and (args.input or args.output):
            raise FisherlabError("--input and --output name one problem's files: pass --problem too")
        for problem in problems:
            data = Path(args.input) if args.input else default_input(STEM, problem, smoke=args.smoke)
            figure = Path(args.output or data.with_suffix(".png"))
            config = configure(problem, smoke=args.smoke, data_dir=args.data_dir)
            ds = obtain(config, data, recompute=args.recompute, progress=not args.smoke)
            save_figure(error_figure(ds), figure)
            summary = figure.with_name(f"{figure.stem}-summary{figure.suffix}")
            save_figure(summary_figure(ds, "frobenius_error"), summary)
            print(f"wrote {figure} and {summary}")
            results[problem] = ds
        print(report(results))
    except FisherlabError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
