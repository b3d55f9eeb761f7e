//! Protocol detection: decide from a connection's first bytes whether it is TLS, HTTP/2 (h2c,
//! gRPC), HTTP/1.x or something else, without ever stalling a protocol where the server speaks
//! first (MySQL, SMTP). Such clients send nothing until greeted, so waiting for bytes that never
//! come would deadlock; after a short deadline (default 100 ms) we give up and treat the
//! connection as opaque TCP. Ports declared `tcp` skip detection entirely.
//!
//! [`classify`] is a pure function of the bytes seen so far (fuzzed in `fuzz/`); [`detect`] does
//! the reading and keeps what it read so the connection can be replayed from byte zero.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a connection turned out to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "tcp",
        }
    }
}

/// Why detection decided what it did (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectReason {
    /// The bytes matched a known protocol or clearly matched none.
    Matched,
    /// The port is declared opaque; nothing was read.
    Declared,
    /// No decisive bytes before the deadline (server-speaks-first, or a slow client).
    Timeout,
    /// The client closed its side before sending enough to decide.
    Eof,
}

impl DetectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectReason::Matched => "matched",
            DetectReason::Declared => "declared",
            DetectReason::Timeout => "timeout",
            DetectReason::Eof => "eof",
        }
    }
}

/// Result of looking at a prefix of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    Known(Protocol),
    /// Everything so far is a prefix of something recognisable; more bytes are needed.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods we recognise as HTTP/1. A fixed list (not "any token + space") so line protocols
/// such as SMTP's `HELO host` are never mistaken for HTTP.
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// The most bytes [`classify`] ever needs to decide.
pub const MAX_DETECT_BYTES: usize = H2_PREFACE.len();

/// Pure classification of the first bytes of a connection.
pub fn classify(buf: &[u8]) -> Classification {
    use Classification::*;
    if buf.is_empty() {
        return NeedMore;
    }
    // TLS record: handshake (0x16), version major 3, minor 0..=4 (SSL3 .. TLS1.3 record layers).
    if buf[0] == 0x16 {
        return match buf.get(1..3) {
            None if buf.get(1).is_none_or(|&b| b == 0x03) => NeedMore,
            Some([0x03, minor]) if *minor <= 0x04 => Known(Protocol::Tls),
            _ => Known(Protocol::Opaque),
        };
    }
    if let Some(c) = prefix_match(buf, H2_PREFACE) {
        return c.map_known(Protocol::Http2);
    }
    let mut need_more = false;
    for method in HTTP1_METHODS {
        match prefix_match(buf, method) {
            Some(Known(_)) => return Known(Protocol::Http1),
            Some(NeedMore) => need_more = true,
            None => {}
        }
    }
    if need_more {
        NeedMore
    } else {
        Known(Protocol::Opaque)
    }
}

impl Classification {
    fn map_known(self, p: Protocol) -> Self {
        match self {
            Classification::Known(_) => Classification::Known(p),
            Classification::NeedMore => Classification::NeedMore,
        }
    }
}

/// `Some(Known)` if `buf` starts with `pattern`, `Some(NeedMore)` if `buf` is a proper prefix of
/// it, `None` if they diverge.
fn prefix_match(buf: &[u8], pattern: &[u8]) -> Option<Classification> {
    let n = buf.len().min(pattern.len());
    if buf[..n] != pattern[..n] {
        None
    } else if buf.len() >= pattern.len() {
        Some(Classification::Known(Protocol::Opaque))
    } else {
        Some(Classification::NeedMore)
    }
}

/// Outcome of [`detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    pub protocol: Protocol,
    pub reason: DetectReason,
}

/// Reads from `io` into `buf` until the protocol is known, EOF, or `timeout` elapses.
/// Everything read stays in `buf` for replay. I/O errors are returned as-is.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Classification::Known(protocol) = classify(buf) {
            return Ok(Detected {
                protocol,
                reason: DetectReason::Matched,
            });
        }
        if buf.len() >= MAX_DETECT_BYTES {
            return Ok(Detected {
                protocol: Protocol::Opaque,
                reason: DetectReason::Matched,
            });
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_elapsed) => {
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    reason: DetectReason::Timeout,
                });
            }
            Ok(Ok(0)) => {
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    reason: DetectReason::Eof,
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Classification::*;

    #[test]
    fn classifies_known_protocols() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Known(Protocol::Http1));
        assert_eq!(
            classify(b"CONNECT a:1 HTTP/1.1\r\n"),
            Known(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Known(Protocol::Http2));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Known(Protocol::Tls)
        );
        assert_eq!(classify(b"\x00\x01garbage"), Known(Protocol::Opaque));
        assert_eq!(classify(b"HELO mail.example\r\n"), Known(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Known(Protocol::Opaque));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n\r\n"), Known(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x09]), Known(Protocol::Opaque));
    }

    #[test]
    fn waits_on_ambiguous_prefixes() {
        for prefix in [
            &b""[..],
            b"G",
            b"GE",
            b"P",
            b"PRI * HTTP/2",
            b"DELE",
            &[0x16],
            &[0x16, 0x03],
        ] {
            assert_eq!(classify(prefix), NeedMore, "{prefix:?}");
        }
    }

    #[test]
    fn never_needs_more_than_the_preface() {
        // Every byte string at least MAX_DETECT_BYTES long is decidable.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let len = MAX_DETECT_BYTES + (x % 8) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Bias toward bytes that appear in our patterns to explore prefixes.
                    b"PRI * HTTP/2.0\r\nSMGETOS\x16\x03"[(x % 22) as usize]
                })
                .collect();
            assert_ne!(classify(&buf), NeedMore, "{buf:?}");
            // Monotonic: once decided, longer prefixes keep the same answer, so the way bytes
            // are split across reads never changes the outcome.
            let mut decided = None;
            for end in 0..=buf.len() {
                match (decided, classify(&buf[..end])) {
                    (None, NeedMore) => {}
                    (None, c) => decided = Some(c),
                    (Some(d), c) => assert_eq!(c, d, "{buf:?} at {end}"),
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_as_opaque() {
        let (mut client, _server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let d = detect(&mut client, &mut buf, Duration::from_millis(100))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Opaque);
        assert_eq!(d.reason, DetectReason::Timeout);
        assert!(buf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn split_preface_is_reassembled() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            b.write_all(&H2_PREFACE[..5]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(10)).await;
            b.write_all(&H2_PREFACE[5..]).await.expect("write");
            b
        });
        let mut buf = BytesMut::new();
        let d = detect(&mut a, &mut buf, Duration::from_millis(100))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http2);
        assert_eq!(&buf[..], H2_PREFACE);
        drop(writer.await);
    }

    #[tokio::test(start_paused = true)]
    async fn eof_before_decision_is_opaque() {
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let mut buf = BytesMut::new();
        let d = detect(&mut a, &mut buf, Duration::from_secs(1))
            .await
            .expect("detect");
        assert_eq!(d.reason, DetectReason::Eof);
    }
}
