//! mTLS and authorization between real proxies, with a real control plane on loopback:
//! what crosses the wire is TLS only, plaintext is refused at a strict inbound port, the app
//! learns the caller's verified identity (never a forged header), policies deny precisely and
//! apply to connections already open, and permissive mode lets plaintext in.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{control, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_proxy::app::Running;
use trellis_test_support::eventually;
use trellis_test_support::http_server;
use trellis_test_support::mesh::ControlPlane;
use trellis_test_support::process::free_port;

/// A `web` proxy with an upstream port for orders, returned once that port serves.
async fn web_caller(cp: &ControlPlane, what: &str) -> (Running, SocketAddr) {
    let web = proxy("web", cp, &["--upstream", "orders=127.0.0.1:0"]).await;
    let up = web.bound.upstreams[&trellis_core::ServiceName::new("orders").unwrap()];
    eventually(what, Duration::from_secs(10), || async move {
        (get(up, "/", "").await.0 == 200).then_some(())
    })
    .await;
    (web, up)
}

/// Forwards `listen` → `target`, keeping a copy of every byte that passes either way.
async fn recording_relay(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Arc::new(Mutex::new(Vec::new()));
    let sink = wire.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr), Box::new(cw)),
            ] {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match from.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                sink.lock().unwrap().extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown().await;
                });
            }
        }
    });
    (addr, wire)
}

async fn get(addr: SocketAddr, path: &str, extra_header: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: orders\r\n{extra_header}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identity_and_policy_between_real_proxies() {
    let (_running, cp) = control("security", |_| {}).await;

    // orders: its proxy's inbound sits behind a relay that records the wire.
    let app = http_server::spawn("orders").await;
    let inbound = free_port();
    let (relay, wire) = recording_relay(inbound).await;
    let orders = proxy(
        "orders",
        &cp,
        &[
            "--app",
            &app.addr.to_string(),
            "--inbound",
            &inbound.to_string(),
            "--advertise",
            &relay.to_string(),
        ],
    )
    .await;
    let web = proxy(
        "web",
        &cp,
        &[
            "--inbound",
            "127.0.0.1:0",
            "--upstream",
            "orders=127.0.0.1:0",
        ],
    )
    .await;
    let up = web.bound.upstreams[&trellis_core::ServiceName::new("orders").unwrap()];

    // The app gets the caller's verified identity, not the one the caller's app forged.
    let (status, body) = eventually(
        "web reaches orders",
        Duration::from_secs(10),
        || async move {
            let r = get(
                up,
                "/headers",
                "x-trellis-client-id: spiffe://trellis.local/ns/default/svc/admin\r\n",
            )
            .await;
            (r.0 == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body.contains("x-trellis-client-id: spiffe://trellis.local/ns/default/svc/web"),
        "{body}"
    );
    assert!(!body.contains("svc/admin"), "{body}");

    // A WebSocket upgrade gets a connection of its own, over mTLS too.
    let mut ws = tokio::net::TcpStream::connect(up).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            ws.read(&mut b).await.unwrap(),
            1,
            "closed before 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ws.write_all(b"websocket-frame").await.unwrap();
    let mut back = [0u8; 15];
    ws.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"websocket-frame");
    drop(ws);

    // Nothing readable crossed the wire: a TLS 1.3 handshake, then encrypted records.
    let captured = wire.lock().unwrap().clone();
    assert!(
        captured.len() > 1000,
        "the relay saw the traffic ({} bytes)",
        captured.len()
    );
    assert_eq!(captured[0], 0x16, "starts with a TLS handshake record");
    for needle in [
        &b"/headers"[..],
        b"orders",
        b"x-trellis",
        b"spiffe",
        b"HTTP/1.1",
        b"PRI * HTTP/2",
    ] {
        assert!(
            !captured.windows(needle.len()).any(|w| w == needle),
            "plaintext {:?} on the wire",
            String::from_utf8_lossy(needle)
        );
    }

    // Plaintext straight to the strict inbound port: closed without an answer.
    let (status, raw) = get(inbound, "/", "").await;
    assert_eq!(
        (status, raw.as_str()),
        (0, ""),
        "plaintext must be refused: {raw}"
    );

    // Raw TCP through web's upstream port reaches the app while allowed (it answers the
    // non-HTTP bytes with a 400): the denial below is the policy, not the path.
    let mut tcp = tokio::net::TcpStream::connect(up).await.unwrap();
    tcp.write_all(b"HELLO orders\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &first, b"HTTP/1.1 400",
        "the app answered over the TCP stream"
    );
    drop(tcp);
    // Policies: DENY by path wins; an ALLOW for someone else leaves web with no matching allow.
    // They apply to the connection web already has open to orders.
    let (s, b) = cp.apply("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin}\nspec:\n  targetRef: {name: orders}\n  action: DENY\n  rules:\n    - to: [{paths: [\"/admin*\"]}]\n").await;
    assert_eq!(s, 200, "{b}");
    let denied = eventually(
        "the DENY policy applies",
        Duration::from_secs(5),
        || async move {
            let r = get(up, "/admin/users", "").await;
            (r.0 == 403).then_some(r.1)
        },
    )
    .await;
    assert!(
        denied.contains("x-trellis-error: denied policy=default/no-admin"),
        "{denied}"
    );
    assert_eq!(
        get(up, "/headers", "").await.0,
        200,
        "other paths still allowed"
    );
    // AUDIT: counted and logged as a would-be denial, never blocking.
    let (s, b) = cp.apply("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: watch-headers}\nspec:\n  targetRef: {name: orders}\n  action: AUDIT\n  rules:\n    - to: [{paths: [/headers]}]\n").await;
    assert_eq!(s, 200, "{b}");
    let admin = orders.bound.admin;
    eventually("the AUDIT policy records", Duration::from_secs(5), || async move {
        assert_eq!(get(up, "/headers", "").await.0, 200, "audit never blocks");
        let (_, m) = trellis_test_support::mesh::http_call(admin, "GET", "/metrics", "", None).await;
        m.contains("trellis_authz_decisions_total{decision=\"audit\",policy=\"default/watch-headers\"}")
            .then_some(())
    })
    .await;
    let (s, b) = cp.apply("apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-batch}\nspec:\n  targetRef: {name: orders}\n  action: ALLOW\n  rules:\n    - from: [{services: [batch]}]\n").await;
    assert_eq!(s, 200, "{b}");
    let denied = eventually(
        "the ALLOW policy applies",
        Duration::from_secs(5),
        || async move {
            let r = get(up, "/headers", "").await;
            (r.0 == 403).then_some(r.1)
        },
    )
    .await;
    assert!(
        denied.contains("x-trellis-error: denied no-matching-allow"),
        "{denied}"
    );
    // A denied TCP stream: raw bytes through web's upstream port ride a CONNECT stream that
    // orders refuses; the caller's connection is closed without a byte from the app. (The
    // DENY of /admin* already matched TCP: HTTP-only conditions do not narrow a DENY.)
    let mut tcp = tokio::net::TcpStream::connect(up).await.unwrap();
    tcp.write_all(b"HELLO orders\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {read:?} {:?}",
        String::from_utf8_lossy(&buf)
    );

    // Permissive mode: plaintext is let in (and, with no identity, fails the ALLOW for batch).
    let (s, b) = cp.apply("apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: permissive}\n").await;
    assert_eq!(s, 200, "{b}");
    let plain = eventually(
        "plaintext accepted in permissive mode",
        Duration::from_secs(5),
        || async move {
            let r = get(inbound, "/headers", "").await;
            (r.0 != 0).then_some(r)
        },
    )
    .await;
    assert_eq!(plain.0, 403, "{}", plain.1);

    // Decisions and handshakes are counted on the orders proxy.
    let (_, metrics) =
        trellis_test_support::mesh::http_call(orders.bound.admin, "GET", "/metrics", "", None)
            .await;
    for line in [
        "trellis_authz_decisions_total{decision=\"deny\",policy=\"default/no-admin\"}",
        "trellis_authz_decisions_total{decision=\"deny\",policy=\"no-matching-allow\"}",
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}",
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"plaintext_refused\"}",
        "trellis_identity_expiry_timestamp_seconds",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    // Golden metrics say which calls were mTLS and who made them.
    let inbound = |src: &str, tls: &str| {
        metrics.lines().any(|l| {
            l.starts_with("trellis_http_requests_total{direction=\"inbound\"")
                && l.contains(&format!("src=\"{src}\""))
                && l.contains(&format!("tls=\"{tls}\""))
        })
    };
    assert!(inbound("web", "true"), "mTLS calls from web:\n{metrics}");
    assert!(
        inbound("unknown", "false"),
        "the plaintext call in permissive mode:\n{metrics}"
    );
}

/// Certificates of one minute, renewed at ~70% of their lifetime, under steady traffic for
/// 100 s: no request fails, every proxy renews at least twice, and a proxy that joins late
/// (new handshakes against renewed certificates) is served too. For a soak run:
/// `TRELLIS_SOAK_SECS=600 TRELLIS_SOAK_CERT_TTL_SECS=120`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_under_load_without_failures() {
    let knob = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (soak, ttl) = (
        knob("TRELLIS_SOAK_SECS", 100),
        knob("TRELLIS_SOAK_CERT_TTL_SECS", 60),
    );
    let (_running, cp) = control("renewal", |c| {
        c.workload_cert_ttl = Duration::from_secs(ttl)
    })
    .await;
    let app = http_server::spawn("orders").await;
    let orders = proxy(
        "orders",
        &cp,
        &["--app", &app.addr.to_string(), "--inbound", "127.0.0.1:0"],
    )
    .await;
    let (web, up) = web_caller(&cp, "web reaches orders").await;
    let expiry = |admin: SocketAddr| async move {
        let (_, m) =
            trellis_test_support::mesh::http_call(admin, "GET", "/metrics", "", None).await;
        m.lines()
            .find_map(|l| l.strip_prefix("trellis_identity_expiry_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    let mut seen_orders = std::collections::BTreeSet::from([expiry(orders.bound.admin).await]);
    let mut seen_web = std::collections::BTreeSet::from([expiry(web.bound.admin).await]);

    let (mut ok, mut failed) = (0u64, Vec::new());
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(soak) {
        match get(up, "/", "").await {
            (200, _) => ok += 1,
            (status, body) => failed.push((status, body.lines().next().unwrap_or("").to_owned())),
        }
        if ok % 200 == 0 {
            seen_orders.insert(expiry(orders.bound.admin).await);
            seen_web.insert(expiry(web.bound.admin).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen_orders.insert(expiry(orders.bound.admin).await);
    seen_web.insert(expiry(web.bound.admin).await);
    eprintln!(
        "{ok} ok, {} failed; orders certificates {seen_orders:?}, web certificates {seen_web:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 2000, "steady traffic ({ok})");
    assert!(
        seen_orders.len() >= 3,
        "orders renewed at least twice: {seen_orders:?}"
    );
    assert!(
        seen_web.len() >= 3,
        "web renewed at least twice: {seen_web:?}"
    );

    let (_late, _) = web_caller(&cp, "a new proxy reaches orders").await;
}

/// A leaf for `uri` signed by `issuer`, valid in [not_before, not_after].
fn leaf(
    uri: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> std::sync::Arc<trellis_api::tls::CertResolver> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    let cert = p.signed_by(&key, issuer).unwrap();
    let ck = trellis_api::tls::certified_key(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .unwrap();
    trellis_api::tls::CertResolver::new(ck)
}

/// Handshakes from callers that must not get in: no client certificate, one from another CA,
/// an expired one from the mesh CA, garbage. Each is refused and counted by reason; the proxy
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_with_precise_reasons() {
    let (_running, cp) = control("badcerts", |_| {}).await;
    let data = cp.data.clone();
    let app = http_server::spawn("orders").await;
    let orders = proxy(
        "orders",
        &cp,
        &["--app", &app.addr.to_string(), "--inbound", "127.0.0.1:0"],
    )
    .await;
    let inbound = orders.bound.inbound;
    eventually(
        "orders has its certificate",
        Duration::from_secs(10),
        || async move {
            // Ready means certificate and first config: the inbound port can do mTLS.
            let (status, _) = trellis_test_support::mesh::http_call(
                orders.bound.admin,
                "GET",
                "/ready",
                "",
                None,
            )
            .await;
            (status == 200).then_some(())
        },
    )
    .await;

    let roots = trellis_api::tls::root_store(&std::fs::read(cp.bundle_path()).unwrap()).unwrap();
    let orders_id =
        trellis_core::identity::SpiffeId::parse("spiffe://trellis.local/ns/default/svc/orders")
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    // Another CA with the same trust domain in its certificates.
    let rogue_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rogue_params = rcgen::CertificateParams::default();
    rogue_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let rogue = rcgen::CertifiedIssuer::self_signed(rogue_params, rogue_key).unwrap();
    // The mesh's own intermediate, for a certificate that expired an hour ago.
    let int_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(data.join("ca/intermediate.key")).unwrap(),
    )
    .unwrap();
    let mesh_ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(data.join("ca/intermediate.pem")).unwrap(),
        int_key,
    )
    .unwrap();
    let web = "spiffe://trellis.local/ns/default/svc/web";
    let cases = [
        ("no_client_cert", None),
        (
            "unknown_ca",
            Some(leaf(web, &rogue, now - hour, now + hour)),
        ),
        (
            "cert_expired",
            Some(leaf(web, &mesh_ca, now - hour * 2, now - hour)),
        ),
    ];
    for (_, cert) in &cases {
        let config =
            trellis_api::tls::client_config(roots.clone(), orders_id.clone(), cert.clone())
                .unwrap();
        let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        // TLS 1.3: the client may finish before the server rejects its certificate; the
        // refusal shows on the first read.
        if let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
            .connect(trellis_api::tls::server_name(), tcp)
            .await
        {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                "the connection must be refused: {read:?}"
            );
        }
    }
    // Garbage that starts like TLS.
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x10garbage-garbage!")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;

    let (_, metrics) =
        trellis_test_support::mesh::http_call(orders.bound.admin, "GET", "/metrics", "", None)
            .await;
    for (reason, _) in &cases {
        let line =
            format!("trellis_tls_handshakes_total{{direction=\"inbound\",result=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(
        metrics.contains("result=\"not_tls\""),
        "garbage counted:\n{metrics}"
    );
    // Still serving the mesh.
    let (_web, _) = web_caller(&cp, "orders still serves").await;
}

async fn identity_expiry(admin: SocketAddr) -> i64 {
    let (_, m) = trellis_test_support::mesh::http_call(admin, "GET", "/metrics", "", None).await;
    m.lines()
        .find_map(|l| l.strip_prefix("trellis_identity_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// `trellis ca rotate` and `--finish` under steady traffic: every proxy renews under the new
/// root, proxies that join during and after the rotation are served, no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_load_fails_no_request() {
    let (_running, cp) = control("rotation", |_| {}).await;
    let data = cp.data.clone();
    let app = http_server::spawn("orders").await;
    let orders = proxy(
        "orders",
        &cp,
        &["--app", &app.addr.to_string(), "--inbound", "127.0.0.1:0"],
    )
    .await;
    let (web, up) = web_caller(&cp, "web reaches orders").await;
    let old_root = std::fs::read_to_string(data.join("ca/root.pem")).unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(up, "/", "").await {
                    (200, _) => ok += 1,
                    (s, body) => failed.push((s, body.lines().last().unwrap_or("").to_owned())),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }
    });
    let admin = cp.admin_token();
    let before = (
        identity_expiry(orders.bound.admin).await,
        identity_expiry(web.bound.admin).await,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s, body) = trellis_test_support::mesh::http_call(
        cp.http,
        "POST",
        "/api/v1/ca/rotation",
        "{}",
        Some(&admin),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"roots\":2"), "{body}");
    let new_root = std::fs::read_to_string(data.join("ca/root.pem")).unwrap();
    assert_ne!(old_root, new_root);
    // Retiring the old root right away would strand proxies that have not renewed yet.
    let (s, early) = trellis_test_support::mesh::http_call(
        cp.http,
        "POST",
        "/api/v1/ca/rotation",
        "{\"finish\":true}",
        Some(&admin),
    )
    .await;
    assert_eq!(s, 409, "{early}");
    assert!(
        early.contains("default/orders") && early.contains("default/web"),
        "{early}"
    );
    // Every proxy renews under the new root after the bundle grace.
    let (o, w) = (orders.bound.admin, web.bound.admin);
    eventually(
        "both proxies renewed",
        Duration::from_secs(20),
        || async move {
            (identity_expiry(o).await > before.0 && identity_expiry(w).await > before.1)
                .then_some(())
        },
    )
    .await;
    let (_during, _) = web_caller(&cp, "a proxy joining mid-rotation is served").await;

    let (_, mid) =
        trellis_test_support::mesh::http_call(cp.http, "GET", "/api/v1/check", "", None).await;
    assert!(
        mid.contains("\"name\":\"root-rotation\",\"ok\":false"),
        "a half-done rotation fails the check: {mid}"
    );
    // Finishing waits until every connected proxy reports a certificate from the new root
    // (heartbeats every ~3 s); until then it is refused, naming the proxies.
    let admin_ref = &admin;
    let body = eventually(
        "every proxy reports a new-root certificate",
        Duration::from_secs(15),
        || async move {
            let (s, body) = trellis_test_support::mesh::http_call(
                cp.http,
                "POST",
                "/api/v1/ca/rotation",
                "{\"finish\":true}",
                Some(admin_ref),
            )
            .await;
            if s == 409 {
                assert!(body.contains("old root"), "{body}");
            }
            (s == 200).then_some(body)
        },
    )
    .await;
    assert!(body.contains("\"roots\":1"), "{body}");
    let bundle = std::fs::read_to_string(data.join("ca/bundle.pem")).unwrap();
    assert_eq!(
        bundle.trim(),
        new_root.trim(),
        "only the new root is trusted"
    );
    // The bundle change makes every proxy renew once more, under traffic.
    let finished = (identity_expiry(o).await, identity_expiry(w).await);
    eventually(
        "both proxies renewed after the finish",
        Duration::from_secs(20),
        || async move {
            (identity_expiry(o).await > finished.0 && identity_expiry(w).await > finished.1)
                .then_some(())
        },
    )
    .await;
    let (_after, _) = web_caller(&cp, "a proxy joining after the rotation is served").await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    eprintln!(
        "requests during the rotation: {ok} ok, {} failed",
        failed.len()
    );
    assert!(ok > 500, "steady traffic ({ok})");
    // `trellis check` (the real CLI) sees a finished rotation and current proxy certificates.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["check", "--control-http", &format!("http://{}", cp.http)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "trust-bundle",
        "root-rotation",
        "intermediate-ca",
        "proxy-certificates",
        "clock-skew",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "{name}: {text}"
        );
    }
    assert!(
        !text.contains(" 0 connected proxies"),
        "proxies report their certificates: {text}"
    );
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
}
