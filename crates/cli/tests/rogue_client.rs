//! A rogue or broken client on the control plane's gRPC port: garbage bytes, out-of-order,
//! invalid and oversized messages. Each is refused with a precise status; the real `trellis
//! control` process stays up, keeps serving good proxies and keeps its store intact.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use trellis_api::pb;
use trellis_test_support::mesh::ControlPlane;
use trellis_test_support::process::{ControlProcess, free_port};

fn data_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("trellis-rogue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn register(service: &str, id: &str) -> pb::ProxyMessage {
    pb::ProxyMessage {
        message: Some(pb::proxy_message::Message::Register(pb::Register {
            instance: Some(pb::Instance {
                service: service.into(),
                namespace: "default".into(),
                instance_id: id.into(),
                address: "127.0.0.1:9".into(),
                zone: String::new(),
                labels: Default::default(),
            }),
            watching: vec!["api".into()],
        })),
    }
}

fn heartbeat() -> pb::ProxyMessage {
    pb::ProxyMessage {
        message: Some(pb::proxy_message::Message::Heartbeat(
            pb::Heartbeat::default(),
        )),
    }
}

/// A gRPC channel over TLS to the control plane, as `service` (with a certificate obtained
/// through a join token), or anonymous.
async fn channel(cp: &ControlPlane, service: Option<&str>) -> tonic::transport::Channel {
    let bundle = std::fs::read(cp.bundle_path()).unwrap();
    let roots = trellis_api::tls::root_store(&bundle).unwrap();
    let cert = match service {
        None => None,
        Some(service) => {
            let token = std::fs::read_to_string(cp.token_file(service, "").await).unwrap();
            let (key, csr) = trellis_proxy::identity::new_key_and_csr(&identity(service)).unwrap();
            let mut client = pb::proxy_control_client::ProxyControlClient::new(
                channel_with(cp.grpc, roots.clone(), None).await,
            );
            let rsp = client
                .certify(pb::CertifyRequest {
                    csr_pem: csr,
                    token,
                })
                .await
                .unwrap()
                .into_inner();
            let key =
                trellis_api::tls::certified_key(rsp.cert_chain_pem.as_bytes(), key.as_bytes())
                    .unwrap();
            Some(trellis_api::tls::CertResolver::new(key))
        }
    };
    channel_with(cp.grpc, roots, cert).await
}

fn identity(service: &str) -> trellis_core::identity::SpiffeId {
    trellis_core::identity::SpiffeId::new(
        "trellis.local",
        trellis_core::Namespace::default(),
        trellis_core::ServiceName::new(service).unwrap(),
    )
}

async fn channel_with(
    grpc: SocketAddr,
    roots: std::sync::Arc<rustls::RootCertStore>,
    cert: Option<std::sync::Arc<trellis_api::tls::CertResolver>>,
) -> tonic::transport::Channel {
    let config = trellis_api::tls::client_config(
        roots,
        trellis_core::identity::SpiffeId::control_plane("trellis.local"),
        cert,
    )
    .unwrap();
    trellis_api::tls::grpc_channel(&grpc.to_string(), config, Duration::from_secs(5))
        .await
        .unwrap()
}

/// Opens a session that sends `messages` (and keeps the stream open); returns the status the
/// control plane ended it with, or `None` if it is still open after a second.
async fn session_status(
    channel: tonic::transport::Channel,
    messages: Vec<pb::ProxyMessage>,
) -> Option<Code> {
    let (tx, rx) = mpsc::channel(16);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut client = pb::proxy_control_client::ProxyControlClient::new(channel);
    let outcome = tokio::time::timeout(Duration::from_secs(1), async {
        match client.session(ReceiverStream::new(rx)).await {
            Err(status) => status.code(),
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return Code::Ok,
                        Err(status) => return status.code(),
                    }
                }
            }
        }
    })
    .await;
    drop(tx);
    outcome.ok()
}

async fn instances(http: SocketAddr) -> String {
    http_get(http, "/api/v1/services").await
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_call(addr, "GET", path, "").await
}

async fn http_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: c\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_clients_are_refused_and_the_control_plane_stays_up() {
    let (grpc, http) = (free_port(), free_port());
    let data = data_dir();
    let mut cp =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;

    let cpl = ControlPlane {
        grpc,
        http,
        data: data.clone(),
    };
    let applied = cpl.apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 80, appProtocol: http}]}\n",
    )
    .await;
    assert_eq!(applied.0, 200, "{applied:?}");

    // A good proxy, connected throughout.
    let good = {
        let (tx, rx) = mpsc::channel(16);
        tx.send(register("api", "api-good")).await.unwrap();
        let mut client =
            pb::proxy_control_client::ProxyControlClient::new(channel(&cpl, Some("api")).await);
        let stream = client
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    };

    // No certificate: no session. A certificate of "api" claiming to be "payments": refused.
    assert_eq!(
        session_status(channel(&cpl, None).await, vec![register("api", "api-anon")]).await,
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        session_status(
            channel(&cpl, Some("api")).await,
            vec![register("payments", "p-0")]
        )
        .await,
        Some(Code::PermissionDenied)
    );
    // A token for "api" cannot buy the identity of "payments"; a garbage token buys nothing.
    let token = std::fs::read_to_string(cpl.token_file("api", "").await).unwrap();
    let mut anon = pb::proxy_control_client::ProxyControlClient::new(channel(&cpl, None).await);
    let (_, csr) = trellis_proxy::identity::new_key_and_csr(&identity("payments")).unwrap();
    let refused = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr.clone(),
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            token: "trellis-00.00".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A used-up single-use token is refused (a replay).
    let once = std::fs::read_to_string(cpl.token_file("api", ",\"maxUses\":1").await).unwrap();
    let (_, csr) = trellis_proxy::identity::new_key_and_csr(&identity("api")).unwrap();
    anon.certify(pb::CertifyRequest {
        csr_pem: csr.clone(),
        token: once.clone(),
    })
    .await
    .unwrap();
    let replay = anon
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            token: once,
        })
        .await
        .unwrap_err();
    assert!(replay.message().contains("already used"), "{replay:?}");

    // Out of order: the first message must be a registration.
    assert_eq!(
        session_status(channel(&cpl, Some("api")).await, vec![heartbeat()]).await,
        Some(Code::InvalidArgument)
    );
    // An empty message.
    assert_eq!(
        session_status(
            channel(&cpl, Some("api")).await,
            vec![pb::ProxyMessage { message: None }]
        )
        .await,
        Some(Code::InvalidArgument)
    );
    // Invalid instance fields: a service name that breaks DNS rules, a missing address.
    assert_eq!(
        session_status(
            channel(&cpl, Some("api")).await,
            vec![register("Not_A_Name", "x")]
        )
        .await,
        Some(Code::InvalidArgument)
    );
    let mut no_address = register("api", "api-no-address");
    if let Some(pb::proxy_message::Message::Register(r)) = &mut no_address.message {
        r.instance.as_mut().unwrap().address = "not an address".into();
    }
    assert_eq!(
        session_status(channel(&cpl, Some("api")).await, vec![no_address]).await,
        Some(Code::InvalidArgument)
    );
    // Registering twice ends the session, and its instance leaves the registry.
    assert_eq!(
        session_status(
            channel(&cpl, Some("api")).await,
            vec![register("api", "api-twice"), register("api", "api-twice")]
        )
        .await,
        Some(Code::InvalidArgument)
    );
    // More watches than one proxy may hold, then a message over the 4 MiB size limit.
    let mut greedy = register("api", "api-greedy");
    if let Some(pb::proxy_message::Message::Register(r)) = &mut greedy.message {
        r.watching = (0..20_000).map(|i| format!("service-{i}")).collect();
    }
    assert_eq!(
        session_status(channel(&cpl, Some("api")).await, vec![greedy]).await,
        Some(Code::ResourceExhausted)
    );
    let mut huge = register("api", "api-huge");
    if let Some(pb::proxy_message::Message::Register(r)) = &mut huge.message {
        r.watching = vec!["x".repeat(5 << 20)];
    }
    assert_eq!(
        session_status(channel(&cpl, Some("api")).await, vec![huge]).await,
        Some(Code::OutOfRange)
    );
    // Garbage bytes instead of TLS, a half-sent TLS hello, plaintext HTTP/2.
    for junk in [
        &b"\x16\x03\x01\x02\x00garbage-garbage"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\xff\xff\xff",
    ] {
        let mut s = tokio::net::TcpStream::connect(grpc).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(12), s.read(&mut buf)).await;
        // A partial TLS record is waited for up to the 10 s handshake deadline, then closed.
        assert!(
            read.is_ok(),
            "the control plane must answer or close, not hang"
        );
    }

    // Still up, still serving the good proxy, no rogue instance in the registry.
    assert!(cp.is_running(), "control plane died");
    let registry = instances(http).await;
    assert!(registry.contains("api-good"), "{registry}");
    for rogue in [
        "api-twice",
        "api-greedy",
        "api-huge",
        "api-no-address",
        "\"x\"",
    ] {
        assert!(
            !registry.contains(rogue),
            "{rogue} is in the registry: {registry}"
        );
    }
    let (tx, mut stream) = good;
    tx.send(heartbeat()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(_)))),
        "good session broke: {first:?}"
    );

    // The store is intact: it restarts and serves what was applied.
    cp.kill9().await;
    let cp =
        ControlProcess::start(Path::new(env!("CARGO_BIN_EXE_trellis")), grpc, http, &data).await;
    let stored = http_get(http, "/api/v1/resources").await;
    assert!(
        stored.contains("\"api\""),
        "the applied Service is gone: {stored}"
    );
    drop(cp);
}
