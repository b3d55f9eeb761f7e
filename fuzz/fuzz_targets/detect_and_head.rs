//! Fuzzes what the proxy does with the first bytes of every connection: protocol detection
//! and the HTTP/1 request-head check. Neither may panic, and detection must be monotonic:
//! once a prefix is classified, longer prefixes get the same answer (bytes arriving in more
//! pieces never change the outcome).

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::detect::{Classification, MAX_DETECT_BYTES, classify};
use trellis_proxy::head::{HeadCheck, check_request_head};

fuzz_target!(|data: &[u8]| {
    let mut decided: Option<Classification> = None;
    for end in 0..=data.len().min(MAX_DETECT_BYTES + 8) {
        let c = classify(&data[..end]);
        if end >= MAX_DETECT_BYTES {
            assert_ne!(c, Classification::NeedMore, "undecided after {end} bytes");
        }
        match decided {
            Some(d) => assert_eq!(c, d, "classification changed at {end} bytes"),
            None if c != Classification::NeedMore => decided = Some(c),
            None => {}
        }
    }
    for limit in [1024, 64 * 1024] {
        if let HeadCheck::Complete(n) = check_request_head(data, limit) {
            assert!(n <= data.len() && n <= limit);
        }
    }
});
