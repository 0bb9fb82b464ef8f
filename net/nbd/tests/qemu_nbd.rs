//! The client over std TCP against a real qemu-nbd serving a temporary
//! file: data round-trips, and survives the server being killed and
//! restarted with writes in flight. Skipped, with a message, when
//! qemu-nbd is not installed (Debian: `apt-get install qemu-utils`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_client::*;

struct QemuNbd {
    child: Child,
    port: u16,
}

impl QemuNbd {
    fn start(file: &std::path::Path, port: u16) -> Option<QemuNbd> {
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "disk0",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "-e",
                "4",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(QemuNbd { child, port })
    }

    fn connect(&self) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(stream) => return stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(error) => panic!("qemu-nbd did not listen: {error}"),
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Buffers(HashMap<u64, Vec<u8>>);

impl NbdPayload for Buffers {
    fn write_payload(&mut self, tag: u64, at: u32, out: &mut [u8]) {
        out.copy_from_slice(&self.0[&tag][at as usize..at as usize + out.len()]);
    }
    fn read_payload(&mut self, tag: u64, at: u32, bytes: &[u8]) {
        self.0.get_mut(&tag).unwrap()[at as usize..at as usize + bytes.len()]
            .copy_from_slice(bytes);
    }
    fn read_zeroes(&mut self, tag: u64, at: u32, len: u32) {
        self.0.get_mut(&tag).unwrap()[at as usize..at as usize + len as usize].fill(0);
    }
}

/// Moves bytes until `pending` requests are done; the completions by tag.
fn drive(
    client: &mut NbdClient,
    stream: &mut TcpStream,
    memory: &mut Buffers,
    results: &mut HashMap<u64, Result<(), NbdRequestError>>,
) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        while client.wants_to_transmit() {
            let n = client.transmit(&mut buf, memory);
            stream.write_all(&buf[..n]).unwrap();
        }
        while let Some(done) = client.next_completion() {
            assert!(
                results.insert(done.tag, done.result).is_none(),
                "tag {} completed twice",
                done.tag
            );
        }
        if client.link_state() == NbdLinkState::Ready && client.pending() == 0 {
            return;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "qemu-nbd closed the connection");
        client.receive(&buf[..n], memory).unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(tag | 1).wrapping_add(tag) as u8)
        .collect()
}

#[test]
fn data_round_trips_through_qemu_nbd_across_a_server_restart() {
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        println!("SKIPPED: qemu-nbd is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("nbd-client-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("disk.img");
    std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    let port = free_port();
    let mut server = QemuNbd::start(&file, port).expect("qemu-nbd would not start");

    let config = NbdConfig {
        export_name: b"disk0".to_vec(),
        max_in_flight: 32,
        max_payload: 1 << 20,
        request_timeout: u64::MAX,
        structured_replies: true,
    };
    let mut client = NbdClient::new(config).unwrap();
    let mut memory = Buffers::default();
    let mut results = HashMap::new();
    let mut stream = server.connect();
    assert!(client.connection_started());
    drive(&mut client, &mut stream, &mut memory, &mut results);
    let export = *client.export().unwrap();
    assert_eq!(export.size, 4 << 20);
    assert!(export.structured_replies && export.can_flush());

    // Eight writes in flight, then a flush.
    for tag in 0..8u64 {
        memory.0.insert(tag, pattern(tag, 65536));
        let write = NbdCommand::Write {
            offset: tag * 65536,
            len: 65536,
            fua: tag == 3,
        };
        client.submit(0, tag, write, NbdOrder::Free).unwrap();
    }
    client
        .submit(0, 8, NbdCommand::Flush, NbdOrder::Free)
        .unwrap();
    drive(&mut client, &mut stream, &mut memory, &mut results);

    // Eight more writes sent, then the server dies before (all) their replies.
    for tag in 10..18u64 {
        memory.0.insert(tag, pattern(tag, 65536));
        let write = NbdCommand::Write {
            offset: tag * 65536,
            len: 65536,
            fua: false,
        };
        client.submit(0, tag, write, NbdOrder::Free).unwrap();
    }
    let mut buf = vec![0u8; 1 << 20];
    let n = client.transmit(&mut buf, &mut memory);
    stream.write_all(&buf[..n]).unwrap();
    drop(server);
    client.connection_lost();
    server = QemuNbd::start(&file, port).expect("qemu-nbd would not restart");
    stream = server.connect();
    assert!(client.connection_started());
    drive(&mut client, &mut stream, &mut memory, &mut results);

    // Everything reads back, through the client and in the file.
    for tag in 20..36u64 {
        let source = if tag < 28 { tag - 20 } else { tag - 18 };
        memory.0.insert(tag, vec![0xee; 65536]);
        let read = NbdCommand::Read {
            offset: source * 65536,
            len: 65536,
        };
        client.submit(0, tag, read, NbdOrder::Free).unwrap();
    }
    drive(&mut client, &mut stream, &mut memory, &mut results);
    assert!(results.values().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(results.len(), 8 + 1 + 8 + 16);
    let on_disk = std::fs::read(&file).unwrap();
    for tag in 20..36u64 {
        let source = if tag < 28 { tag - 20 } else { tag - 18 };
        let want = pattern(source, 65536);
        assert!(memory.0[&tag] == want, "read of write {source} differs");
        assert!(
            on_disk[source as usize * 65536..][..65536] == want[..],
            "file differs at write {source}"
        );
    }
    client.request_disconnect();
    let n = client.transmit(&mut buf, &mut memory);
    stream.write_all(&buf[..n]).unwrap();
    assert_eq!(client.link_state(), NbdLinkState::Disconnected);
    let _ = std::fs::remove_dir_all(&dir);
}
