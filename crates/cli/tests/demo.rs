//! `trellis demo` end to end: the real `trellis` and `trellis-proxy` binaries on loopback.

#![allow(clippy::unwrap_used)]

#[test]
fn demo_sends_requests_through_two_proxies_and_drains() {
    let trellis = std::path::Path::new(env!("CARGO_BIN_EXE_trellis"));
    assert!(
        trellis.with_file_name("trellis-proxy").exists(),
        "build the workspace first (trellis-proxy must sit next to trellis)"
    );
    let out = std::process::Command::new(trellis)
        .args(["demo", "--requests", "40"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Sent 40 requests: 40 succeeded"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"dst="backend",route="default",code="200",classification="success"} 40"#),
        "{stdout}"
    );
    assert!(
        stdout.contains("frontend proxy exited: exit status: 0"),
        "{stdout}"
    );
}
