//! Controllers that failed to come up: a vbd naming one of their disks
//! (whole, a partition, a range) gets an `error` node saying which
//! controller failed and why, and goes to Closed; every other vbd, those
//! on another controller's disks too, keeps serving.

use super::*;

/// Why the test's `nvme1` "failed" (as the NVMe driver words it).
const NVME1_REASON: &str = "the controller did not become ready (CSTS.RDY) within its CAP.TO";
/// Why the test's `ahci1p2` "failed".
const AHCI1P2_REASON: &str = "the port did not link up, stop or become idle in time";

/// What the test opener's kernel "found": `nvme1` failed as a whole,
/// `ahci1` came up but its port 2 did not.
pub(super) fn failures() -> BringUpFailures {
    let mut failures = BringUpFailures::new();
    failures.controller_failed("nvme1", NVME1_REASON);
    failures.disk_failed("ahci1p2", AHCI1P2_REASON);
    failures
}

#[test]
fn disks_of_a_controller_that_failed_to_come_up_are_refused_with_why() {
    run(|h| {
        let nvme1 = format!("controller nvme1 failed to come up: {NVME1_REASON}");
        let port = format!("disk ahci1p2 failed to come up: {AHCI1P2_REASON}");
        let refused = [
            (h.add_vbd(8, 768, "nvme1n1", "w"), &nvme1),
            (h.add_vbd(9, 768, "nvme1n1:p1", "w"), &nvme1),
            (h.add_vbd(10, 768, "nvme1n2@0+100", "r"), &nvme1),
            (h.add_vbd(11, 768, "ahci1p2", "w"), &port),
        ];
        let unknown = h.add_vbd(12, 768, "nvme2n1", "w");
        // Disks of the controller that came up, and a RAM disk, serve.
        let (namespace, mut namespace_front) = h.serve(13, "nvme0n1", "w", Protocol::X86_64);
        let (good, mut front) = h.connected(Protocol::X86_64, 0);
        for (id, why) in refused {
            assert_eq!(h.backend_state(id).as_deref(), Some("6"), "{id:?}");
            let error = h.backend_node(id, "error").unwrap();
            assert!(error.ends_with(why.as_str()), "{error}");
            assert!(h.logged(&error), "the console says it too: {error}");
        }
        let error = h.backend_node(unknown, "error").unwrap();
        assert!(
            error.ends_with("no such disk, partition or module"),
            "{error}"
        );
        for (id, front) in [(good, &mut front), (namespace, &mut namespace_front)] {
            let page = front.grant(false, &[]);
            let write = front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]);
            let read = front.data_request(blkif::OP_READ, 2, 0, 1, &[seg(page, 0, 7)]);
            assert_eq!(
                h.io(front, &[write, read]),
                [ok(1, blkif::OP_WRITE), ok(2, blkif::OP_READ)]
            );
            assert_eq!(h.vbds.status(id).unwrap().state, XenbusState::Connected);
        }
    });
}
