#!/usr/bin/env python3
"""Side-by-side figures of a compare scenario (compare, compare-nvme): each
metric for every backend that served it (dom0's Linux blkback, a Linux
driver domain's blkback, stordom), every round, the medians, and
stordom's median as a ratio of each peer's. Higher is better, except for
the units listed in LOWER_IS_BETTER (latencies, times), where a ratio
below 1 is stordom ahead. With --bare, also stordom's own figure for the
device on bare QEMU (tests/bench.py --json, no Xen) and the guest's median
as a ratio of it: what serving through Xen costs. With --json, the table
is also written there.

usage: compare.py RUN_FOLDER/results.json [--bare BENCH_JSON --bare-disk DISK]
                  [--json OUT]
"""
import argparse
import json
import statistics

# Backend columns, in table order: a metric belongs to a column by its
# `backend=` (the boot figures dom0 prints) or by the guest console it
# came from.
COLUMNS = [
    ("dom0", "dom0 blkback", {"guest-g-dom0", "Domain-0"}),
    ("linuxdd", "Linux drv dom", {"guest-g-linuxdd", "linuxdd"}),
    ("stordom", "stordom", {"guest-g-stordom", "stordom"}),
    # The `ab` scenario's second stordom build.
    ("stordom-b", "stordom B", {"guest-g-stordom-b", "stordom-b"}),
]
CANDIDATE = "stordom"
# calls, turns and sleeps: stordom's serving profile per request (dom0
# prints it with backend=stordom; no peer has it, so no ratio).
LOWER_IS_BETTER = {"us", "ms", "MiB", "calls", "turns", "sleeps"}
# Wide enough for the profile's names (cpu_runnable_us_per_request).
NAME_WIDTH = 32
# The guest's metric names for tests/bench.py's columns.
BARE_COLUMNS = {
    "rr4k-qd1": "rand_read_4k_qd1", "rr4k-qd32": "rand_read_4k_qd32",
    "rw4k-qd1": "rand_write_4k_qd1", "rw4k-qd32": "rand_write_4k_qd32",
    "seqrd-1m": "seq_read_1m", "seqwr-1m": "seq_write_1m",
}


def column_of(metric: dict) -> str | None:
    owner = metric.get("backend", metric["console"])
    return next((key for key, _, owners in COLUMNS if owner in owners), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--bare", help="tests/bench.py --json output")
    ap.add_argument("--bare-disk", default="nvme0n1", help="its row to compare with")
    ap.add_argument("--json", help="write the table here too")
    a = ap.parse_args()
    results = json.load(open(a.results))
    bare = {}
    if a.bare:
        row = json.load(open(a.bare)).get(a.bare_disk, {})
        bare = {BARE_COLUMNS[k]: v for k, v in row.items() if k in BARE_COLUMNS}
    rounds: dict = {}
    for m in results["metrics"]:
        col = column_of(m)
        if col:
            rounds.setdefault((m["name"], m["unit"]), {}).setdefault(col, []).append(m["value"])
    present = [c for c in COLUMNS if any(c[0] in by for by in rounds.values())]
    peers = [c for c in present if c[0] != CANDIDATE]
    head = f"{'metric':<{NAME_WIDTH}}{'unit':<7}" + "".join(f"{label:>24}" for _, label, _ in present)
    head += "".join(f"{'stordom/' + key:>17}" for key, _, _ in peers)
    if bare:
        head += f"{'bare ' + a.bare_disk:>16}{'stordom/bare':>14}"
    print(head)
    table = []
    for (name, unit), by in rounds.items():
        row = {"metric": name, "unit": unit,
               "rounds": {key: by.get(key, []) for key, _, _ in present},
               "median": {key: statistics.median(by[key]) for key, _, _ in present if key in by}}
        line = f"{name:<{NAME_WIDTH}}{unit:<7}"
        line += "".join(f"{' '.join(f'{v:g}' for v in by.get(key, [])) or '-':>24}"
                        for key, _, _ in present)
        cand = row["median"].get(CANDIDATE)
        row["ratio"] = {key: cand / row["median"][key] for key, _, _ in peers
                        if cand is not None and row["median"].get(key)}
        line += "".join(f"{row['ratio'][key]:>16.2f}x" if key in row["ratio"] else f"{'-':>17}"
                        for key, _, _ in peers)
        if name in bare and bare[name] and cand is not None:
            row["bare"] = bare[name]
            line += f"{bare[name]:>16g}{cand / bare[name]:>13.2f}x"
        table.append(row)
        print(line)
    print("(each cell lists every round; the ratios are of the medians; for "
          f"{', '.join(sorted(LOWER_IS_BETTER))} lower is better, so a ratio below 1 is stordom ahead)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"run": a.results, "table": table}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
