#!/usr/bin/env python3
"""Runs several scenarios one after another (each through run.py, with its
own run folder) and prints one summary: every scenario's verdict, then the
checks of all of them as "N passed, N failed" on the last line.

usage: suite.py [--retries N] SCENARIO...
Exit status 0 only if every scenario passed.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOTALS = re.compile(r"^(\d+) passed, (\d+) failed$")
RERUNS = re.compile(r"^reruns: (\d+)(.*)$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retries", type=int, default=3, help="reruns of an emulator-suspect run")
    ap.add_argument("scenarios", nargs="+")
    a = ap.parse_args()
    rows, passed, failed = [], 0, 0
    total_reruns, why = 0, []
    for name in a.scenarios:
        start = time.monotonic()
        p = subprocess.run(
            [sys.executable, str(HERE / "run.py"), name, "--no-build", "--retries", str(a.retries)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        sys.stdout.write(p.stdout)
        last = next((m for line in reversed(p.stdout.splitlines()) if (m := TOTALS.match(line.strip()))), None)
        ok, bad = (int(last.group(1)), int(last.group(2))) if last else (0, 1)
        rr = next((m for line in p.stdout.splitlines() if (m := RERUNS.match(line.strip()))), None)
        reruns = int(rr.group(1)) if rr else 0
        if reruns:
            why.append(f"{name}: {reruns}{rr.group(2)}")
        total_reruns += reruns
        if p.returncode != 0 and bad == 0:
            bad = 1  # the runner failed without counting it
        passed, failed = passed + ok, failed + bad
        rows.append((name, "PASS" if p.returncode == 0 else "FAIL", time.monotonic() - start, ok,
                     bad, reruns))
    print("\nscenario suite:")
    for name, verdict, secs, ok, bad, reruns in rows:
        print(f"  {verdict}  {name:<22} {secs:6.0f} s  {ok} passed, {bad} failed, {reruns} reruns")
    # Reruns hide bugs: every one is counted and its reason shown.
    print(f"suite reruns: {total_reruns}" + "".join(f"\n  {w}" for w in why))
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if all(r[1] == "PASS" for r in rows) else 1)


if __name__ == "__main__":
    main()
