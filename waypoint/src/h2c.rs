//! HTTP/1.1 `Upgrade: h2c` (RFC 7540 §3.2; deprecated by RFC 9113 but
//! still what `curl --http2` and some JVM clients send on plaintext).
//!
//! The upgrade request becomes stream 1 of the new HTTP/2 connection and
//! its response is sent there. HTTP/2 servers (h2, hyper) have no way to
//! adopt a stream they did not receive, so the waypoint hands its HTTP/2
//! server the connection as if the client had opened stream 1 itself: the
//! client's preface and SETTINGS, then a HEADERS frame carrying the upgrade
//! request (HPACK literals that leave the dynamic table untouched, so the
//! client's later header blocks decode as the client encoded them), then
//! the rest of what the client sends.
//!
//! Only requests without a body are upgraded; others are answered over
//! HTTP/1.1, which the RFC allows (a server may ignore `Upgrade`). The
//! `HTTP2-Settings` header is not applied on its own: the SETTINGS frame of
//! the client's preface, which the server does apply, follows at once.

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, Request};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::sniff::H2_PREFACE;

/// Largest HEADERS frame we synthesize: HTTP/2's default frame size, so no
/// CONTINUATION is needed whatever the client's settings.
const MAX_FRAME: usize = 16 * 1024;

/// Whether `req` asks for an h2c upgrade the waypoint can take.
pub fn wants_upgrade<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let h = req.headers();
    req.version() == http::Version::HTTP_11
        && has_token(h, header::UPGRADE, "h2c")
        && has_token(h, header::CONNECTION, "upgrade")
        && h.contains_key("http2-settings")
        && req.body().is_end_stream()
}

fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The HEADERS frame (stream 1, END_STREAM | END_HEADERS) that stands for
/// the upgrade request; `None` when it would not fit one frame.
pub fn stream_one<B>(req: &Request<B>) -> Option<Bytes> {
    let authority = req
        .headers()
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()))?;
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut block = BytesMut::with_capacity(512);
    literal(&mut block, b":method", req.method().as_str().as_bytes());
    literal(&mut block, b":scheme", b"http");
    literal(&mut block, b":authority", authority);
    literal(&mut block, b":path", path.as_bytes());
    for (name, value) in req.headers() {
        // Connection-specific fields have no place in HTTP/2 (RFC 9113 §8.2.2).
        let skip = [
            header::HOST,
            header::CONNECTION,
            header::UPGRADE,
            header::TE,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
            || name == "http2-settings"
            || name == "keep-alive"
            || name == "proxy-connection";
        if !skip {
            literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if block.len() > MAX_FRAME {
        return None;
    }
    let mut frame = BytesMut::with_capacity(9 + block.len());
    let len = block.len() as u32;
    frame.put_slice(&len.to_be_bytes()[1..]);
    frame.put_u8(0x1); // HEADERS
    frame.put_u8(0x1 | 0x4); // END_STREAM | END_HEADERS
    frame.put_u32(1);
    frame.put_slice(&block);
    Some(frame.freeze())
}

/// A "literal header field without indexing, new name" (RFC 7541 §6.2.2),
/// strings not Huffman-coded.
fn literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    string(out, name);
    string(out, value);
}

fn string(out: &mut BytesMut, s: &[u8]) {
    integer(out, 7, 0, s.len());
    out.put_slice(s);
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn integer(out: &mut BytesMut, n: u32, flags: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

/// Reads the client's connection preface and first SETTINGS frame from the
/// upgraded connection and returns them with `stream_one` after them: the
/// bytes the HTTP/2 server must see first.
pub async fn client_start(
    io: &mut (impl AsyncRead + Unpin),
    stream_one: Bytes,
) -> std::io::Result<Bytes> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut start = BytesMut::with_capacity(H2_PREFACE.len() + 9 + 64 + stream_one.len());
    start.resize(H2_PREFACE.len() + 9, 0);
    io.read_exact(&mut start[..]).await?;
    if &start[..H2_PREFACE.len()] != H2_PREFACE {
        return Err(bad("no HTTP/2 preface after the upgrade"));
    }
    let head = &start[H2_PREFACE.len()..];
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    if head[3] != 0x4 || len > MAX_FRAME {
        return Err(bad("the preface is not followed by SETTINGS"));
    }
    let at = start.len();
    start.resize(at + len, 0);
    io.read_exact(&mut start[at..]).await?;
    start.put_slice(&stream_one);
    Ok(start.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut b = BytesMut::new();
        integer(&mut b, 5, 0, 10);
        assert_eq!(&b[..], [0x0a]);
        let mut b = BytesMut::new();
        integer(&mut b, 5, 0, 1337);
        assert_eq!(&b[..], [0x1f, 0x9a, 0x0a]);
    }

    #[test]
    fn the_upgrade_request_becomes_a_headers_frame_on_stream_one() {
        let req = Request::builder()
            .uri("/a?b=1")
            .header("host", "reviews:9080")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")
            .header("x-user", "alice")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(wants_upgrade(&req));
        let frame = stream_one(&req).expect("fits");
        assert_eq!(frame[3], 0x1, "HEADERS");
        assert_eq!(frame[4], 0x5, "END_STREAM | END_HEADERS");
        assert_eq!(&frame[5..9], [0, 0, 0, 1], "stream 1");
        let len = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
        assert_eq!(len, frame.len() - 9);
        let block = &frame[9..];
        let text = String::from_utf8_lossy(block);
        for want in [
            ":method",
            "GET",
            ":authority",
            "reviews:9080",
            ":path",
            "/a?b=1",
            "x-user",
            "alice",
        ] {
            assert!(text.contains(want), "{want} missing");
        }
        for gone in ["upgrade", "http2-settings", "connection", "host"] {
            assert!(!text.contains(gone), "{gone} must not be forwarded");
        }
    }

    #[test]
    fn requests_with_a_body_or_without_settings_are_not_upgraded() {
        let with_body = Request::builder()
            .method("POST")
            .header("connection", "upgrade, http2-settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(!wants_upgrade(&with_body));
        let no_settings = Request::builder()
            .header("connection", "upgrade")
            .header("upgrade", "h2c")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert!(!wants_upgrade(&no_settings));
    }
}
