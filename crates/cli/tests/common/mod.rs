//! In-process mesh pieces shared by the cli crate's integration tests: a control plane on
//! port 0 with a fresh data dir, and proxies that join it with a token and the trust bundle.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use trellis_proxy::app::Running;
use trellis_proxy::config::{Args, ProxyConfig};
use trellis_test_support::mesh::ControlPlane;

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trellis-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A control plane in this process; `configure` adjusts the defaults.
pub(crate) async fn control(
    name: &str,
    configure: impl FnOnce(&mut trellis_control::ControlConfig),
) -> (trellis_control::Running, ControlPlane) {
    let data = temp_dir(name);
    let mut config = trellis_control::ControlConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        data.clone(),
    );
    configure(&mut config);
    let running = trellis_control::start(config).await.unwrap();
    let cp = ControlPlane {
        grpc: running.grpc_addr,
        http: running.http_addr,
        data,
    };
    (running, cp)
}

/// A proxy of `service` joined to `cp`; listeners on port 0 unless `extra` sets them.
pub(crate) async fn proxy(service: &str, cp: &ControlPlane, extra: &[&str]) -> Running {
    let join = cp.join_args(service).await;
    let mut argv = vec!["trellis-proxy", "--service", service];
    for flag in ["--outbound", "--inbound", "--admin"] {
        if !extra.contains(&flag) {
            argv.extend([flag, "127.0.0.1:0"]);
        }
    }
    argv.extend(["--shutdown-grace", "100ms"]);
    argv.extend(join.iter().map(String::as_str));
    argv.extend_from_slice(extra);
    let config = ProxyConfig::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    trellis_proxy::app::start(config, Arc::new(trellis_proxy::logging::Fixed::default()))
        .await
        .unwrap()
}
