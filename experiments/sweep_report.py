r"""Turns the JSON records of experiments/lstm_moe_sweep.py into a Markdown
table in the style of Shazeer et al. 2017's table 1 and a PNG plot of test
perplexity against the number of experts.

    python experiments/sweep_report.py --results=results/sweep \
        --table=docs/results_table.md --plot=docs/results_perplexity.png

Runs of one name over several seeds are shown as mean (and each seed's
value). Needs matplotlib for the plot (`pip install matplotlib`).
"""

import argparse
import collections
import glob
import json
import math
import os
import statistics

ORDER = ("dense", "dense_wide", "moe4", "moe16", "moe64", "moe256", "moe256h", "moe1024h")
LABELS = {
    "dense": "Dense FFN 4096 (compute-matched)",
    "dense_wide": "Dense FFN 16384 (4x FFN compute)",
    "moe4": "MoE-4", "moe16": "MoE-16", "moe64": "MoE-64", "moe256": "MoE-256",
    "moe256h": "MoE-256-h", "moe1024h": "MoE-1024-h",
}


def load(results):
    runs = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(results, "*_s*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs[record["name"]].append(record)
    return {name: sorted(runs[name], key=lambda r: r["seed"]) for name in ORDER if name in runs}


def _mean(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _routing(records, split, stat):
    values = [r[f"{split}_routing"].get(f"moe/{stat}") for r in records]
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3g}" if values else "-"


def table(runs):
    dense = _mean(runs["dense"], "test_perplexity") if "dense" in runs else None
    lines = [
        "| model | experts | test perplexity | vs dense | validation perplexity | "
        "ops/timestep (M) | total params (M) | active params/token (M) | tokens/s (k) | "
        "TFLOP/s | load CV (train) | dropped (train) | router entropy (test, nats) | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, records in runs.items():
        test = _mean(records, "test_perplexity")
        per_seed = ", ".join(f"{r['test_perplexity']:.2f}" for r in records)
        change = "-" if dense is None else f"{100 * (test / dense - 1):+.1f}%"
        lines.append(
            f"| {LABELS[name]} | {records[0]['experts']} | {test:.2f}"
            + (f" ({per_seed})" if len(records) > 1 else "")
            + f" | {change} | {_mean(records, 'validation_perplexity'):.2f} | "
            f"{records[0]['ops_per_timestep'] / 1e6:.2f} | "
            f"{records[0]['total_parameters'] / 1e6:.1f} | "
            f"{records[0]['active_parameters_per_token'] / 1e6:.1f} | "
            f"{_mean(records, 'train_tokens_per_sec') / 1e3:.0f} | "
            f"{_mean(records, 'train_tflops_per_sec'):.0f} | "
            f"{_routing(records, 'train', 'load_cv')} | "
            f"{_routing(records, 'train', 'dropped_fraction')} | "
            f"{_routing(records, 'test', 'router_entropy')} | "
            f"{', '.join(str(r['seed']) for r in records)} |"
        )
    return "\n".join(lines) + "\n"


def routing_table(runs):
    """Routing health of the MoE runs: the last training batch's statistics
    (16384 tokens, capacity factor 1.25) and the last test batch's
    (dropless), with the router entropy's ceiling: ln E, or for the
    hierarchical MoE (whose entropy is the primary gate's over sqrt(E)
    groups) ln sqrt(E)."""
    lines = [
        "| model | load CV (train) | max load (train) | dropped (train) | secondary dropped "
        "(train) | load CV (test) | router entropy (test, nats) | its ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, records in runs.items():
        if not name.startswith("moe"):
            continue
        lines.append(
            f"| {LABELS[name]} | {_routing(records, 'train', 'load_cv')} | "
            f"{_routing(records, 'train', 'max_load')} | "
            f"{_routing(records, 'train', 'dropped_fraction')} | "
            f"{_routing(records, 'train', 'secondary_dropped_fraction')} | "
            f"{_routing(records, 'test', 'load_cv')} | "
            f"{_routing(records, 'test', 'router_entropy')} | "
            f"{math.log(records[0]['experts']) / (2 if records[0]['hierarchical'] else 1):.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs, path):
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for hierarchical, marker, label in ((False, "o-", "flat MoE (k=4)"),
                                        (True, "s--", "hierarchical MoE (2x2)")):
        points = sorted(
            (records[0]["experts"], [r["test_perplexity"] for r in records])
            for name, records in runs.items()
            if name.startswith("moe") and records[0]["hierarchical"] == hierarchical
        )
        if points:
            xs = [x for x, _ in points]
            ax.plot(xs, [statistics.mean(v) for _, v in points], marker, label=label)
            for x, values in points:
                if len(values) > 1:
                    ax.scatter([x] * len(values), values, s=12, color="gray", zorder=3)
    for name, style in (("dense", "k:"), ("dense_wide", "r-.")):
        if name in runs:
            ax.axhline(_mean(runs[name], "test_perplexity"), linestyle=style[1:],
                       color=style[0], label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts (equal ops per timestep)")
    ax.set_ylabel("test perplexity")
    first = next(iter(runs.values()))[0]
    ax.set_title(f"LSTM-MoE on tf_moe_lm_en, {first['train_tokens'] / 1e6:.1f}M train tokens "
                 f"({first['device']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = load(args.results)
    if not runs:
        parser.error(f"--results: no <name>_s<seed>.json in {args.results!r}")
    text = table(runs) + "\n" + routing_table(runs)
    with open(args.table, "w") as f:
        f.write(text)
    print(text)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
