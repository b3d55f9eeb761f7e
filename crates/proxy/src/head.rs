//! Checks the head of the first HTTP/1 request on a connection before hyper sees it.
//!
//! hyper answers a malformed head with a bare 400; reading the first head ourselves lets the
//! proxy answer with `x-trellis-error` (so a user can tell the proxy refused it), apply our own
//! size limit (431) and a header-read deadline (408, slowloris). Later requests on a keep-alive
//! connection are bounded by hyper's own limits, configured to the same values.

/// Result of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    /// A complete, well-formed request head of this many bytes.
    Complete(usize),
    /// Well-formed so far, not complete yet.
    Partial,
    /// The head exceeds the size limit.
    TooLarge,
    /// Not a valid HTTP/1 request head.
    Invalid(&'static str),
}

/// Most headers accepted in one request head.
pub const MAX_HEADERS: usize = 128;

/// Validates `buf` as the start of an HTTP/1.x request with at most `max_bytes` of head.
pub fn check_request_head(buf: &[u8], max_bytes: usize) -> HeadCheck {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > max_bytes => HeadCheck::TooLarge,
        Ok(httparse::Status::Complete(n)) => HeadCheck::Complete(n),
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => HeadCheck::TooLarge,
        Ok(httparse::Status::Partial) => HeadCheck::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadCheck::TooLarge,
        Err(e) => HeadCheck::Invalid(match e {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status",
            httparse::Error::Token => "invalid method token",
            httparse::Error::Version => "invalid HTTP version",
            _ => "invalid request head",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_partial_invalid_large() {
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(
            check_request_head(head, 1024),
            HeadCheck::Complete(head.len() - 4)
        );
        assert_eq!(
            check_request_head(b"GET /x HTTP/1.1\r\nHo", 1024),
            HeadCheck::Partial
        );
        assert!(matches!(
            check_request_head(b"GET /x HTTP/9\r\n\r\n", 1024),
            HeadCheck::Invalid(_)
        ));
        assert!(matches!(
            check_request_head(b"GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n", 1024),
            HeadCheck::Invalid(_)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(
            check_request_head(big.as_bytes(), 1024),
            HeadCheck::TooLarge
        );
        let many: String = (0..200).map(|i| format!("h{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            check_request_head(req.as_bytes(), 1 << 20),
            HeadCheck::TooLarge
        );
    }
}
