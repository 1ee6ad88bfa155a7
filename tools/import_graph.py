import ast, pathlib, sys
ORDER = ["_errors", "layers", "kron", "krylov", "operators", "losses", "data", "fisher", "probe", "approximations",
         "metrics", "twolevel", "optim", "config", "problems", "results", "run", "train", "plots", "dense", "cli", "__main__", "__init__"]
edges = {}
for p in sorted(pathlib.Path("fisherlab").glob("*.py")):
    mod = p.stem
    tree = ast.parse(p.read_text())
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fisherlab"):
            name = node.module.split(".")[1] if "." in node.module else None
            if name is None:
                for a in node.names: deps.add(a.name)
            else: deps.add(name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fisherlab."): deps.add(a.name.split(".")[1])
    edges[mod] = sorted(deps - {mod})
bad = []
for mod, deps in edges.items():
    if mod not in ORDER: print("unplaced", mod); continue
    for d in deps:
        if d == "__version__": continue
        if d not in ORDER: print("unplaced dep", d); continue
        if ORDER.index(d) > ORDER.index(mod) and mod not in ("__init__",):
            bad.append(f"{mod} -> {d}")
for mod in ORDER:
    if mod in edges: print(f"{mod:15s} <- {', '.join(d for d in edges[mod])}")
print("BACKWARD:", bad)
