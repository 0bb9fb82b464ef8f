//! The xenbus handshake with the simulated netback: what is published,
//! closing and reconnecting, and the nodes the toolstack or backend may
//! get wrong.

use alloc::format;

use xen_pv::xenbus::XenbusState;

use super::{MAC, Vif, small_config};
use crate::nodes::parse_unsigned;
use crate::pages::ShareError;
use crate::sim::SimHal;
use crate::{Netfront, NetfrontConfig, NetfrontError, Phase};

/// Pages of a netfront of `small_config`: two rings and the buffers.
const SMALL_PAGES: usize = 2 + 16 + 8;

#[test]
fn the_handshake_publishes_what_netback_reads_and_connects() {
    let mut vif = Vif::connected();
    let node = |vif: &mut Vif, name: &str| vif.netback.frontend_node(vif.xs.channel_mut(), name);
    for (name, value) in [
        ("request-rx-copy", "1"),
        ("feature-rx-notify", "1"),
        ("feature-sg", "0"),
        ("feature-gso-tcpv4", "0"),
        ("feature-no-csum-offload", "1"),
        ("state", "4"),
    ] {
        assert_eq!(node(&mut vif, name).as_deref(), Some(value), "{name}");
    }
    for name in ["tx-ring-ref", "rx-ring-ref", "event-channel"] {
        let value = node(&mut vif, name).expect(name);
        assert!(
            parse_unsigned(value.as_bytes()).is_some(),
            "{name} = {value}"
        );
    }
    // Single queue, single event channel: no per-queue or split nodes.
    assert_eq!(node(&mut vif, "multi-queue-num-queues"), None);
    assert_eq!(node(&mut vif, "event-channel-tx"), None);
    assert_eq!(vif.netback.state(), XenbusState::Connected);
    assert_eq!(vif.netback.connects, 1);
    assert_eq!(vif.netfront.mac(), [0, 0x16, 0x3e, 0, 0, 1]);
    assert_eq!(vif.netfront.backend_dir(), vif.netback.backend_dir());
    assert_eq!(
        vif.netback.rx_buffers_posted(),
        16,
        "every RX buffer posted"
    );
    assert_eq!(vif.hal.grants(), SMALL_PAGES);
    assert_eq!(vif.hal.open_ports(), 1);
    assert!(
        vif.store().watch_count() >= 1,
        "the backend's state is watched"
    );
    // Going Running kicked the backend once; nothing else was sent.
    assert_eq!(vif.netback.notifications_from_frontend(), 1);
}

#[test]
fn a_closing_backend_is_followed_to_closed_and_connected_again() {
    let mut vif = Vif::connected();
    let store = vif.xs.channel_mut();
    vif.netback.force_state(store, XenbusState::Closing);
    vif.netfront.attend(&mut vif.xs).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::Closing);
    assert!(!vif.netfront.is_running());
    assert_eq!(
        vif.netback
            .frontend_node(vif.xs.channel_mut(), "state")
            .as_deref(),
        Some("6"),
        "netback disconnects only when the frontend says Closed"
    );
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
    assert_eq!(vif.netback.connects, 2);
    assert_eq!(vif.netfront.statistics().connects, 2);
    assert_eq!(vif.hal.grants(), SMALL_PAGES, "the old grants were ended");
    assert_eq!(vif.hal.open_ports(), 1, "the old port was closed");
    assert_eq!(vif.netfront.leaked_pages(), 0);
    // Frames flow on the new connection.
    assert!(vif.send(&super::frame(1, 60)));
    vif.netback.step(vif.xs.channel_mut());
    assert_eq!(vif.netback.transmitted.len(), 1);
}

#[test]
fn a_restarted_backend_in_initwait_gets_fresh_rings() {
    let mut vif = Vif::connected();
    let old_port = vif.netfront.port().unwrap();
    let store = vif.xs.channel_mut();
    vif.netback.force_state(store, XenbusState::Initialising);
    vif.netfront.attend(&mut vif.xs).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::WaitingForBackend);
    assert_eq!(
        vif.hal.grants(),
        0,
        "nothing stays granted to a gone backend"
    );
    let store = vif.xs.channel_mut();
    vif.netback.force_state(store, XenbusState::InitWait);
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
    assert_ne!(vif.netfront.port(), Some(old_port));
    assert_eq!(vif.hal.open_ports(), 1);
}

#[test]
fn a_backend_left_connected_by_a_former_instance_is_reset() {
    let mut vif = Vif::small();
    let store = vif.xs.channel_mut();
    vif.netback.force_state(store, XenbusState::Connected);
    vif.netfront.start(&mut vif.xs, super::TOKEN).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::Closing);
    // Our Closed makes netback go Closing then Closed; then Initialising
    // brings it back to InitWait.
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
}

#[test]
fn a_removed_vif_is_left_alone() {
    let mut vif = Vif::connected();
    let frontend: alloc::string::String = vif.netback.frontend_dir().into();
    let backend: alloc::string::String = vif.netback.backend_dir().into();
    let store = vif.xs.channel_mut();
    store.dom0_rm(&backend);
    store.dom0_rm(&frontend);
    vif.netfront.attend(&mut vif.xs).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::Gone);
    assert_eq!(vif.hal.open_ports(), 0);
    let store = vif.xs.channel_mut();
    assert_eq!(
        store.dom0_read(&format!("{frontend}/state")),
        None,
        "no ghost node"
    );
}

#[test]
fn bad_nodes_fail_the_netfront_without_granting_anything() {
    let cases: [(&str, &[u8], NetfrontError); 5] = [
        ("mac", b"01:00:5e:00:00:01", NetfrontError::BadNode("mac")),
        ("mac", b"garbage", NetfrontError::BadNode("mac")),
        ("backend-id", b"32752", NetfrontError::BadNode("backend-id")),
        ("backend", b"../../etc", NetfrontError::BadNode("backend")),
        ("backend-id", b"", NetfrontError::BadNode("backend-id")),
    ];
    for (name, value, error) in cases {
        let mut vif = Vif::small();
        let path = format!("{}/{name}", vif.netback.frontend_dir());
        vif.store().dom0_write(&path, value);
        assert_eq!(
            vif.netfront.start(&mut vif.xs, super::TOKEN),
            Err(error.clone())
        );
        assert_eq!(vif.netfront.phase(), Phase::Failed);
        assert_eq!(vif.netfront.error(), Some(&error));
        assert_eq!(vif.hal.grants(), 0);
        vif.settle();
        assert_eq!(vif.netback.connects, 0);
    }
}

#[test]
fn a_backend_without_rx_copy_is_refused() {
    let mut vif = Vif::small();
    let path = format!("{}/feature-rx-copy", vif.netback.backend_dir());
    vif.store().dom0_write(&path, b"0");
    assert_eq!(
        vif.netfront.start(&mut vif.xs, super::TOKEN),
        Err(NetfrontError::NoRxCopy)
    );
    assert_eq!(vif.hal.grants(), 0);
    assert_eq!(vif.hal.open_ports(), 0);
}

#[test]
fn running_out_of_grants_or_pages_fails_cleanly() {
    let mut vif = Vif::small();
    vif.hal.limit_grants(SMALL_PAGES - 1);
    assert_eq!(
        vif.netfront.start(&mut vif.xs, super::TOKEN),
        Err(NetfrontError::Share(ShareError::OutOfGrants))
    );
    assert_eq!(vif.hal.grants(), 0, "the grants made were ended");

    let hal = SimHal::new();
    hal.limit_pages(SMALL_PAGES - 1);
    assert_eq!(
        Netfront::new(hal, small_config(), "device/vif/0").err(),
        Some(NetfrontError::OutOfMemory)
    );
    let bad = NetfrontConfig {
        rx_buffers: 257,
        ..small_config()
    };
    assert_eq!(
        Netfront::new(SimHal::new(), bad, "device/vif/0").err(),
        Some(NetfrontError::BadConfig)
    );
}

#[test]
fn a_backend_that_keeps_our_pages_mapped_costs_a_bounded_number_of_them() {
    let mut vif = Vif::connected();
    vif.netback.keep_rings_mapped = true;
    // Each reconnect loses both ring pages; the bound is 4.
    for round in 1..=2 {
        let store = vif.xs.channel_mut();
        vif.netback.force_state(store, XenbusState::Closing);
        vif.settle();
        assert_eq!(vif.netfront.phase(), Phase::Running, "round {round}");
        assert_eq!(vif.netfront.leaked_pages(), 2 * round);
    }
    assert_eq!(vif.hal.pages_allocated(), SMALL_PAGES + 4);
    let store = vif.xs.channel_mut();
    vif.netback.force_state(store, XenbusState::Closing);
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Failed);
    assert_eq!(
        vif.netfront.error(),
        Some(&NetfrontError::Share(ShareError::TooManyLeakedPages))
    );
    assert_eq!(vif.hal.pages_allocated(), SMALL_PAGES + 4);
    // What the backend holds stays granted; everything else was ended.
    assert_eq!(vif.hal.grants(), 2 * 3);
    let _ = MAC;
}

#[test]
fn attending_before_the_backend_connects_changes_nothing() {
    let mut vif = Vif::small();
    vif.netfront.start(&mut vif.xs, super::TOKEN).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::Published);
    let port = vif.netfront.port();
    let tx_ref = vif
        .netback
        .frontend_node(vif.xs.channel_mut(), "tx-ring-ref");
    for _ in 0..3 {
        vif.netfront.attend(&mut vif.xs).unwrap();
    }
    assert_eq!(vif.netfront.phase(), Phase::Published);
    assert_eq!(vif.netfront.port(), port);
    assert_eq!(
        vif.netback
            .frontend_node(vif.xs.channel_mut(), "tx-ring-ref"),
        tx_ref
    );
    assert_eq!(vif.netfront.statistics().connects, 1);
    // No frames before the backend is Connected.
    assert!(!vif.send(&super::frame(0, 60)));
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
    assert_eq!(vif.netback.connects, 1);
}

#[test]
fn a_backend_that_never_connects_is_given_up_on() {
    let mut vif = Vif::small();
    vif.netback.refuse_connects = true;
    vif.netfront.start(&mut vif.xs, super::TOKEN).unwrap();
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Failed);
    assert_eq!(
        vif.netfront.error(),
        Some(&NetfrontError::BackendNeverConnects(
            crate::MAX_UNCONNECTED_ATTEMPTS
        ))
    );
    assert_eq!(vif.netfront.statistics().connects, 4);
    assert_eq!(vif.hal.grants(), 0);
    assert_eq!(vif.hal.open_ports(), 0);
    // The operator (or kernel) may try again once the backend is fixed.
    vif.netback.refuse_connects = false;
    vif.netfront.start(&mut vif.xs, super::TOKEN).unwrap();
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
}
