#!/usr/bin/env python3
"""Host-only tests of run.py's console routing, parsing and verdicts:
feed synthetic consoles, check that failures are caught and that
emulator-suspect runs are told apart.  Run: python3 images/test_run.py"""
from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

TOML = """
timeout = 10
[env]
X = "1"
[[check]]
console = "guest-g1"
result = "integrity"
[[check]]
console = "guest-g1"
metrics = ["seq_read_1m"]
[[check]]
console = "dom0"
grep = "toolstack up"
[[check]]
console = "*"
absent = "blkback: .*error"
"""


# The first line of Xen's dump of a triple-faulted vCPU: Xen's own state
# (seen under QEMU's emulated SVM), and a guest's own.
XEN_STATE_DUMP = "(XEN) [   62.5] RIP:    e008:[<ffff82d0402044a5>]"
OWN_STATE_DUMP = "(XEN) [   62.5] RIP:    0008:[<000000000219f288>]"


class FakeQemu:
    """Stands for the QEMU process the reader may kill."""
    def __init__(self):
        self.kills = 0

    def kill(self):
        self.kills += 1


def scenario_dir(td: str, toml: str, files: dict[str, str | bytes] | None = None) -> Path:
    """A scenario folder in `td`: scenario.toml, an empty dom0.sh, `files`."""
    sdir = Path(td) / "sc"
    sdir.mkdir()
    (sdir / "scenario.toml").write_text(toml)
    (sdir / "dom0.sh").write_text("true\n")
    for name, data in (files or {}).items():
        path = sdir / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return sdir


def attempt(serial: list[str], done: bool = True, silent_s: float | None = None,
            xen_answered: bool = True, dom0_answered: bool = True,
            qemu: FakeQemu | None = None) -> dict:
    """Feeds `serial` through a run's reader; with `silent_s`, the run timed
    out that long after its last line and was diagnosed (Attempt.diagnose)
    with the given answers."""
    with tempfile.TemporaryDirectory() as td:
        sdir = scenario_dir(td, TOML)
        out = Path(td) / "out"
        out.mkdir()
        a = run.Attempt(run.Scenario(sdir), out, Path(td), 10)
        a.t0 = 0.0
        a.reader(io.BytesIO("".join(l + "\r\n" for l in serial).encode()), qemu or FakeQemu(), 1)
        for f in a.files.values():
            f.close()
        a.timed_out = not done
        if not done:
            a.done_rc = None
        a.elapsed, a.qemu_rc = 1.0, 0
        if silent_s is not None:
            last = {c: ls[-1][0] for c, ls in a.lines.items() if ls}
            a.diagnosis = {"t": max(last.values()) + silent_s, "last_line": last,
                           "xen_answered": xen_answered, "dom0_answered": dom0_answered,
                           "stordom_rip": []}
        res = a.evaluate()
        res["logs"] = sorted(p.name for p in out.iterdir())
        res["guest_log"] = (out / "guest-g1.log").read_text() if (out / "guest-g1.log").exists() else ""
        return res


GOOD = [
    "(XEN) [    0.1] Xen version 4.17",
    "[    1.0] Linux version 6.1.0",
    "[dom0] toolstack up",
    "STORDOM-DOM0-READY",
    "[con:guest-g1] STORDOM-GUEST-START",
    "[con:guest-g1] RESULT name=integrity disk=xvda status=pass secs=3",
    "[con:guest-g1] METRIC name=seq_read_1m disk=xvda value=123.5 unit=MiB/s",
    "RESULT name=create:g1 status=pass",
    "STORDOM-SCENARIO-DONE rc=0",
]


class RunTests(unittest.TestCase):
    def test_pass_and_routing(self):
        r = attempt(GOOD)
        self.assertEqual(r["verdict"], "pass", r["checks"])
        self.assertEqual(r["failed"], 0)
        self.assertIn("guest-g1.log", r["logs"])
        self.assertIn("xen.log", r["logs"])
        self.assertEqual(r["metrics"][0]["value"], 123.5)
        self.assertIn("STORDOM-GUEST-START", r["guest_log"])
        self.assertNotIn("[con:", r["guest_log"])
        self.assertNotIn("\r", r["guest_log"])

    def test_failed_result(self):
        r = attempt([l.replace("name=integrity disk=xvda status=pass",
                               'name=integrity disk=xvda status=fail detail="verify: bad magic"')
                     for l in GOOD])
        self.assertEqual(r["verdict"], "fail")
        bad = [c for c in r["checks"] if c["status"] == "fail"]
        self.assertEqual(len(bad), 1)
        self.assertIn("guest-g1.log:2", bad[0]["where"])

    def test_missing_result_and_metric(self):
        r = attempt([l for l in GOOD if "RESULT name=integrity" not in l and "METRIC" not in l])
        self.assertEqual(r["failed"], 2)

    def test_unreferenced_failed_result_counts(self):
        r = attempt(GOOD[:-1] + ['RESULT name=setup status=fail detail="x"', GOOD[-1]])
        self.assertEqual(r["verdict"], "fail")

    def test_script_rc_and_timeout(self):
        r = attempt(GOOD[:-1] + ["STORDOM-SCENARIO-DONE rc=3"])
        self.assertEqual(r["verdict"], "fail")
        r = attempt(GOOD[:-1], done=False)
        self.assertEqual(r["verdict"], "fail")
        self.assertIn("timeout", r["checks"][0]["name"])

    def test_absent(self):
        r = attempt(GOOD[:-1] + ["[con:guest-g1] xen-blkback: io error", GOOD[-1]])
        self.assertEqual(r["verdict"], "fail")

    def test_emulator_suspect(self):
        seg = "[con:guest-g1] [   5.0] fio[120]: segfault at 7f00 ip 55 sp 7ff error 4"
        r = attempt([l for l in GOOD if "RESULT name=integrity" not in l][:-1] + [seg, GOOD[-1]])
        self.assertEqual(r["verdict"], "emulator-suspect")
        # Suspect lines alone do not fail a run whose checks pass.
        r = attempt(GOOD[:-1] + [seg, GOOD[-1]])
        self.assertEqual(r["verdict"], "pass")
        self.assertEqual(len(r["suspects"]), 1)

    def test_triple_fault_fails_a_passing_run(self):
        crash = "[   62.7] (XEN) [   62.5] d1v0 Triple fault - invoking HVM shutdown action 1"
        r = attempt(GOOD[:-1] + [crash, XEN_STATE_DUMP, GOOD[-1]])
        self.assertEqual(r["verdict"], "emulator-suspect")
        self.assertIn("no domain triple-faulted", [c["name"] for c in r["checks"] if c["status"] != "pass"])

    def test_a_triple_fault_in_the_domains_own_state_is_not_blamed_on_the_emulator(self):
        crash = "(XEN) [   62.5] d1v0 Triple fault - invoking HVM shutdown action 1"
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP], done=True)
        self.assertEqual(r["verdict"], "domain-fault")
        self.assertNotIn("domain-fault", run.RERUN_VERDICTS)
        self.assertIn("cs 0008, RIP 0x219f288", r["evidence"][1])
        # The same dump, but dom0's xen-hvmctx shows Xen's IDT and GDT in
        # the saved state: the emulator's.
        tables = ["[dom0] diag:            idtr        (0xffff82d040577000 +     0x0fff)",
                  "[dom0] diag:            gdtr        (0xffff82d040461000 +     0xefff)"]
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP] + tables, done=True)
        self.assertEqual(r["verdict"], "emulator-suspect")
        self.assertIn("idtr 0xffff82d040577000, gdtr 0xffff82d040461000", r["evidence"][1])
        # stordom's own tables there: still ours.
        own = [t.replace("0xffff82d0405", "0x000000000019").replace("0xffff82d0404", "0x000000000018")
               for t in tables]
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP] + own, done=True)
        self.assertEqual(r["verdict"], "domain-fault")
        # A pending not-present fetch fault at RIP, while dom0 read the
        # code at RIP through the domain's page tables: the emulator's.
        fetch = ["[dom0] diag: Code (instr addr 0219f288)",
                 "[dom0] diag: cc cc b8 14 00 00 00 0f 01 d9 <c3> cc cc ",
                 "[dom0] diag:           event 0x80000b0e error 0x00000010"]
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP] + fetch, done=True)
        self.assertEqual(r["verdict"], "emulator-suspect")
        self.assertIn("not-present instruction-fetch page fault", r["evidence"][1])
        # A present-page fault (protection), or no code read at RIP: ours.
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP, fetch[0], fetch[1],
                                 fetch[2].replace("0x00000010", "0x00000011")], done=True)
        self.assertEqual(r["verdict"], "domain-fault")
        r = attempt(GOOD[:-1] + [crash, OWN_STATE_DUMP, fetch[2]], done=True)
        self.assertEqual(r["verdict"], "domain-fault")
        # Without Xen's dump there is no evidence either way: ours.
        r = attempt(GOOD[:-1] + [crash], done=True)
        self.assertEqual(r["verdict"], "domain-fault")
        self.assertIn("not captured", r["evidence"][1])

    def test_guest_debug_port_lines_go_to_xen(self):
        r = attempt(GOOD[:-1] + ["(d1) [   3.0] INFO  serve: watching backend/vbd; ready", GOOD[-1]])
        self.assertEqual(r["verdict"], "pass")
        self.assertIn("xen.log", r["logs"])

    def test_a_xen_line_spliced_into_a_dom0_line_is_taken_out(self):
        # As the serial line had it: dom0's line, stordom's line through
        # Xen, then the "\r\n" dom0 wrote after its text.
        spliced = ["RESULT name=shutdown:g2 status=pass(d1) [  154.7] INFO  vbd 3/51712: removed",
                   "", "[con:guest-g1] e2fsck 1.47.0(d1) [  154.8] INFO  hb up=1", " (5-Feb-2023)"]
        r = attempt(GOOD[:-1] + spliced + [GOOD[-1]])
        self.assertEqual(r["verdict"], "pass", r["checks"])
        self.assertIn("dom0: shutdown:g2", [c["name"] for c in r["checks"]])
        self.assertIn("e2fsck 1.47.0 (5-Feb-2023)", r["guest_log"])

    def test_machine_frozen_only_when_nobody_answers(self):
        r = attempt(GOOD[:-1], done=False, silent_s=100, xen_answered=False, dom0_answered=False)
        self.assertEqual(r["verdict"], "machine-frozen")
        self.assertIn("machine-frozen", run.RERUN_VERDICTS)
        # Xen answered its debug keys: the machine runs, something else hung.
        r = attempt(GOOD[:-1], done=False, silent_s=100, xen_answered=True, dom0_answered=False)
        self.assertEqual(r["verdict"], "fail")
        self.assertIn("Xen answered its debug keys: True", r["evidence"][0])
        # Silent only briefly: not frozen.
        r = attempt(GOOD[:-1], done=False, silent_s=5, xen_answered=False, dom0_answered=False)
        self.assertEqual(r["verdict"], "fail")

    def test_stordom_watchdog_means_stalled(self):
        wd = "(d1) [  40.0] WARN  watchdog: vbd 2/51712 ring 0: oldest request waited 5.0 s"
        r = attempt(GOOD[:-1] + [wd], done=False, silent_s=60)
        self.assertEqual(r["verdict"], "stordom-stalled")
        self.assertNotIn("stordom-stalled", run.RERUN_VERDICTS)
        self.assertIn("watchdog", r["evidence"][0])

    def test_stordom_heartbeat_stopped_with_work_outstanding(self):
        hb = "(d1) [  30.0] INFO  hb up=30.0 loops=9 outstanding={}"
        r = attempt(GOOD[:-1] + [hb.format(3)], done=False, silent_s=60)
        self.assertEqual(r["verdict"], "stordom-stalled")
        # An idle stordom beats no more: that is no stall.
        r = attempt(GOOD[:-1] + [hb.format(0)], done=False, silent_s=60)
        self.assertEqual(r["verdict"], "fail")

    def test_a_triple_fault_ends_the_attempt_at_once(self):
        crash = "(XEN) [   62.5] d1v0 Triple fault - invoking HVM shutdown action 1"
        # The reader stops waiting at the fault: the done marker never came.
        r = attempt(GOOD[:-1] + [crash, "(XEN) [   62.5] CPU:    0", XEN_STATE_DUMP], done=True)
        self.assertEqual(r["verdict"], "emulator-suspect")
        self.assertIn("a domain triple-faulted",
                      " ".join(c["detail"] for c in r["checks"] if c["status"] != "pass"))

    def test_the_kill_mark_kills_qemu_once(self):
        q = FakeQemu()
        r = attempt(GOOD[:-1] + ["[con:guest-g1] STORDOM-KILL-QEMU after fsync",
                                 "[con:guest-g1] STORDOM-KILL-QEMU again"], done=True, qemu=q)
        self.assertEqual(q.kills, 1)
        self.assertIn("qemu_killed_boot1", r["milestones"])

    def test_host_check_lines_are_the_host_console(self):
        with tempfile.TemporaryDirectory() as td:
            sdir = scenario_dir(
                td, 'host_check = "check.py"\nhost_disks = { "a.img" = 1 }\n',
                {"check.py": "import os, sys\n"
                 "print('RESULT name=seen-' + sys.argv[1] + ' status=pass disks=' + os.environ['DISKS'])\n"
                 "sys.exit(3)\n"})
            out = Path(td) / "out"
            out.mkdir()
            a = run.Attempt(run.Scenario(sdir), out, Path(td), 10)
            a.host_check("end")
            a.done_rc, a.timed_out, a.elapsed, a.qemu_rc = 0, False, 1.0, 0
            res = a.evaluate()
            for f in a.files.values():
                f.close()
            by_name = {c["name"]: c["status"] for c in res["checks"]}
            self.assertEqual(by_name.get("host: seen-end"), "pass")
            self.assertEqual(by_name.get("host: host-check:end"), "fail")

    def test_bad_host_disks_are_refused(self):
        with tempfile.TemporaryDirectory() as td:
            sdir = scenario_dir(td, 'host_disks = { "../x" = 1 }\n')
            with self.assertRaises(SystemExit):
                run.Scenario(sdir)

    def test_overlay_is_valid_cpio(self):
        with tempfile.TemporaryDirectory() as td:
            sdir = scenario_dir(td, '[files]\n"/stordom/x.elf" = "x.bin"\n',
                                {"x.bin": b"\x7fELF" + bytes(100)})
            data = gzip.decompress(run.build_overlay(run.Scenario(sdir)))
            names = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True,
                                   check=True).stdout.decode().split()
            for n in ("scenario/dom0.sh", "scenario/env.sh", "stordom/x.elf", "stordom"):
                self.assertIn(n, names)


if __name__ == "__main__":
    unittest.main(verbosity=1)
