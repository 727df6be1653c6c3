"""Held-out perplexity after QAT against the latent learning rate, per method and optimizer, over seeds.

Collects the trained runs of ``benchmarks/accuracy.py`` (its ``results.json`` files, single or merged with a
``runs`` entry per method) and of earlier sweeps (a ``sweep.json`` written here), refuses runs of different
budgets, and writes into ``--out``:

- ``sweep.json``: one row per run (method, optimizer, latent lr, seed, steps, tokens, held-out PPL, signs
  flipped per path, the PPL curve, and the run's date, commit, command and machine);
- ``ppl_vs_lr.png`` (if matplotlib is installed): every seed as a point, the mean over seeds as a line,
  colour = method, line style = optimizer;
- a Markdown table on stdout: per (method, optimizer, lr) the PPL of each seed and their mean.

    python benchmarks/lr_sweep.py benchmarks/accuracy_cpu_sweep/sweep.json NEW_RUN/results.json \
        --out benchmarks/accuracy_cpu_sweep
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from rabit_compiler.qat import METHODS

# QATConfig fields that set the budget: runs compared on one plot must agree on all of them.
BUDGET = ("steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "schedule", "lr_scale", "gamma",
          "weight_decay")


def trained_runs(path: Path) -> list[dict]:
    """The sweep rows held in ``path`` (an accuracy.py ``results.json`` or a ``sweep.json``)."""
    data = json.loads(path.read_text())
    if "rows" in data:
        return data["rows"]
    if "methods" not in data:
        raise ValueError(f"{path}: neither a results.json of benchmarks/accuracy.py nor a sweep.json")
    rows = []
    for method, result in data["methods"].items():
        if not result.get("history") or "reused_from" in result:
            continue  # untrained baselines, and rows copied in from another file (counted there)
        run = data.get("runs", {}).get(method, data)
        config = run["qat_config"]
        rows.append({
            "method": method, "optimizer": config["optimizer"],
            "lr_latent": result.get("lr_latent", config["lr_latent"]), "seed": config["seed"],
            "budget": {key: config[key] for key in BUDGET}, "tokens": result["tokens"],
            "ppl": result["ppl"], "sign_changes": result.get("sign_changes"),
            "eval": [[step, ppl] for step, _, ppl in result["history"]["eval"] if ppl is not None],
            "date": run["date"], "commit": run["commit"], "command": run["command"], "machine": run["machine"],
        })
    return rows


def collect(paths: list[Path]) -> list[dict]:
    """Every run in ``paths`` once (a run listed by two files is the same method, optimizer, lr, seed,
    budget and PPL), all of one budget."""
    unique: dict[tuple, dict] = {}
    for path in paths:
        for row in trained_runs(path):
            key = (row["method"], row["optimizer"], row["lr_latent"], row["seed"],
                   json.dumps(row["budget"], sort_keys=True), row["ppl"])
            unique.setdefault(key, row)
    rows = list(unique.values())
    if not rows:
        raise ValueError(f"no trained QAT runs in {', '.join(map(str, paths))}")
    budgets = {json.dumps(row["budget"], sort_keys=True) for row in rows}
    if len(budgets) > 1:
        raise ValueError("runs of different budgets cannot share one sweep:\n" + "\n".join(sorted(budgets)))
    return sorted(rows, key=lambda r: (r["optimizer"], METHODS.index(r["method"]), r["lr_latent"], r["seed"]))


def by_setting(rows: list[dict]) -> dict[tuple[str, str, float], list[dict]]:
    """``(method, optimizer, lr) -> runs`` (one per seed)."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["optimizer"], row["lr_latent"])].append(row)
    return groups


def table(rows: list[dict]) -> str:
    lines = ["| method | optimizer | latent lr | PPL per seed | mean | signs flipped, path 1 / path 2 (mean) |",
             "|---|---|---|---|---|---|"]
    for (method, optimizer, lr), runs in by_setting(rows).items():
        seeds = ", ".join(f"{r['ppl']:.2f} (s{r['seed']})" for r in runs)
        flips = [r["sign_changes"] for r in runs if r["sign_changes"]]
        flipped = " / ".join(f"{mean(f[i] for f in flips):.2%}" for i in range(len(flips[0]))) if flips else "—"
        lines.append(f"| {method} | {optimizer} | {lr:g} | {seeds} | {mean(r['ppl'] for r in runs):.2f} | "
                     f"{flipped} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    def color(method: str) -> str:
        return f"C{METHODS.index(method)}"

    figure, axis = plt.subplots(figsize=(7, 4.5))
    optimizers = sorted({row["optimizer"] for row in rows})
    curves: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (method, optimizer, lr), runs in by_setting(rows).items():
        curves[(method, optimizer)].append((lr, mean(r["ppl"] for r in runs)))
        axis.scatter([lr] * len(runs), [r["ppl"] for r in runs], color=color(method), s=12, alpha=0.6)
    for (method, optimizer), points in curves.items():
        style = ("-", "--", ":")[optimizers.index(optimizer) % 3]
        axis.plot(*zip(*sorted(points), strict=True), style, marker="o", color=color(method),
                  label=f"{method}, {optimizer}")
    budget = rows[0]["budget"]
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("latent learning rate")
    axis.set_ylabel("held-out perplexity (lee.cor)")
    axis.set_title(f"SmolLM2-135M, 2-bit QAT, {budget['steps']} steps x {rows[0]['tokens'] // budget['steps']} "
                   "tokens (points: seeds; lines: mean)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of accuracy.py runs, or sweep.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    rows = collect(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"{len(rows)} runs -> {args.out / 'sweep.json'}\n\n{table(rows)}\n")
    plot(rows, args.out / "ppl_vs_lr.png")


if __name__ == "__main__":
    main()
