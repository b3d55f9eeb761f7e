//! Proxy configuration: flags (each also from `TRELLIS_<FLAG>`), merged with the optional
//! static file, validated once into [`ProxyConfig`]. The result is what `/config` shows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;
use trellis_core::duration::parse_duration;
use trellis_core::proxy_config::{RawStaticConfig, parse_socket_addr};
use trellis_core::{ConfigError, Destination, Namespace, ProtocolHint, ServiceName, StaticConfig};

use crate::access_log::AccessLogTarget;

/// Command-line flags of `trellis-proxy`.
#[derive(Debug, Clone, Parser)]
#[command(name = "trellis-proxy", version, about = "The Trellis sidecar proxy")]
pub struct Args {
    /// The service this instance belongs to (required unless the --config file names it).
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: Option<String>,
    /// Namespace of the service.
    #[arg(long, env = "TRELLIS_NAMESPACE")]
    pub namespace: Option<String>,
    /// Unique instance id (default: hostname-pid).
    #[arg(long, env = "TRELLIS_INSTANCE")]
    pub instance: Option<String>,
    /// Where the local app listens.
    #[arg(long, env = "TRELLIS_APP", default_value = "127.0.0.1:8080")]
    pub app: String,
    /// Listener for other proxies and callers of this service.
    #[arg(long, env = "TRELLIS_INBOUND", default_value = "0.0.0.0:4143")]
    pub inbound: String,
    /// Listener for the app's outgoing calls (HTTP-proxy style: set HTTP_PROXY to it).
    #[arg(long, env = "TRELLIS_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: String,
    /// Admin server (/live, /ready, /metrics, /config, /log-level, /shutdown).
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:4191")]
    pub admin: String,
    /// A local port forwarding anything (HTTP, gRPC, TCP) to service NAME: NAME=ADDR. Repeatable.
    #[arg(long = "upstream", env = "TRELLIS_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Control plane gRPC address(es), comma separated: destinations are discovered from it.
    #[arg(long, env = "TRELLIS_CONTROL", value_delimiter = ',')]
    pub control: Vec<String>,
    /// With --control: how long to keep serving after deregistering on shutdown, so callers
    /// learn about it before the listeners close.
    #[arg(long, env = "TRELLIS_SHUTDOWN_GRACE", default_value = "1s")]
    pub shutdown_grace: String,
    /// With --control: a join token (`trellis token create`) proving which service this
    /// instance may claim; used once, for the first certificate.
    #[arg(long, env = "TRELLIS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// With --control: the mesh's trust bundle (PEM roots; `GET /api/v1/ca/bundle`), used to
    /// check the control plane before this proxy has anything else.
    #[arg(long, env = "TRELLIS_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "trellis.local")]
    pub trust_domain: String,
    /// Static mode: destinations, endpoints and protocol hints from a YAML/JSON file.
    #[arg(long, env = "TRELLIS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Locality reported to the registry.
    #[arg(long, env = "TRELLIS_ZONE")]
    pub zone: Option<String>,
    /// The environment this proxy runs in: picks an ExternalService's addresses.
    #[arg(long, env = "TRELLIS_ENV", default_value = "dev")]
    pub env: String,
    /// Labels reported to the registry: K=V. Repeatable.
    #[arg(long = "label", env = "TRELLIS_LABEL", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Address other proxies dial to reach this instance (default: the inbound address).
    #[arg(long, env = "TRELLIS_ADVERTISE")]
    pub advertise: Option<String>,
    /// Process log format: plain or json.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
    /// Process log level or filter (e.g. info, debug, trellis_proxy=trace).
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Access log: a file path, stdout, or off.
    #[arg(long, env = "TRELLIS_ACCESS_LOG", default_value = "off")]
    pub access_log: String,
    /// OTLP endpoint for spans, e.g. http://127.0.0.1:4317 (static mode; with a control
    /// plane, MeshConfig `tracing` decides).
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    #[arg(long, env = "TRELLIS_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: String,
    /// Share of new traces recorded (0..1) with --otlp-endpoint.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLING", default_value_t = 0.0)]
    pub trace_sampling: f64,
    /// How long protocol detection waits for a client's first bytes.
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "100ms")]
    pub detect_timeout: String,
    /// How long in-flight work may take to finish after SIGTERM or /shutdown.
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: String,
    /// Upstream connect timeout.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value = "1s")]
    pub connect_timeout: String,
    /// Deadline for a client to send a complete request head (slowloris guard).
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: String,
    /// Idle time after which client connections (from the app or callers) are closed.
    #[arg(long, env = "TRELLIS_CLIENT_IDLE_TIMEOUT", default_value = "10m")]
    pub client_idle_timeout: String,
    /// Idle time after which pooled upstream connections are closed.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "90s")]
    pub idle_timeout: String,
    /// Largest accepted HTTP/1 request head, in bytes.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = 65_536)]
    pub max_header_bytes: usize,
    /// Data-path worker threads (default: number of CPUs).
    #[arg(long, env = "TRELLIS_WORKERS")]
    pub workers: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Validated configuration of one proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyConfig {
    pub service: ServiceName,
    pub namespace: Namespace,
    pub instance: String,
    pub app: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub zone: Option<String>,
    pub env: String,
    pub labels: BTreeMap<String, String>,
    pub upstreams: BTreeMap<ServiceName, SocketAddr>,
    pub inbound_protocol: ProtocolHint,
    pub destinations: BTreeMap<ServiceName, Destination>,
    pub config_file: Option<PathBuf>,
    /// Control plane addresses (empty: static mode).
    pub control: Vec<String>,
    /// The join token (never serialized: `/config` shows the rest).
    #[serde(skip)]
    pub token: Option<String>,
    /// PEM roots from --trust-bundle.
    #[serde(skip)]
    pub trust_bundle: Option<String>,
    pub trust_domain: String,
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub access_log: AccessLogTarget,
    /// From --otlp-endpoint/--otlp-protocol/--trace-sampling (static mode).
    pub tracing: Option<trellis_core::resources::TracingConfig>,
    #[serde(with = "duration_str")]
    pub detect_timeout: Duration,
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    #[serde(with = "duration_str")]
    pub client_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub workers: usize,
}

mod duration_str {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&trellis_core::duration::format_duration(*d))
    }
}

/// Why the configuration was refused. The binary exits 64 with this message.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    #[error("--{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    #[error("{file}: {source}")]
    File {
        file: String,
        #[source]
        source: ConfigError,
    },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

fn flag<T>(flag: &'static str, r: Result<T, impl std::fmt::Display>) -> Result<T, InvalidConfig> {
    r.map_err(|e| InvalidConfig::Flag {
        flag,
        reason: e.to_string(),
    })
}

/// `--otlp-endpoint` and friends, checked like MeshConfig `tracing`.
fn tracing_flags(
    args: &Args,
) -> Result<Option<trellis_core::resources::TracingConfig>, InvalidConfig> {
    use trellis_core::resources::{OtlpProtocol, TracingConfig};
    let Some(endpoint) = &args.otlp_endpoint else {
        return Ok(None);
    };
    let bad = |flag: &'static str, reason: String| InvalidConfig::Flag { flag, reason };
    if !endpoint.starts_with("http://") {
        return Err(bad(
            "otlp-endpoint",
            format!("{endpoint:?} is not an http:// URL"),
        ));
    }
    if !(0.0..=1.0).contains(&args.trace_sampling) {
        return Err(bad(
            "trace-sampling",
            format!("{} is not between 0 and 1", args.trace_sampling),
        ));
    }
    let protocol = match args.otlp_protocol.as_str() {
        "grpc" => OtlpProtocol::Grpc,
        "http/protobuf" => OtlpProtocol::HttpProtobuf,
        other => {
            return Err(bad(
                "otlp-protocol",
                format!("{other:?}: expected grpc or http/protobuf"),
            ));
        }
    };
    Ok(Some(TracingConfig {
        sampling: args.trace_sampling,
        otlp_endpoint: Some(endpoint.clone()),
        protocol,
    }))
}

impl ProxyConfig {
    /// Validates flags and reads the static file, if any.
    pub fn from_args(args: Args) -> Result<Self, InvalidConfig> {
        let file_config = match &args.config {
            Some(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| InvalidConfig::Read {
                    file: file.clone(),
                    source,
                })?;
                let mut raw: RawStaticConfig = if text.trim().is_empty() {
                    RawStaticConfig::default()
                } else {
                    StaticConfig::parse_raw(&text).map_err(|source| InvalidConfig::File {
                        file: file.clone(),
                        source,
                    })?
                };
                if let Some(service) = &args.service {
                    raw.service = Some(service.clone());
                }
                if let Some(ns) = &args.namespace {
                    raw.namespace = Some(ns.clone());
                }
                Some(
                    StaticConfig::from_raw(raw)
                        .map_err(|source| InvalidConfig::File { file, source })?,
                )
            }
            None => None,
        };
        let (service, namespace, mut upstreams, inbound_protocol, destinations) = match file_config
        {
            Some(c) => (
                c.service,
                c.namespace,
                c.upstreams,
                c.inbound_protocol,
                c.destinations,
            ),
            None => {
                let service = args.service.as_deref().ok_or(InvalidConfig::Flag {
                    flag: "service",
                    reason: "is required (or use --config with a `service:` field)".into(),
                })?;
                let namespace = match &args.namespace {
                    Some(ns) => flag("namespace", Namespace::new(ns.as_str()))?,
                    None => Namespace::default(),
                };
                (
                    flag("service", ServiceName::new(service))?,
                    namespace,
                    BTreeMap::new(),
                    ProtocolHint::Detect,
                    BTreeMap::new(),
                )
            }
        };
        for spec in &args.upstreams {
            let (name, addr) = spec.split_once('=').ok_or_else(|| InvalidConfig::Flag {
                flag: "upstream",
                reason: format!("{spec:?} is not NAME=ADDR"),
            })?;
            let name = flag("upstream", ServiceName::new(name))?;
            let addr = flag("upstream", parse_socket_addr(addr))?;
            upstreams.insert(name, addr);
        }
        let mut labels = BTreeMap::new();
        for spec in &args.labels {
            let (k, v) = spec.split_once('=').ok_or_else(|| InvalidConfig::Flag {
                flag: "label",
                reason: format!("{spec:?} is not K=V"),
            })?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let log_format = match args.log_format.as_str() {
            "plain" => LogFormat::Plain,
            "json" => LogFormat::Json,
            other => {
                return Err(InvalidConfig::Flag {
                    flag: "log-format",
                    reason: format!("{other:?} is not plain or json"),
                });
            }
        };
        let positive = |name: &'static str, s: &str| -> Result<Duration, InvalidConfig> {
            let d = flag(name, parse_duration(s))?;
            if d.is_zero() {
                return Err(InvalidConfig::Flag {
                    flag: name,
                    reason: "must be greater than zero".into(),
                });
            }
            Ok(d)
        };
        if args.max_header_bytes < 1024 {
            return Err(InvalidConfig::Flag {
                flag: "max-header-bytes",
                reason: "must be at least 1024".into(),
            });
        }
        let workers = match args.workers {
            Some(0) => {
                return Err(InvalidConfig::Flag {
                    flag: "workers",
                    reason: "must be at least 1".into(),
                });
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        if !trellis_core::identity::valid_trust_domain(&args.trust_domain) {
            return Err(InvalidConfig::Flag {
                flag: "trust-domain",
                reason: format!(
                    "{:?} must be lowercase letters, digits, '.', '-' or '_'",
                    args.trust_domain
                ),
            });
        }
        let read_file = |flag: &'static str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|e| InvalidConfig::Flag {
                flag,
                reason: format!("{}: {e}", path.display()),
            })
        };
        let token = args
            .token_file
            .as_ref()
            .map(|p| read_file("token-file", p))
            .transpose()?
            .map(|t| t.trim().to_owned());
        let trust_bundle = args
            .trust_bundle
            .as_ref()
            .map(|p| read_file("trust-bundle", p))
            .transpose()?;
        if let Some(bundle) = &trust_bundle {
            flag(
                "trust-bundle",
                trellis_api::tls::root_store(bundle.as_bytes()),
            )?;
        }
        let has_control = args.control.iter().any(|a| !a.trim().is_empty());
        if has_control && trust_bundle.is_none() {
            return Err(InvalidConfig::Flag {
                flag: "trust-bundle",
                reason: "required with --control (the mesh's roots: `trellis get trust-bundle` or <data-dir>/ca/bundle.pem)".into(),
            });
        }
        if has_control && token.is_none() {
            return Err(InvalidConfig::Flag {
                flag: "token-file",
                reason: "required with --control (create one with `trellis token create --service NAME`)".into(),
            });
        }
        let tracing = tracing_flags(&args)?;
        Ok(Self {
            instance: args.instance.unwrap_or_else(default_instance),
            app: flag("app", parse_socket_addr(&args.app))?,
            inbound_addr: flag("inbound", parse_socket_addr(&args.inbound))?,
            outbound_addr: flag("outbound", parse_socket_addr(&args.outbound))?,
            admin_addr: flag("admin", parse_socket_addr(&args.admin))?,
            advertise: args
                .advertise
                .as_deref()
                .map(|a| flag("advertise", parse_socket_addr(a)))
                .transpose()?,
            zone: args.zone,
            env: args.env,
            labels,
            service,
            namespace,
            upstreams,
            inbound_protocol,
            destinations,
            config_file: args.config,
            control: args
                .control
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
            token,
            trust_bundle,
            trust_domain: args.trust_domain,
            shutdown_grace: flag("shutdown-grace", parse_duration(&args.shutdown_grace))?,
            log_format,
            log_level: args.log_level,
            access_log: flag("access-log", args.access_log.parse())?,
            tracing,
            detect_timeout: positive("detect-timeout", &args.detect_timeout)?,
            drain_timeout: positive("drain-timeout", &args.drain_timeout)?,
            connect_timeout: positive("connect-timeout", &args.connect_timeout)?,
            header_read_timeout: positive("header-read-timeout", &args.header_read_timeout)?,
            idle_timeout: positive("idle-timeout", &args.idle_timeout)?,
            client_idle_timeout: positive("client-idle-timeout", &args.client_idle_timeout)?,
            max_header_bytes: args.max_header_bytes,
            workers,
        })
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ProxyConfig, InvalidConfig> {
        let args =
            Args::try_parse_from(std::iter::once("trellis-proxy").chain(args.iter().copied()))
                .expect("clap");
        ProxyConfig::from_args(args)
    }

    #[test]
    fn tracing_flags_are_checked() {
        let c = parse(&[
            "--service",
            "web",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--otlp-protocol",
            "http/protobuf",
            "--trace-sampling",
            "0.5",
        ])
        .expect("valid");
        let t = c.tracing.expect("tracing");
        assert_eq!(t.sampling, 0.5);
        for (bad, flag) in [
            (["--otlp-endpoint", "collector:4317"], "otlp-endpoint"),
            (["--otlp-protocol", "zipkin"], "otlp-protocol"),
            (["--trace-sampling", "2"], "trace-sampling"),
        ] {
            let mut args = vec!["--service", "web"];
            if flag != "otlp-endpoint" {
                args.extend(["--otlp-endpoint", "http://c:4317"]);
            }
            args.extend(bad);
            match parse(&args) {
                Err(InvalidConfig::Flag { flag: f, .. }) => assert_eq!(f, flag),
                other => panic!("{flag}: {:?}", other.map(|_| ())),
            }
        }
        assert!(
            parse(&["--service", "web"])
                .expect("valid")
                .tracing
                .is_none()
        );
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = parse(&["--service", "web"]).expect("valid");
        assert_eq!(c.outbound_addr.to_string(), "127.0.0.1:4140");
        assert_eq!(c.inbound_addr.to_string(), "0.0.0.0:4143");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:4191");
        assert_eq!(c.app.to_string(), "127.0.0.1:8080");
        assert_eq!(c.detect_timeout, Duration::from_millis(100));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.namespace.as_str(), "default");
    }

    #[test]
    fn upstreams_are_repeatable() {
        let c = parse(&[
            "--service",
            "web",
            "--upstream",
            "a=127.0.0.1:1",
            "--upstream",
            "b=127.0.0.1:2",
        ])
        .expect("valid");
        assert_eq!(c.upstreams.len(), 2);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let e = parse(&[]).expect_err("service required");
        assert!(e.to_string().starts_with("--service"), "{e}");
        let e = parse(&["--service", "web", "--upstream", "nope"]).expect_err("bad");
        assert!(e.to_string().starts_with("--upstream"), "{e}");
        let e = parse(&["--service", "web", "--detect-timeout", "0ms"]).expect_err("bad");
        assert!(e.to_string().starts_with("--detect-timeout"), "{e}");
        let e = parse(&["--service", "web", "--app", "localhost"]).expect_err("bad");
        assert!(e.to_string().starts_with("--app"), "{e}");
    }

    #[test]
    fn file_errors_name_file_and_field() {
        let path = std::env::temp_dir().join(format!("trellis-cfg-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "service: web\ndestinations:\n  pay:\n    endpoints:\n      - address: bad\n",
        )
        .expect("write");
        let e = parse(&["--config", path.to_str().expect("utf8")]).expect_err("invalid");
        let msg = e.to_string();
        assert!(msg.contains("trellis-cfg-"), "{msg}");
        assert!(
            msg.contains("destinations.pay.endpoints[0].address"),
            "{msg}"
        );
        let _ = std::fs::remove_file(path);
    }
}
