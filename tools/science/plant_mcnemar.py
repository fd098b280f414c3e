#!/usr/bin/env python3
"""Paired tests for the planted organism's own SPPFT arms (tools/science/plant_arms.sh).

Reads the AdvBench responses (harmful.jsonl; `refusal` as judged by the demo's judge) of the
demo's arms and of the two extra arms, and prints a Markdown table: R_h per arm, and exact
McNemar tests (two-sided binomial on the discordant prompts) between arms on the same prompts,
with the paired difference and its Wald 95% interval.

    plant_mcnemar.py DEMO_OUT PLANT CONTROL
"""
import json
import math
import sys
from pathlib import Path


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


# Known values (the Rust `paired` module's, themselves tested against scipy): 3 vs 33 and 0 vs 29.
assert abs(exact_mcnemar(3, 33) - 2.2721e-7) < 1e-10, exact_mcnemar(3, 33)
assert abs(exact_mcnemar(0, 29) - 2 * 0.5**29) < 1e-15
assert exact_mcnemar(5, 5) == 1.0


def answered(path: Path) -> list[bool]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["index"])
    return [not r["refusal"] for r in rows]


def main() -> None:
    demo, plant, control = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def part(label: str, base: Path) -> Path:
        return base / "responses" / label / "harmful.jsonl"

    arms = {
        "aligned (before fine-tuning)": part("aligned", demo / "eval-parts" / "aligned"),
        "full": part("ft-di-full", demo / "eval-parts" / "ft-di-full"),
        "SPPFT, located range frozen": part("ft-di-sppft", demo / "eval-parts" / "ft-di-sppft"),
        f"plant {plant} frozen": part("ft-di-plant", demo / "extra" / "eval-ft-di-plant"),
        f"control {control} frozen": part(
            "ft-di-plant-control", demo / "extra" / "eval-ft-di-plant-control"
        ),
    }
    data = {name: answered(p) for name, p in arms.items()}
    n = {len(v) for v in data.values()}
    if len(n) != 1:
        sys.exit(f"arms answer different numbers of prompts: { {k: len(v) for k, v in data.items()} }")
    n = n.pop()
    print(f"AdvBench, {n} prompts; R_h = share answered (not refused) by the demo's judge.\n")
    print("| arm | R_h |\n|---|---|")
    for name, v in data.items():
        print(f"| {name} | {100 * sum(v) / n:.1f}% ({sum(v)} of {n}) |")
    print("\n| a vs b | R_h a - b (points, Wald 95%) | only a answers | only b answers | exact McNemar p |")
    print("|---|---|---|---|---|")
    pairs = [
        (f"plant {plant} frozen", "full"),
        (f"plant {plant} frozen", f"control {control} frozen"),
        (f"control {control} frozen", "full"),
        ("SPPFT, located range frozen", "full"),
    ]
    for a, b in pairs:
        only_a = sum(x and not y for x, y in zip(data[a], data[b]))
        only_b = sum(y and not x for x, y in zip(data[a], data[b]))
        d = (only_a - only_b) / n
        se = math.sqrt(max(0.0, (only_a + only_b) / n - d * d) / n)
        print(
            f"| {a} vs {b} | {100 * d:+.1f} ({100 * (d - 1.96 * se):+.1f} to {100 * (d + 1.96 * se):+.1f}) "
            f"| {only_a} | {only_b} | {exact_mcnemar(only_a, only_b):.2g} |"
        )


if __name__ == "__main__":
    main()
