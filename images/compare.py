#!/usr/bin/env python3
"""Side-by-side figures of the compare scenario: each metric of the guest
on dom0's blkback and of the guest on stordom, every round, the medians,
and stordom's median as a ratio of dom0's (higher is better for all).

usage: compare.py RUN_FOLDER/results.json
"""
import json
import statistics
import sys

REFERENCE, CANDIDATE = "guest-g-dom0", "guest-g-stordom"


def main() -> None:
    results = json.load(open(sys.argv[1]))
    rounds: dict = {}
    for m in results["metrics"]:
        rounds.setdefault((m["name"], m["unit"]), {}).setdefault(m["console"], []).append(m["value"])
    print(f"{'metric':<20}{'unit':<7}{'dom0 blkback':>22}{'stordom':>22}{'stordom/dom0':>14}")
    for (name, unit), by in rounds.items():
        ref, cand = by.get(REFERENCE, []), by.get(CANDIDATE, [])
        if not ref or not cand:
            continue
        ref_med, cand_med = statistics.median(ref), statistics.median(cand)
        cells = [" ".join(f"{v:g}" for v in ref), " ".join(f"{v:g}" for v in cand)]
        print(f"{name:<20}{unit:<7}{cells[0]:>22}{cells[1]:>22}{cand_med / ref_med:>13.2f}x")
    print("(each cell lists every round; the ratio is of the medians)")


if __name__ == "__main__":
    main()
