#!/usr/bin/env python3
"""Side-by-side figures of a compare scenario (compare, compare-nvme):
each metric of the guest on dom0's blkback and of the guest on stordom,
every round, the medians, and stordom's median as a ratio of dom0's
(higher is better for all). With --bare, also stordom's own figure for
the device on bare QEMU (tests/bench.py --json, no Xen) and the guest's
median as a ratio of it: what serving through Xen costs.

usage: compare.py RUN_FOLDER/results.json [--bare BENCH_JSON --bare-disk DISK]
"""
import argparse
import json
import statistics

REFERENCE, CANDIDATE = "guest-g-dom0", "guest-g-stordom"
# The guest's metric names for tests/bench.py's columns.
BARE_COLUMNS = {
    "rr4k-qd1": "rand_read_4k_qd1", "rr4k-qd32": "rand_read_4k_qd32",
    "rw4k-qd1": "rand_write_4k_qd1", "rw4k-qd32": "rand_write_4k_qd32",
    "seqrd-1m": "seq_read_1m", "seqwr-1m": "seq_write_1m",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--bare", help="tests/bench.py --json output")
    ap.add_argument("--bare-disk", default="nvme0n1", help="its row to compare with")
    a = ap.parse_args()
    results = json.load(open(a.results))
    bare = {}
    if a.bare:
        row = json.load(open(a.bare)).get(a.bare_disk, {})
        bare = {BARE_COLUMNS[k]: v for k, v in row.items() if k in BARE_COLUMNS}
    rounds: dict = {}
    for m in results["metrics"]:
        rounds.setdefault((m["name"], m["unit"]), {}).setdefault(m["console"], []).append(m["value"])
    head = f"{'metric':<20}{'unit':<7}{'dom0 blkback':>22}{'stordom':>22}{'stordom/dom0':>14}"
    if bare:
        head += f"{'bare ' + a.bare_disk:>16}{'stordom/bare':>14}"
    print(head)
    for (name, unit), by in rounds.items():
        ref, cand = by.get(REFERENCE, []), by.get(CANDIDATE, [])
        if not ref or not cand:
            continue
        ref_med, cand_med = statistics.median(ref), statistics.median(cand)
        cells = [" ".join(f"{v:g}" for v in ref), " ".join(f"{v:g}" for v in cand)]
        line = f"{name:<20}{unit:<7}{cells[0]:>22}{cells[1]:>22}{cand_med / ref_med:>13.2f}x"
        if name in bare:
            line += f"{bare[name]:>16g}{cand_med / bare[name]:>13.2f}x" if bare[name] else ""
        print(line)
    print("(each cell lists every round; the ratios are of the medians)")


if __name__ == "__main__":
    main()
