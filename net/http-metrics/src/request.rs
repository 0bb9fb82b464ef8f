//! The request head of an HTTP/1.0 or 1.1 request, parsed defensively:
//! the bytes come from any TCP peer. Only the request line matters (the
//! method and the path); header lines are skipped, never interpreted, and
//! a body is never read (the response is sent and the connection closed).

/// The longest request head kept: a longer one is answered 431.
pub const REQUEST_HEAD_MAX: usize = 1024;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: Method,
    /// The path, without its query string.
    pub path: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    /// As GET, without the body.
    Head,
    /// Anything else (answered 405).
    Other,
}

/// Why a head was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// The request line is not `METHOD SP TARGET SP HTTP/1.x`.
    Malformed,
    /// No end of head within [`REQUEST_HEAD_MAX`] bytes.
    TooLong,
}

/// Where the head in `received` ends (the index just past its blank
/// line), if it is complete.
pub fn head_end(received: &[u8]) -> Option<usize> {
    let crlf = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    let lf = received
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| at + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line of a complete head.
pub fn parse_request(head: &[u8]) -> Result<Request<'_>, BadRequest> {
    if head.len() > REQUEST_HEAD_MAX {
        return Err(BadRequest::TooLong);
    }
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(BadRequest::Malformed)?;
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let line = core::str::from_utf8(line).map_err(|_| BadRequest::Malformed)?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(BadRequest::Malformed);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(BadRequest::Malformed);
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control()) {
        return Err(BadRequest::Malformed);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Method::Other,
        _ => return Err(BadRequest::Malformed),
    };
    Ok(Request { method, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn a_plain_get_and_a_head() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.2\r\nUser-Agent: Wget\r\n\r\n";
        assert_eq!(head_end(head), Some(head.len()));
        assert_eq!(
            parse_request(head),
            Ok(Request {
                method: Method::Get,
                path: "/metrics"
            })
        );
        assert_eq!(
            parse_request(b"HEAD /vbds?pretty=1 HTTP/1.0\n\n"),
            Ok(Request {
                method: Method::Head,
                path: "/vbds"
            })
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n").map(|r| r.method),
            Ok(Method::Other)
        );
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nbody\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nX\r\n\r\n"), Some(16));
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        for head in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET http://x/metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /m\x01 HTTP/1.1\r\n\r\n",
            b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
            b"G\x00T / HTTP/1.1\r\n\r\n",
            b"no newline at all",
        ] {
            assert_eq!(parse_request(head), Err(BadRequest::Malformed), "{head:?}");
        }
    }

    #[test]
    fn a_head_past_the_bound_is_too_long() {
        let mut head = vec![b'a'; REQUEST_HEAD_MAX + 1];
        head[..4].copy_from_slice(b"GET ");
        assert_eq!(parse_request(&head), Err(BadRequest::TooLong));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let alphabet = b"GET HEAD/ \r\nHTTP/1.01?\x00\xff";
            let bytes: alloc::vec::Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 60)) as usize + i) % alphabet.len()])
                .collect();
            let _ = head_end(&bytes);
            let _ = parse_request(&bytes);
        }
    }
}
