#!/usr/bin/python3
"""Tables and a scaling plot from the JSON output of cki_benchmarks.

Usage: plot_scaling.py RESULTS.json [PLOT.png]

Prints Markdown tables of time and ratio (t_copy / t_method) per method,
model count, size and thread count, taking the median aggregate when the run
used --benchmark_repetitions. A cell reads "time ms, ratio" or, where the run
measured CPU time (one thread), "time ms, ratio / ratio_cpu". With PLOT.png
and matplotlib installed, also draws time against size (one thread, N = 4)
and time against N (one thread, the largest size in the run).
"""
import json
import re
import sys
from collections import defaultdict

NAME = re.compile(r"^(?P<method>[^/]+)/n:(?P<n>\d+)/mfloats:(?P<size>\d+)/threads:(?P<threads>\d+)")


def load(path):
    """Returns {(method, n, size, threads): (milliseconds, ratio, ratio_cpu)}."""
    with open(path) as handle:
        runs = json.load(handle)["benchmarks"]
    has_median = any(run.get("aggregate_name") == "median" for run in runs)
    results = {}
    for run in runs:
        if has_median and run.get("aggregate_name") != "median":
            continue
        match = NAME.match(run["name"])
        if not match:
            continue
        key = (match["method"], int(match["n"]), int(match["size"]), int(match["threads"]))
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run.get("time_unit", "ns")]
        results[key] = (run["real_time"] * scale, run.get("ratio"), run.get("ratio_cpu"))
    return results


def print_tables(results):
    sizes = sorted({key[2] for key in results})
    counts = sorted({key[1] for key in results})
    threads = sorted({key[3] for key in results})
    methods = []
    for key in results:
        if key[0] not in methods:
            methods.append(key[0])
    for t in threads:
        for size in sizes:
            print(f"\n### {size}M floats per model, {t} thread{'s' if t > 1 else ''}\n")
            print("| method | " + " | ".join(f"N = {n}" for n in counts) + " |")
            print("|---|" + "---|" * len(counts))
            for method in methods:
                cells = []
                for n in counts:
                    entry = results.get((method, n, size, t))
                    if entry is None:
                        cells.append("")
                    else:
                        ms, ratio, ratio_cpu = entry
                        cell = f"{ms:.1f} ms"
                        if ratio is not None:
                            cell += f", {ratio:.2f}"
                        if ratio_cpu is not None:
                            cell += f" / {ratio_cpu:.2f}"
                        cells.append(cell)
                if any(cells):
                    print(f"| {method} | " + " | ".join(cells) + " |")


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written", file=sys.stderr)
        return
    methods = ["copy", "information_content", "average", "cki_hard_softmax", "cki_soft_softmax"]
    figure, (by_size, by_count) = plt.subplots(1, 2, figsize=(11, 4.2))

    sizes = sorted({key[2] for key in results if key[1] == 4 and key[3] == 1})
    for method in methods:
        points = [(s, results[(method, 4, s, 1)][0]) for s in sizes if (method, 4, s, 1) in results]
        if points:
            by_size.plot(*zip(*points), marker="o", label=method)
    by_size.set_xscale("log", base=2)
    by_size.set_yscale("log")
    by_size.set_xlabel("elements per model (millions of floats)")
    by_size.set_ylabel("time per merge (ms)")
    by_size.set_title("N = 4, one thread")
    by_size.legend(fontsize=8)

    largest = max({key[2] for key in results})
    counts = sorted({key[1] for key in results if key[2] == largest and key[3] == 1})
    for method in methods:
        points = [(n, results[(method, n, largest, 1)][0]) for n in counts if (method, n, largest, 1) in results]
        if points:
            by_count.plot(*zip(*points), marker="o", label=method)
    by_count.set_xlabel("models N")
    by_count.set_ylabel("time per merge (ms)")
    by_count.set_title(f"{largest}M floats per model, one thread")
    by_count.set_xticks(counts)
    by_count.legend(fontsize=8)

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    results = load(sys.argv[1])
    if not results:
        print(f"no cki benchmark results in {sys.argv[1]}", file=sys.stderr)
        return 1
    print_tables(results)
    if len(sys.argv) == 3:
        plot(results, sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
