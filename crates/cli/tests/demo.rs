//! `trellis demo` and `trellis up` end to end: the real binaries, real processes, loopback.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

fn trellis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_trellis"))
}

/// Processes whose command line or environment mentions `needle` (proxies carry the run
/// directory in their flags, apps in `TRELLIS_RUN_DIR`).
fn processes_matching(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(entry.path().join(f)).unwrap_or_default())
                .replace('\0', " ")
        };
        let (cmd, env) = (read("cmdline"), read("environ"));
        if cmd.contains(needle) || env.contains(needle) {
            out.push(cmd);
        }
    }
    out
}

#[test]
fn demo_runs_the_example_mesh_under_load_and_cleans_up() {
    assert!(
        trellis().with_file_name("trellis-proxy").exists(),
        "build the workspace first"
    );
    let dir = std::env::temp_dir().join(format!("trellis-demo-test-{}", std::process::id()));
    let out = std::process::Command::new(trellis())
        .args(["demo", "--duration", "6s", "--rps", "30", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in ["frontend", "orders-v1", "orders-v2", "inventory"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(svc) && l.contains('%')),
            "no summary row for {svc}:\n{stdout}"
        );
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Load generator:"))
        .unwrap();
    let sent: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    let ok: u64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!(sent > 100 && ok * 100 >= sent * 90, "{line}");
    assert!(
        processes_matching(dir.to_str().unwrap()).is_empty(),
        "processes left behind"
    );
}

#[test]
fn up_serves_traffic_and_sigterm_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("trellis-up-test-{}", std::process::id()));
    let mut child = std::process::Command::new(trellis())
        .args([
            "up",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo.yaml"),
            "--dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read the table until the prompt, then call the frontend through its proxy.
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut frontend_inbound = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("frontend ") {
            // The HTTP_PROXY column: inbound ports take mTLS only.
            frontend_inbound = line.split_whitespace().nth(4).map(str::to_owned);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let addr = frontend_inbound.expect("frontend row in the table");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: frontend\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("frontend: ok orders=200"), "{body}");
    let running = processes_matching(dir.to_str().unwrap());
    assert!(
        running.iter().filter(|c| c.contains("example-app")).count() == 5,
        "5 apps running: {running:?}"
    );
    assert!(
        running
            .iter()
            .filter(|c| c.contains("trellis-proxy"))
            .count()
            == 5,
        "5 proxies running: {running:?}"
    );

    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        processes_matching(dir.to_str().unwrap()).is_empty(),
        "processes left behind"
    );
}
