//! Protocol detection from the first bytes of a tunnel.

/// What a stream carries, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `PRI * HTTP/2.0` connection preface (h2c prior knowledge).
    Http2,
    /// An HTTP/1.0 or 1.1 request line.
    Http1,
    /// A TLS record (the application does its own TLS): pass through.
    Tls,
    /// Anything else: pass through at L4.
    Opaque,
}

/// Result of looking at a prefix of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    Known(Protocol),
    /// The prefix is consistent with more than one answer; read more.
    NeedMore,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest prefix `sniff` ever needs; past it the answer is always known.
pub const MAX_SNIFF: usize = 8 * 1024;

const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Classifies `prefix`. Callers read until `Known` or `MAX_SNIFF` bytes (then
/// treat as opaque); a stream that ends first is opaque too.
pub fn sniff(prefix: &[u8]) -> Sniff {
    if prefix.is_empty() {
        return Sniff::NeedMore;
    }
    if prefix[0] == 0x16 {
        // TLS handshake record: content type 22, then version major 3.
        return match prefix.get(1) {
            None => Sniff::NeedMore,
            Some(3) => Sniff::Known(Protocol::Tls),
            Some(_) => Sniff::Known(Protocol::Opaque),
        };
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniff::Known(Protocol::Http2)
        } else {
            Sniff::NeedMore
        };
    }
    http1(prefix)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`
fn http1(prefix: &[u8]) -> Sniff {
    let method_ok = METHODS.iter().any(|m| {
        let k = prefix.len().min(m.len() + 1);
        let mut want = m.to_vec();
        want.push(b' ');
        prefix[..k] == want[..k]
    });
    if !method_ok {
        return Sniff::Known(Protocol::Opaque);
    }
    let Some(line_end) = prefix.iter().position(|&b| b == b'\n') else {
        return if prefix.len() >= MAX_SNIFF {
            Sniff::Known(Protocol::Opaque)
        } else {
            Sniff::NeedMore
        };
    };
    let line = prefix[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&prefix[..line_end]);
    let mut parts = line.split(|&b| b == b' ');
    let (_method, target, version, extra) =
        (parts.next(), parts.next(), parts.next(), parts.next());
    match (target, version, extra) {
        (Some(t), Some(b"HTTP/1.1" | b"HTTP/1.0"), None) if !t.is_empty() => {
            Sniff::Known(Protocol::Http1)
        }
        _ => Sniff::Known(Protocol::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], Sniff)] = &[
            (b"", Sniff::NeedMore),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                Sniff::Known(Protocol::Http2),
            ),
            (b"PRI * HTTP/2", Sniff::NeedMore),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                Sniff::Known(Protocol::Http1),
            ),
            (b"POST /x?y=1 HTTP/1.0\r\n", Sniff::Known(Protocol::Http1)),
            (b"GE", Sniff::NeedMore),
            (b"GET /very/long", Sniff::NeedMore),
            (b"GET / SPDY/3\r\n", Sniff::Known(Protocol::Opaque)),
            (b"GETX / HTTP/1.1\r\n", Sniff::Known(Protocol::Opaque)),
            (b"\x16\x03\x01\x02\x00", Sniff::Known(Protocol::Tls)),
            (b"\x16", Sniff::NeedMore),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Sniff::Known(Protocol::Opaque)),
            (b"\x00\x00\x00\x08", Sniff::Known(Protocol::Opaque)),
        ];
        for (input, want) in cases {
            assert_eq!(sniff(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn endless_request_line_is_opaque_at_the_limit() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_SNIFF, b'a');
        assert_eq!(sniff(&long), Sniff::Known(Protocol::Opaque));
    }
}
