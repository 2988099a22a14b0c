#!/usr/bin/env python3
"""The load harness's headline figures over several runs: median and range.

    scripts/bench_summary.py target/bench/run-*/results.json > target/bench/summary.md

One run on a shared 2-core machine says little about the next one (p99 least of all), so the
README reports each figure as the median of the runs, with the lowest and highest beside it.
"""
import json
import statistics
import sys

CT = "ComputeTower (tier 1)"
DIRECT_PRE = "direct + preflights"
LITELLM = "LiteLLM proxy (1 worker)"


def best_step(steps):
    """The highest sustained rate: where CPU per request is steadiest."""
    sustained = [s for s in steps if s.get("sustained")]
    return max(sustained, key=lambda s: s["rate"]) if sustained else None


def figures(run):
    """Headline figures of one results.json, by name (a figure a run lacks is left out)."""
    out = {}
    results = run["results"]
    cpu = {}
    for target in results.get("throughput", []):
        step = best_step(target["steps"])
        if step is None:
            continue
        name = target["target"]
        cpu[name] = step["cpu_us_per_req"]
        out[f"{name}: max sustained req/s"] = step["rate"]
        out[f"{name}: CPU µs per request"] = step["cpu_us_per_req"]
        out[f"{name}: req/s per core"] = 1e6 / step["cpu_us_per_req"]
    if CT in cpu and LITELLM in cpu:
        out["LiteLLM's CPU per request ÷ ComputeTower's"] = cpu[LITELLM] / cpu[CT]
    for row in results.get("latency", []):
        targets = row["targets"]
        if CT not in targets or DIRECT_PRE not in targets:
            continue
        n = row["streams"]
        ct, base = targets[CT], targets[DIRECT_PRE]
        for p in ("p50", "p99"):
            if ct["ttft_us"][p] is not None and base["ttft_us"][p] is not None:
                out[f"added TTFT {p} at {n} streams (ms)"] = (
                    ct["ttft_us"][p] - base["ttft_us"][p]
                ) / 1000
        if ct["gap_us"]["p99"] is not None and base["gap_us"]["p99"] is not None:
            out[f"added gap p99 at {n} streams (ms)"] = (
                ct["gap_us"]["p99"] - base["gap_us"]["p99"]
            ) / 1000
    if results.get("bytes_per_stream") is not None:
        out["memory per open stream (KiB)"] = results["bytes_per_stream"] / 1024
    for row in results.get("memory_kib", []):
        if row["state"].startswith("idle"):
            out["RSS idle (MiB)"] = row["rss"] / 1024
        if row["state"].endswith("60 s after them"):
            out["RSS a minute after the overload (MiB)"] = row["rss"] / 1024
    for site in results.get("tiers", []):
        if site["token_delay_ms"] != 0:
            continue
        for tier in site["tiers"]:
            if tier["ttft_us"]["p50"] is not None:
                out[f"tier {tier['tier']} TTFT p50, 0 ms site (ms)"] = tier["ttft_us"]["p50"] / 1000
    return out


def fmt(x):
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    per_run = [figures(r) for r in runs]
    names = []
    for f in per_run:
        names.extend(n for n in f if n not in names)
    mode = "quick" if all(r.get("quick") for r in runs) else "full"
    print(
        f"Headline figures over {len(runs)} {mode}-mode run(s) of the load harness: the median, "
        "and the range from the lowest to the highest run.\n"
    )
    print("| figure | median | range | runs |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        values = [f[name] for f in per_run if name in f]
        print(
            f"| {name} | {fmt(statistics.median(values))} | "
            f"{fmt(min(values))} to {fmt(max(values))} | {len(values)} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: bench_summary.py RESULTS.json...")
    main(sys.argv[1:])
