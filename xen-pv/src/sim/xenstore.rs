//! A simulated xenstored serving the guest's xenstore ring, with a dom0
//! side for tests: permissions, watches, transactions with conflicts, and
//! knobs for partial ring transfers, injected events and malformed replies.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::DomId;
use crate::ring::{PeerChannel, TimedOut};
use crate::xenstore::wire::{HEADER_LEN, Header, MsgType, PAYLOAD_MAX, encode_perms, parse_perms};
use crate::xenstore::{Access, Perm, XenstoreInterface, XsError};

#[derive(Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
}

type Tree = BTreeMap<String, Node>;

#[derive(PartialEq, Eq)]
struct Watch {
    /// Absolute form of the watched path.
    path: String,
    /// Registered relative to the guest's home: events are reported
    /// relative too, as xenstored does.
    relative: bool,
    token: String,
}

struct Transaction {
    tree: Tree,
    base_generation: u64,
    changed: BTreeSet<String>,
}

/// The daemon. As the client's [`PeerChannel`] it does one step of work per
/// `wait`, so the client and the daemon interleave deterministically.
pub struct SimXenstored<'a> {
    iface: &'a XenstoreInterface,
    guest: DomId,
    tree: Tree,
    generation: u64,
    transactions: BTreeMap<u32, Transaction>,
    next_tx: u32,
    watches: Vec<Watch>,
    incoming: Vec<u8>,
    outgoing: VecDeque<u8>,
    fired: Vec<(String, String)>,
    request_chunk: usize,
    reply_chunk: usize,
    fail_next: Option<XsError>,
    notifications: u64,
    requests: u64,
}

fn dom0_owned() -> Vec<Perm> {
    alloc::vec![Perm {
        domid: 0,
        access: Access::None,
    }]
}

impl<'a> SimXenstored<'a> {
    /// A daemon for guest `guest` with the usual tree: its home directory
    /// owned by the guest, the rest owned by dom0.
    pub fn new(iface: &'a XenstoreInterface, guest: DomId) -> Self {
        let mut d = SimXenstored {
            iface,
            guest,
            tree: Tree::new(),
            generation: 0,
            transactions: BTreeMap::new(),
            next_tx: 1,
            watches: Vec::new(),
            incoming: Vec::new(),
            outgoing: VecDeque::new(),
            fired: Vec::new(),
            request_chunk: usize::MAX,
            reply_chunk: usize::MAX,
            fail_next: None,
            notifications: 0,
            requests: 0,
        };
        for path in ["/", "/local", "/local/domain"] {
            d.tree.insert(
                path.to_string(),
                Node {
                    value: Vec::new(),
                    perms: dom0_owned(),
                },
            );
        }
        let home = Node {
            value: Vec::new(),
            perms: alloc::vec![Perm {
                domid: guest,
                access: Access::None,
            }],
        };
        d.tree.insert(format!("/local/domain/{guest}"), home);
        d
    }

    /// Limits how many bytes one step moves in each direction, to force
    /// partial reads and writes.
    pub fn set_chunks(&mut self, request_bytes: usize, reply_bytes: usize) {
        self.request_chunk = request_bytes.max(1);
        self.reply_chunk = reply_bytes.max(1);
    }

    /// Makes the next request fail with `error`.
    pub fn fail_next(&mut self, error: XsError) {
        self.fail_next = Some(error);
    }

    /// Queues a watch event before whatever the daemon sends next.
    pub fn inject_watch_event(&mut self, path: &str, token: &str) {
        self.push_message(
            MsgType::WatchEvent as u32,
            0,
            0,
            format!("{path}\0{token}\0").as_bytes(),
        );
    }

    /// Queues raw bytes on the reply stream (malformed replies).
    pub fn inject_raw(&mut self, bytes: &[u8]) {
        self.outgoing.extend(bytes);
    }

    /// Times the guest notified the store channel.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// Requests the guest sent, answered or not.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Watches the guest has registered.
    pub fn watch_count(&self) -> usize {
        self.watches.len()
    }

    /// Open transactions.
    pub fn open_transactions(&self) -> usize {
        self.transactions.len()
    }

    /// Dom0 reads a node.
    pub fn dom0_read(&self, path: &str) -> Option<Vec<u8>> {
        self.tree.get(path).map(|n| n.value.clone())
    }

    /// Dom0 writes a node (as the toolstack does), firing watches and
    /// conflicting with open transactions.
    pub fn dom0_write(&mut self, path: &str, value: &[u8]) {
        let mut tree = core::mem::take(&mut self.tree);
        let result = write_node(&mut tree, 0, path, value);
        self.tree = tree;
        if result.is_ok() {
            self.committed(path);
            self.send_fired_events();
        }
    }

    /// Dom0 removes a node and everything below it (as the toolstack
    /// does when a domain is destroyed), firing watches.
    pub fn dom0_rm(&mut self, path: &str) {
        let below = format!("{path}/");
        self.tree.retain(|k, _| k != path && !k.starts_with(&below));
        self.committed(path);
        self.send_fired_events();
    }

    /// Dom0 removes a node and everything below it without firing any
    /// watch: a xenstored that does not deliver the removal to us.
    pub fn dom0_rm_unwatched(&mut self, path: &str) {
        let below = format!("{path}/");
        self.tree.retain(|k, _| k != path && !k.starts_with(&below));
    }

    /// Dom0 sets a node's permissions.
    pub fn dom0_set_perms(&mut self, path: &str, perms: &[Perm]) {
        if let Some(node) = self.tree.get_mut(path) {
            node.perms = perms.to_vec();
            self.committed(path);
            self.send_fired_events();
        }
    }

    /// One round of work: take requests, answer them, send replies.
    /// Returns whether anything moved.
    pub fn step(&mut self) -> bool {
        let mut buf = alloc::vec![0u8; self.request_chunk.min(PAYLOAD_MAX + HEADER_LEN)];
        let read = self.iface.requests().read(&mut buf).unwrap_or(0);
        self.incoming.extend_from_slice(&buf[..read]);
        self.handle_complete_requests();
        let pending: Vec<u8> = self
            .outgoing
            .iter()
            .take(self.reply_chunk)
            .copied()
            .collect();
        let written = self.iface.responses().write(&pending).unwrap_or(0);
        self.outgoing.drain(..written);
        read > 0 || written > 0
    }

    fn handle_complete_requests(&mut self) {
        while let Some(header_bytes) = self.incoming.first_chunk::<HEADER_LEN>() {
            let Ok(header) = Header::decode(header_bytes) else {
                // xenstored drops a connection that breaks framing.
                self.incoming.clear();
                return;
            };
            let end = HEADER_LEN + header.len as usize;
            if self.incoming.len() < end {
                return;
            }
            let payload: Vec<u8> = self.incoming.drain(..end).skip(HEADER_LEN).collect();
            self.requests += 1;
            let result = match self.fail_next.take() {
                Some(e) => Err(e),
                None => self.dispatch(&header, &payload),
            };
            // Events fired by this request go out before its reply: the
            // client must cope with that order.
            self.send_fired_events();
            match result {
                Ok(reply) => {
                    self.push_message(header.msg_type, header.req_id, header.tx_id, &reply)
                }
                Err(e) => {
                    let name = format!("{}\0", e.wire_name().unwrap_or("EINVAL"));
                    self.push_message(
                        MsgType::Error as u32,
                        header.req_id,
                        header.tx_id,
                        name.as_bytes(),
                    );
                }
            }
        }
    }

    fn send_fired_events(&mut self) {
        for (path, token) in core::mem::take(&mut self.fired) {
            self.inject_watch_event(&path, &token);
        }
    }

    fn push_message(&mut self, msg_type: u32, req_id: u32, tx_id: u32, payload: &[u8]) {
        let header = Header {
            msg_type,
            req_id,
            tx_id,
            len: payload.len() as u32,
        };
        self.outgoing.extend(header.encode());
        self.outgoing.extend(payload);
    }

    fn absolute(&self, path: &str) -> Result<String, XsError> {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/local/domain/{}/{path}", self.guest)
        };
        let well_formed = path == "/" || (!path.ends_with('/') && !path.contains("//"));
        well_formed.then_some(path).ok_or(XsError::Invalid)
    }

    fn dispatch(&mut self, header: &Header, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        let msg_type = MsgType::from_wire(header.msg_type).ok_or(XsError::NotImplemented)?;
        let mut fields = payload.splitn(2, |b| *b == 0);
        let first =
            core::str::from_utf8(fields.next().unwrap_or(&[])).map_err(|_| XsError::Invalid)?;
        let rest = fields.next().unwrap_or(&[]);
        let ok = b"OK\0".to_vec();
        match msg_type {
            MsgType::TransactionStart => {
                let id = self.next_tx;
                self.next_tx += 1;
                let tx = Transaction {
                    tree: self.tree.clone(),
                    base_generation: self.generation,
                    changed: BTreeSet::new(),
                };
                self.transactions.insert(id, tx);
                return Ok(format!("{id}\0").into_bytes());
            }
            MsgType::TransactionEnd => {
                let tx = self
                    .transactions
                    .remove(&header.tx_id)
                    .ok_or(XsError::NoEntry)?;
                if first == "T" {
                    if tx.base_generation != self.generation {
                        return Err(XsError::Again);
                    }
                    self.tree = tx.tree;
                    for path in tx.changed {
                        self.committed(&path);
                    }
                }
                return Ok(ok);
            }
            MsgType::ResetWatches => {
                self.watches.clear();
                self.transactions.clear();
                return Ok(ok);
            }
            MsgType::GetDomainPath => return Ok(format!("/local/domain/{first}\0").into_bytes()),
            MsgType::Watch | MsgType::Unwatch => {
                let path = self.absolute(first)?;
                let token = core::str::from_utf8(rest.strip_suffix(b"\0").unwrap_or(rest))
                    .map_err(|_| XsError::Invalid)?;
                let entry = Watch {
                    path,
                    relative: !first.starts_with('/'),
                    token: token.to_string(),
                };
                if msg_type == MsgType::Watch {
                    self.fired.push((first.to_string(), entry.token.clone()));
                    self.watches.push(entry);
                } else {
                    let at = self
                        .watches
                        .iter()
                        .position(|w| *w == entry)
                        .ok_or(XsError::NoEntry)?;
                    self.watches.remove(at);
                }
                return Ok(ok);
            }
            _ => {}
        }
        let path = self.absolute(first)?;
        let guest = self.guest;
        let tree = match header.tx_id {
            0 => &mut self.tree,
            id => &mut self.transactions.get_mut(&id).ok_or(XsError::NoEntry)?.tree,
        };
        let reply = match msg_type {
            MsgType::Read => readable(tree, guest, &path)?.value.clone(),
            MsgType::Directory => {
                readable(tree, guest, &path)?;
                let prefix = if path == "/" {
                    path.clone()
                } else {
                    format!("{path}/")
                };
                let mut out = Vec::new();
                for child in tree.keys().filter_map(|k| k.strip_prefix(&prefix)) {
                    if !child.is_empty() && !child.contains('/') {
                        out.extend_from_slice(child.as_bytes());
                        out.push(0);
                    }
                }
                out
            }
            MsgType::GetPerms => encode_perms(&readable(tree, guest, &path)?.perms),
            MsgType::Write => {
                write_node(tree, guest, &path, rest)?;
                ok
            }
            MsgType::Mkdir => {
                if !tree.contains_key(&path) {
                    write_node(tree, guest, &path, &[])?;
                }
                ok
            }
            MsgType::Rm => {
                let node = tree.get(&path).ok_or(XsError::NoEntry)?;
                if path == "/" || !access(&node.perms, guest).can_write() {
                    return Err(XsError::Access);
                }
                let below = format!("{path}/");
                tree.retain(|k, _| *k != path && !k.starts_with(&below));
                ok
            }
            MsgType::SetPerms => {
                let perms = parse_perms(rest).map_err(|_| XsError::Invalid)?;
                let node = tree.get_mut(&path).ok_or(XsError::NoEntry)?;
                let owner = node.perms.first().map(|p| p.domid);
                if perms.is_empty() || (guest != 0 && owner != Some(guest)) {
                    return Err(XsError::Access);
                }
                node.perms = perms;
                ok
            }
            _ => return Err(XsError::NotImplemented),
        };
        let modifies = matches!(
            msg_type,
            MsgType::Write | MsgType::Mkdir | MsgType::Rm | MsgType::SetPerms
        );
        if modifies {
            match header.tx_id {
                0 => self.committed(&path),
                id => {
                    if let Some(tx) = self.transactions.get_mut(&id) {
                        tx.changed.insert(path);
                    }
                }
            }
        }
        Ok(reply)
    }

    /// A change to `path` became visible: bump the generation (conflicting
    /// open transactions) and fire matching watches.
    fn committed(&mut self, path: &str) {
        self.generation += 1;
        let home = format!("/local/domain/{}/", self.guest);
        let below = |a: &str, b: &str| {
            a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'/'
        };
        for w in &self.watches {
            if w.path == path || below(path, &w.path) || below(&w.path, path) {
                let reported = match path.strip_prefix(&home) {
                    Some(relative) if w.relative => relative,
                    _ => path,
                };
                self.fired.push((reported.to_string(), w.token.clone()));
            }
        }
    }
}

fn access(perms: &[Perm], dom: DomId) -> Access {
    match perms.split_first() {
        _ if dom == 0 => Access::Both,
        Some((owner, _)) if owner.domid == dom => Access::Both,
        Some((owner, others)) => others
            .iter()
            .find(|p| p.domid == dom)
            .map_or(owner.access, |p| p.access),
        None => Access::None,
    }
}

fn readable<'t>(tree: &'t Tree, dom: DomId, path: &str) -> Result<&'t Node, XsError> {
    let node = tree.get(path).ok_or_else(|| absent(tree, dom, path))?;
    if access(&node.perms, dom).can_read() {
        Ok(node)
    } else {
        Err(XsError::Access)
    }
}

/// The error for reading a missing `path`: like xenstored, ENOENT only if
/// `dom` may read the nearest existing ancestor ("without permission you
/// have no permission to know it is not there"), else EACCES.
fn absent(tree: &Tree, dom: DomId, path: &str) -> XsError {
    let mut at = path;
    while let Some(i) = at.rfind('/') {
        at = if i == 0 { "/" } else { &at[..i] };
        if let Some(node) = tree.get(at) {
            return if access(&node.perms, dom).can_read() {
                XsError::NoEntry
            } else {
                XsError::Access
            };
        }
        if at == "/" {
            break;
        }
    }
    XsError::NoEntry
}

/// Writes `path`, creating it and missing parents with the permissions of
/// the nearest existing ancestor (owned by the writer if not dom0).
fn write_node(tree: &mut Tree, dom: DomId, path: &str, value: &[u8]) -> Result<(), XsError> {
    if let Some(node) = tree.get_mut(path) {
        if !access(&node.perms, dom).can_write() {
            return Err(XsError::Access);
        }
        node.value = value.to_vec();
        return Ok(());
    }
    let mut missing = alloc::vec![path.to_string()];
    let parent = loop {
        let last = missing.last().map(String::as_str).unwrap_or("/");
        let up = match last.rfind('/') {
            Some(0) => "/".to_string(),
            Some(i) => last[..i].to_string(),
            None => return Err(XsError::Invalid),
        };
        match tree.get(&up) {
            Some(node) => break node.clone(),
            None => missing.push(up),
        }
    };
    if !access(&parent.perms, dom).can_write() {
        return Err(XsError::Access);
    }
    let mut perms = parent.perms;
    if let Some(owner) = perms.first_mut().filter(|_| dom != 0) {
        owner.domid = dom;
    }
    for (i, p) in missing.iter().enumerate() {
        let v = if i == 0 { value.to_vec() } else { Vec::new() };
        tree.insert(
            p.clone(),
            Node {
                value: v,
                perms: perms.clone(),
            },
        );
    }
    Ok(())
}

impl PeerChannel for SimXenstored<'_> {
    fn notify(&mut self) {
        self.notifications += 1;
    }

    fn wait(&mut self) -> Result<(), TimedOut> {
        if self.step() { Ok(()) } else { Err(TimedOut) }
    }
}
