//! What the endpoint shows and how: [`Metrics`] (gathered by the kernel
//! from the counters it already publishes in xenstore), rendered in the
//! Prometheus text format (`GET /metrics`) or as JSON (`GET /vbds`), and
//! the answer to a request, framed as an HTTP response.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

use blkback::statistics::LATENCY_BOUNDS_US;
use blkback::{VbdId, VbdSnapshot};

use crate::request::{BadRequest, Method, Request};

/// The largest response body: a larger one (thousands of vbds) is
/// answered 500 rather than built.
pub const RESPONSE_BODY_MAX: usize = 256 * 1024;

/// stordom as it stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub vbds: Vec<VbdSnapshot>,
    /// Frontend grants mapped now (`data/grants-mapped`).
    pub grants_mapped: u64,
    /// The heap's figures as published under `data/` (`heap-in-use`,
    /// `heap-peak`, `heap-size`, in bytes).
    pub heap: Vec<(&'static str, u64)>,
    /// In-place restarts so far (`data/restarts`).
    pub restarts: u64,
    /// The vif's counters.
    pub net: netfront::Statistics,
    /// Reconnects of each `nbd:` vbd's link since it was made.
    pub nbd_reconnects: Vec<(VbdId, u64)>,
}

/// One metric family: its name, help, type and samples
/// (`(labels, value)`).
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl fmt::Display) {
        let _ = if labels.is_empty() {
            writeln!(self.out, "{name} {value}")
        } else {
            writeln!(self.out, "{name}{{{labels}}} {value}")
        };
    }
}

/// Each vbd's label set, `frontend="F",devid="D"`.
fn vbd_labels(id: &VbdId) -> String {
    format!("frontend=\"{}\",devid=\"{}\"", id.frontend, id.devid)
}

/// One figure of a vbd.
type VbdFigure = fn(&VbdSnapshot) -> u64;

/// The per-vbd families: name, type, help, and the samples of each vbd
/// (`(kind label, figure)`; an empty label: no `kind`).
type VbdFamily = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, VbdFigure)],
);

const VBD_FAMILIES: [VbdFamily; 7] = [
    (
        "stordom_vbd_requests_total",
        "counter",
        "Requests completed, by kind (blkback's rd_req, wr_req, f_req, ds_req).",
        &[
            ("read", |v| v.totals.counters.rd_req),
            ("write", |v| v.totals.counters.wr_req),
            ("flush", |v| v.totals.counters.f_req),
            ("discard", |v| v.totals.counters.ds_req),
        ],
    ),
    (
        "stordom_vbd_read_bytes_total",
        "counter",
        "Bytes read (rd_sect times 512).",
        &[("", |v| v.totals.counters.rd_sect * blkback::SECTOR_SIZE)],
    ),
    (
        "stordom_vbd_written_bytes_total",
        "counter",
        "Bytes written (wr_sect times 512).",
        &[("", |v| v.totals.counters.wr_sect * blkback::SECTOR_SIZE)],
    ),
    (
        "stordom_vbd_errors_total",
        "counter",
        "Requests answered with an error.",
        &[("", |v| v.totals.counters.errors)],
    ),
    (
        "stordom_vbd_ring_full_total",
        "counter",
        "Times requests waited on the ring for a free slot (oo_req).",
        &[("", |v| v.totals.counters.oo_req)],
    ),
    (
        "stordom_vbd_in_flight",
        "gauge",
        "Requests taken from the rings and not yet answered.",
        &[("", |v| v.totals.in_flight as u64)],
    ),
    (
        "stordom_vbd_size_bytes",
        "gauge",
        "Size of the disk served (0 until it is opened).",
        &[("", |v| v.sectors.unwrap_or(0) * blkback::SECTOR_SIZE)],
    ),
];

/// The per-vbd latency histograms (see
/// [`blkback::statistics::RequestLatencies`]).
const LATENCY_FAMILY: &str = "stordom_vbd_request_duration_seconds";

/// `us` microseconds in seconds, as short as it goes (`0.00005`, `1`).
fn seconds_from_us(us: u64) -> String {
    let text = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').into()
}

/// `ns` nanoseconds in seconds, exactly.
fn seconds_from_ns(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// Each vbd's latency histograms, one per operation (`op` label) that has
/// answered a request: buckets cumulative as Prometheus has them, the sum
/// in seconds, the count. An operation with none yet is left out, as a
/// client library shows a labelled histogram only once it observed one:
/// an idle vbd adds nothing to the body.
fn latency_histograms(out: &mut String, vbds: &[(String, &VbdSnapshot)]) {
    let mut family = Family::start(
        out,
        LATENCY_FAMILY,
        "histogram",
        "Time from taking a request off the ring to pushing its response, by operation \
         (read; write, barriers included; other: flush, discard, unknown).",
    );
    let bounds: Vec<String> = LATENCY_BOUNDS_US
        .iter()
        .map(|&us| seconds_from_us(us))
        .chain([String::from("+Inf")])
        .collect();
    let (bucket, sum, count) = (
        format!("{LATENCY_FAMILY}_bucket"),
        format!("{LATENCY_FAMILY}_sum"),
        format!("{LATENCY_FAMILY}_count"),
    );
    for (labels, vbd) in vbds {
        for (operation, histogram) in vbd.totals.latencies.by_operation() {
            let requests = histogram.count();
            if requests == 0 {
                continue;
            }
            let labels = format!("{labels},op=\"{operation}\"");
            let mut cumulative = 0;
            for (bound, in_bucket) in bounds.iter().zip(histogram.buckets) {
                cumulative += in_bucket;
                family.sample(&bucket, &format!("{labels},le=\"{bound}\""), cumulative);
            }
            family.sample(&sum, &labels, seconds_from_ns(histogram.sum_ns));
            family.sample(&count, &labels, requests);
        }
    }
}

/// `GET /metrics`: the Prometheus text format (version 0.0.4).
pub fn prometheus(metrics: &Metrics) -> String {
    let mut out = String::new();
    let vbds: Vec<(String, &VbdSnapshot)> = metrics
        .vbds
        .iter()
        .map(|v| (vbd_labels(&v.id), v))
        .collect();
    for (name, kind, help, samples) in VBD_FAMILIES {
        let mut family = Family::start(&mut out, name, kind, help);
        for (labels, vbd) in &vbds {
            for (kind_label, figure) in samples {
                if kind_label.is_empty() {
                    family.sample(name, labels, figure(vbd));
                } else {
                    let labels = format!("{labels},kind=\"{kind_label}\"");
                    family.sample(name, &labels, figure(vbd));
                }
            }
        }
    }
    latency_histograms(&mut out, &vbds);
    Family::start(
        &mut out,
        "stordom_grants_mapped",
        "gauge",
        "Frontend grants mapped now.",
    )
    .sample("stordom_grants_mapped", "", metrics.grants_mapped);
    let mut family = Family::start(
        &mut out,
        "stordom_heap_bytes",
        "gauge",
        "The heap: in use, its peak, its size.",
    );
    for (node, value) in &metrics.heap {
        let figure = node.strip_prefix("heap-").unwrap_or(node);
        family.sample(
            "stordom_heap_bytes",
            &format!("figure=\"{figure}\""),
            *value,
        );
    }
    Family::start(
        &mut out,
        "stordom_restarts_total",
        "counter",
        "In-place restarts since the domain started.",
    )
    .sample("stordom_restarts_total", "", metrics.restarts);
    let mut family = Family::start(
        &mut out,
        "stordom_nbd_reconnects_total",
        "counter",
        "Connections an nbd vbd's link made to its server after the first.",
    );
    for (id, reconnects) in &metrics.nbd_reconnects {
        family.sample("stordom_nbd_reconnects_total", &vbd_labels(id), *reconnects);
    }
    let net = &metrics.net;
    for (name, help, rx, tx) in [
        (
            "stordom_net_frames_total",
            "Ethernet frames on the vif.",
            net.rx_frames,
            net.tx_frames,
        ),
        (
            "stordom_net_bytes_total",
            "Ethernet bytes on the vif.",
            net.rx_bytes,
            net.tx_bytes,
        ),
        (
            "stordom_net_dropped_total",
            "Frames dropped on the vif.",
            net.rx_dropped,
            net.tx_dropped + net.tx_errors,
        ),
    ] {
        let mut family = Family::start(&mut out, name, "counter", help);
        family.sample(name, "direction=\"rx\"", rx);
        family.sample(name, "direction=\"tx\"", tx);
    }
    out
}

/// `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `GET /vbds`: a JSON array, one object per vbd.
pub fn vbds_json(metrics: &Metrics) -> String {
    let mut out = String::from("[");
    for (n, vbd) in metrics.vbds.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "\n  {{\"frontend\": {}, \"devid\": {}, \"target\": ",
            vbd.id.frontend, vbd.id.devid
        );
        match &vbd.target {
            Some(target) => json_string(&mut out, target),
            None => out.push_str("null"),
        }
        let _ = write!(out, ", \"state\": \"{:?}\", \"sectors\": ", vbd.state);
        match vbd.sectors {
            Some(sectors) => {
                let _ = write!(out, "{sectors}");
            }
            None => out.push_str("null"),
        }
        out.push('}');
    }
    out.push_str("\n]\n");
    out
}

/// The answer to one request, as bytes to send (status line, headers,
/// body), from `metrics` (asked for only when a known path is read).
pub fn answer(
    request: Result<Request<'_>, BadRequest>,
    metrics: impl FnOnce() -> Metrics,
) -> Vec<u8> {
    let request = match request {
        Ok(request) => request,
        Err(BadRequest::Malformed) => return response(400, "Bad Request", TEXT, b"bad request\n"),
        Err(BadRequest::TooLong) => {
            return response(
                431,
                "Request Header Fields Too Large",
                TEXT,
                b"request head too long\n",
            );
        }
    };
    if request.method == Method::Other {
        return response(405, "Method Not Allowed", TEXT, b"GET or HEAD only\n");
    }
    let body = match request.path {
        "/metrics" => (PROMETHEUS, prometheus(&metrics())),
        "/vbds" => (JSON, vbds_json(&metrics())),
        _ => return response(404, "Not Found", TEXT, b"not found\n"),
    };
    if body.1.len() > RESPONSE_BODY_MAX {
        return response(500, "Internal Server Error", TEXT, b"response too large\n");
    }
    let mut bytes = response(200, "OK", body.0, body.1.as_bytes());
    if request.method == Method::Head {
        bytes.truncate(bytes.len() - body.1.len());
    }
    bytes
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON: &str = "application/json";

fn response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::request::parse_request;
    use alloc::string::ToString;
    use alloc::vec;
    use blkback::statistics::{LatencyHistogram, RequestCounters, RequestLatencies, VbdTotals};
    use xen_pv::xenbus::XenbusState;

    pub(crate) fn sample_metrics() -> Metrics {
        let vbd = VbdSnapshot {
            id: VbdId {
                frontend: 3,
                devid: 51712,
            },
            state: XenbusState::Connected,
            target: Some("ram:256M".to_string()),
            sectors: Some(524_288),
            totals: VbdTotals {
                counters: RequestCounters {
                    rd_req: 10,
                    wr_req: 20,
                    f_req: 2,
                    ds_req: 1,
                    rd_sect: 80,
                    wr_sect: 160,
                    oo_req: 4,
                    errors: 5,
                    answered: 38,
                    segments: 40,
                },
                latencies: RequestLatencies {
                    // 50 us or less: 3; 100 us: 2; 1 ms: 4; 1 s: 1; more: 1.
                    read: LatencyHistogram {
                        buckets: [3, 2, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 1],
                        sum_ns: 3_004_500_000,
                    },
                    write: LatencyHistogram {
                        buckets: [0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0],
                        sum_ns: 160_000_000,
                    },
                    other: LatencyHistogram::default(),
                },
                in_flight: 7,
                last_completion_ns: 0,
            },
        };
        let opening = VbdSnapshot {
            id: VbdId {
                frontend: 4,
                devid: 51728,
            },
            state: XenbusState::InitWait,
            target: Some("odd \"name\"\\\n".to_string()),
            sectors: None,
            totals: VbdTotals::default(),
        };
        Metrics {
            vbds: vec![vbd, opening],
            grants_mapped: 12,
            heap: vec![("heap-in-use", 100), ("heap-peak", 200), ("heap-size", 300)],
            restarts: 1,
            net: netfront::Statistics {
                rx_frames: 5,
                tx_frames: 6,
                rx_dropped: 1,
                ..Default::default()
            },
            nbd_reconnects: vec![(
                VbdId {
                    frontend: 5,
                    devid: 51712,
                },
                3,
            )],
        }
    }

    #[test]
    fn prometheus_shows_each_counter_once_with_its_labels() {
        let text = prometheus(&sample_metrics());
        let vbd = "frontend=\"3\",devid=\"51712\"";
        for line in [
            format!("stordom_vbd_requests_total{{{vbd},kind=\"read\"}} 10"),
            format!("stordom_vbd_requests_total{{{vbd},kind=\"write\"}} 20"),
            format!("stordom_vbd_requests_total{{{vbd},kind=\"flush\"}} 2"),
            format!("stordom_vbd_requests_total{{{vbd},kind=\"discard\"}} 1"),
            format!("stordom_vbd_read_bytes_total{{{vbd}}} 40960"),
            format!("stordom_vbd_written_bytes_total{{{vbd}}} 81920"),
            format!("stordom_vbd_errors_total{{{vbd}}} 5"),
            format!("stordom_vbd_ring_full_total{{{vbd}}} 4"),
            format!("stordom_vbd_in_flight{{{vbd}}} 7"),
            format!("stordom_vbd_size_bytes{{{vbd}}} 268435456"),
            "stordom_vbd_size_bytes{frontend=\"4\",devid=\"51728\"} 0".to_string(),
            "stordom_grants_mapped 12".to_string(),
            "stordom_heap_bytes{figure=\"in-use\"} 100".to_string(),
            "stordom_heap_bytes{figure=\"size\"} 300".to_string(),
            "stordom_restarts_total 1".to_string(),
            "stordom_nbd_reconnects_total{frontend=\"5\",devid=\"51712\"} 3".to_string(),
            "stordom_net_frames_total{direction=\"tx\"} 6".to_string(),
            "stordom_net_dropped_total{direction=\"rx\"} 1".to_string(),
        ] {
            assert_eq!(
                text.lines().filter(|l| *l == line).count(),
                1,
                "{line} in\n{text}"
            );
        }
        // Every sample's family is declared before it, once (a
        // histogram's samples are its name with a suffix).
        let mut declared = alloc::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    declared
                        .insert(name.to_string(), kind.to_string())
                        .is_none()
                );
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|base| declared.get(*base).is_some_and(|kind| kind == "histogram"))
                    .unwrap_or(name);
                assert!(declared.contains_key(family), "{line}");
            }
        }
    }

    #[test]
    fn prometheus_latency_buckets_are_cumulative_with_sum_and_count() {
        let text = prometheus(&sample_metrics());
        let name = "stordom_vbd_request_duration_seconds";
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")),
            "{text}"
        );
        let read = "frontend=\"3\",devid=\"51712\",op=\"read\"";
        let read_samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(read))
            .collect();
        assert_eq!(
            read_samples,
            [
                format!("{name}_bucket{{{read},le=\"0.00005\"}} 3"),
                format!("{name}_bucket{{{read},le=\"0.0001\"}} 5"),
                format!("{name}_bucket{{{read},le=\"0.00025\"}} 5"),
                format!("{name}_bucket{{{read},le=\"0.0005\"}} 5"),
                format!("{name}_bucket{{{read},le=\"0.001\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.0025\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.005\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.01\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.025\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.05\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.1\"}} 9"),
                format!("{name}_bucket{{{read},le=\"0.25\"}} 9"),
                format!("{name}_bucket{{{read},le=\"1\"}} 10"),
                format!("{name}_bucket{{{read},le=\"+Inf\"}} 11"),
                format!("{name}_sum{{{read}}} 3.004500000"),
                format!("{name}_count{{{read}}} 11"),
            ]
        );
        let write = "frontend=\"3\",devid=\"51712\",op=\"write\"";
        for line in [
            format!("{name}_bucket{{{write},le=\"0.005\"}} 0"),
            format!("{name}_bucket{{{write},le=\"0.01\"}} 20"),
            format!("{name}_bucket{{{write},le=\"+Inf\"}} 20"),
            format!("{name}_sum{{{write}}} 0.160000000"),
            format!("{name}_count{{{write}}} 20"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // No request yet: no series (the other operations of vbd 3, and
        // the vbd still opening).
        assert!(!text.contains("op=\"other\""), "{text}");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with(name) && l.contains("frontend=\"4\"")),
            "{text}"
        );
    }

    #[test]
    fn vbds_json_escapes_what_the_toolstack_wrote() {
        let json = vbds_json(&sample_metrics());
        assert!(json.contains(
            "{\"frontend\": 3, \"devid\": 51712, \"target\": \"ram:256M\", \"state\": \"Connected\", \"sectors\": 524288}"
        ));
        assert!(json.contains("\"target\": \"odd \\\"name\\\"\\\\\\u000a\""));
        assert!(json.contains("\"state\": \"InitWait\", \"sectors\": null"));
        assert_eq!(vbds_json(&Metrics::default()), "[\n]\n");
    }

    fn status_line(bytes: &[u8]) -> String {
        let text = core::str::from_utf8(bytes).unwrap();
        text.lines().next().unwrap().to_string()
    }

    #[test]
    fn answers_by_path_and_method() {
        let ask = |head: &[u8]| answer(parse_request(head), sample_metrics);
        let ok = ask(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status_line(&ok), "HTTP/1.0 200 OK");
        let text = core::str::from_utf8(&ok).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
        let head_only = ask(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(head_only, ok[..head.len() + 4]);
        for (head, status) in [
            (&b"GET /vbds HTTP/1.0\r\n\r\n"[..], "HTTP/1.0 200 OK"),
            (
                b"GET /nonexistent HTTP/1.1\r\n\r\n",
                "HTTP/1.0 404 Not Found",
            ),
            (
                b"DELETE /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.0 405 Method Not Allowed",
            ),
            (b"GARBAGE\r\n\r\n", "HTTP/1.0 400 Bad Request"),
        ] {
            assert_eq!(status_line(&ask(head)), status, "{head:?}");
        }
        assert_eq!(
            status_line(&answer(Err(BadRequest::TooLong), sample_metrics)),
            "HTTP/1.0 431 Request Header Fields Too Large"
        );
    }

    #[test]
    fn metrics_are_gathered_only_for_a_known_path() {
        let never = || -> Metrics { panic!("gathered for an unknown path") };
        let answered = answer(parse_request(b"GET /x HTTP/1.1\r\n\r\n"), never);
        assert_eq!(status_line(&answered), "HTTP/1.0 404 Not Found");
    }

    #[test]
    fn an_oversized_body_is_refused() {
        let mut metrics = sample_metrics();
        let vbd = metrics.vbds[0].clone();
        metrics.vbds = vec![vbd; 1000];
        let answered = answer(parse_request(b"GET /metrics HTTP/1.1\r\n\r\n"), || {
            metrics.clone()
        });
        assert_eq!(status_line(&answered), "HTTP/1.0 500 Internal Server Error");
    }
}
