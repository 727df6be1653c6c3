"""Held-out perplexity of SmolLM2-135M after each PTQ fit of :mod:`rabit_compiler.fit` (no QAT): the init table.

    python benchmarks/init_methods.py                          # every method, k = 2
    python benchmarks/init_methods.py --paths 2 3 4 --only svid gptq
    python benchmarks/init_methods.py --list

Calibration: the first 16 x 512-token windows of lee_background.cor, captured once (channel statistics,
output gradients and X^T X per linear); every method then fits all 210 linears from the same statistics
into a fresh copy of the model (sequential methods: input statistics re-taken block by block on the partly
quantized copy), packs them (fp16 scales; the LM head stays fp32) and is scored on lee.cor, 9 x 512 tokens,
no BOS.
One line per (method, k): held-out PPL and the fit time of all linears (the calibration capture, shared by
all methods, is timed once); with ``--tune-steps N``, then the PPL after N steps of end-to-end scale tuning
(signs fixed, KL to the fp model on 4 x 256-token windows of lee_background per step) and its time.
``--json FILE`` appends every result as one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import rabit_compiler as rabit
from rabit_compiler.calibration import CapturedLinear, ChannelStat, InputGram, capture_linears
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.models import load_smollm2
from rabit_compiler.qat.tune import tune_config, tune_scales_
from rabit_compiler.quantize import RaBiTLinear, set_submodule, skip_reason
from rabit_compiler.quantizer import fit_linear, pack_fit
from rabit_compiler.sequential import fit_in_block_order

# Every method states its settings over the fit before issue 14 (later defaults do not change what a name means).
BEFORE_ISSUE_14 = dict(fit="svid", objective="diag", fit_rounds=4, sequential=False)
METHODS = {
    "svid": dict(fit="svid"),  # the default before issue 14
    "svid-greedy": dict(fit="svid", rounds=0),
    "als-diag": dict(fit="als", objective="diag"),
    "als-greedy-diag": dict(fit="als", objective="diag", rounds=0),
    "als-hessian": dict(fit="als", objective="hessian"),
    "coupled-diag": dict(fit="coupled", objective="diag"),
    "coupled-hessian": dict(fit="coupled", objective="hessian"),
    "gptq": dict(fit="gptq", objective="hessian"),
    "gptq-greedy": dict(fit="gptq", objective="hessian", rounds=0),
    "gptq-rows-unweighted": dict(fit="gptq", objective="hessian", alpha_out=0.0),
    "gptq-1round": dict(fit="gptq", objective="hessian", fit_rounds=1),
    "gptq-damp0.1": dict(fit="gptq", objective="hessian", damp=0.1),
    "gptq-sequential": dict(fit="gptq", objective="hessian", sequential=True),
    "gptq-greedy-2rounds-sequential": dict(fit="gptq", objective="hessian", rounds=0, fit_rounds=2, sequential=True),
    "gptq-greedy-1round": dict(fit="gptq", objective="hessian", rounds=0, fit_rounds=1),
    "gptq-greedy-1round-sequential": dict(fit="gptq", objective="hessian", rounds=0, fit_rounds=1, sequential=True),
    "gptq-1round-sequential": dict(fit="gptq", objective="hessian", fit_rounds=1, sequential=True),
    "gptq-svid3-1round": dict(fit="gptq", objective="hessian", rounds=3, fit_rounds=1),
    "gptq-svid3-1round-sequential": dict(fit="gptq", objective="hessian", rounds=3, fit_rounds=1, sequential=True),
    "gptq-1round-sequential-no-gradients": dict(fit="gptq", objective="hessian", fit_rounds=1, sequential=True,
                                                alpha_out=0.0),
    "gptq-2rounds-sequential": dict(fit="gptq", objective="hessian", fit_rounds=2, sequential=True),
    "gptq-svid3-2rounds-sequential": dict(fit="gptq", objective="hessian", rounds=3, fit_rounds=2, sequential=True),
}


def captured_linears(model: torch.nn.Module, calibration: torch.Tensor,
                     cache: str | None) -> tuple[list[CapturedLinear], float]:
    """The model's captured linears with their calibration statistics and X^T X, and the capture's seconds;
    read from / written to ``cache`` (a torch file of the statistics only) when given."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    if cache and Path(cache).is_file():
        stored = torch.load(cache)
        linears = []
        for entry in stored["linears"]:
            linear = CapturedLinear(entry["name"], parameters[entry["name"] + ".weight"], None, entry["layout"],
                                    ChannelStat(**entry["input_stat"]), ChannelStat(**entry["output_stat"]),
                                    InputGram(**entry["input_gram"]), entry["other_uses"])
            linear.bias = getattr(model.get_submodule(entry["name"]), "bias", None)
            linears.append(linear)
        return linears, stored["seconds"]
    started = time.perf_counter()
    capture = capture_linears(model, calibration[:1], calibration, progress=False, input_grams=True)
    seconds = time.perf_counter() - started
    torch.compiler.reset()
    linears = list(capture.linears.values())
    if cache:
        torch.save({"seconds": seconds, "linears": [
            dict(name=linear.name, layout=linear.layout, other_uses=linear.other_uses,
                 input_stat=vars(linear.input_stat), output_stat=vars(linear.output_stat),
                 input_gram=vars(linear.input_gram)) for linear in linears]}, cache)
    return linears, seconds


def quantize_from_statistics(model: torch.nn.Module, linears: list[CapturedLinear], config: rabit.RaBiTConfig,
                             calibration: torch.Tensor) -> None:
    """What ``quantize_`` does after its capture, from the cached statistics: every linear fitted, packed and
    swapped in ``model`` (a copy of the captured one); with ``config.sequential``, block by block from input
    statistics taken on the partly quantized model (the output-gradient statistics stay the cached ones)."""

    def swap(owner_name: str, linear: CapturedLinear) -> None:
        layer_config = config.for_layer(linear.name)
        packed = pack_fit(fit_linear(linear, layer_config), layer_config)
        set_submodule(model, owner_name, RaBiTLinear(packed, model.get_submodule(owner_name).bias))

    owners = {linear.name: dataclasses.replace(linear, weight=model.get_parameter(linear.name + ".weight"))
              for linear in linears}
    done = set(fit_in_block_order(model, owners, calibration, config.needs_input_gram, swap, progress=False)
               if config.sequential else [])
    for name, linear in owners.items():
        if name not in done:
            swap(name, linear)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(METHODS), help="run only these methods")
    parser.add_argument("--paths", nargs="*", type=int, default=[2], help="k values to run")
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--json", help="append one JSON line per result to this file")
    parser.add_argument("--list", action="store_true", help="print the methods and their settings")
    parser.add_argument("--tune-steps", type=int, default=0, help="then tune the scales end to end for N steps")
    parser.add_argument("--tune-lr", type=float, default=1e-3)
    parser.add_argument("--tune-seq-len", type=int, default=256)
    parser.add_argument("--stats-cache", help="reuse (or write) the calibration statistics in this file")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 is faster on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.list:
        for name, overrides in METHODS.items():
            print(f"{name}: {overrides}")
        return
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, 512)
    calibration = token_windows(tokenizer, train_text, 512, max_windows=args.calibration_windows)
    tune_windows = token_windows(tokenizer, train_text, args.tune_seq_len)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    linears, capture_seconds = captured_linears(model, calibration, args.stats_cache)
    base = rabit.RaBiTConfig()
    linears = [linear for linear in linears if skip_reason(linear, base, names) is None]
    print(f"calibration capture (statistics + X^T X of {len(linears)} linears): {capture_seconds:.1f} s", flush=True)
    print(f"fp32: held-out PPL {perplexity(model, heldout, progress=False):.2f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for paths in args.paths:
        for name in args.only or METHODS:
            config = rabit.RaBiTConfig(paths=paths, **{**BEFORE_ISSUE_14, **METHODS[name]})
            quantized = copy.deepcopy(model)
            started = time.perf_counter()
            quantize_from_statistics(quantized, linears, config, calibration)
            fit_seconds = time.perf_counter() - started
            ppl = perplexity(quantized, heldout, progress=False)
            print(f"{name} k={paths}: held-out PPL {ppl:.4g}; fit {fit_seconds:.1f} s", flush=True)
            tuned = {}
            if args.tune_steps:
                started = time.perf_counter()
                tune_scales_(quantized, model, tune_windows,
                             tune_config(args.tune_steps, 4, args.tune_seq_len, args.tune_lr), progress=False)
                tuned = dict(tune_steps=args.tune_steps, tune_lr=args.tune_lr,
                             tune_seconds=time.perf_counter() - started,
                             tuned_ppl=perplexity(quantized, heldout, progress=False))
                print(f"  + scale tuning ({args.tune_steps} steps x 4 x {args.tune_seq_len} tokens, "
                      f"lr {args.tune_lr:g}): held-out PPL {tuned['tuned_ppl']:.4g}; {tuned['tune_seconds']:.0f} s",
                      flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(dict(method=name, paths=paths, settings=METHODS[name], ppl=ppl, **tuned,
                                                 fit_seconds=fit_seconds, capture_seconds=capture_seconds,
                                                 commit=commit, date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                   time.gmtime()),
                                                 machine=platform.processor() or platform.machine())) + "\n")
            del quantized


if __name__ == "__main__":
    main()
