//! `trellis`: the control plane (`trellis control`), the operator CLI (`apply`, `get`,
//! `delete`) and the local mesh runner (`demo`).
//! Exit codes: 0 ok, 1 runtime failure, 2 usage error, 64 invalid configuration.

mod client;
mod demo;
mod example_app;
mod observe;
mod resources;
mod up;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh")]
struct Cli {
    /// Control plane HTTP API (default: the context written by `trellis up`/`demo`, else
    /// http://127.0.0.1:7441).
    #[arg(long, global = true, env = "TRELLIS_CONTROL_HTTP")]
    control_http: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the control plane.
    Control(ControlArgs),
    /// Applies resources from a YAML/JSON file (`-f -` reads stdin). All or nothing.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Validate and show what would change, without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Lists resources (`services`, `instances`, `routes`, `audit`, or any kind).
    Get {
        what: String,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// For `audit`: only records this recent (e.g. `10m`, `2h`).
        #[arg(long)]
        since: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// Golden signals per service (instances, RPS, success rate, p50/p95/p99, mTLS share),
    /// merged from the proxies' last minute; with SERVICE, also per route.
    Stat {
        service: Option<String>,
        /// Window in seconds (10..300).
        #[arg(long, default_value_t = 60)]
        window: u32,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// Golden signals per edge (caller -> callee) with the callee's verified identity.
    Edges {
        #[arg(long, default_value_t = 60)]
        window: u32,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// The busiest paths of a service, refreshing every 2 s.
    Top {
        service: String,
        #[arg(long, default_value_t = 60)]
        window: u32,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// Live requests of a service (metadata only, never bodies). Needs the admin token.
    Tap {
        service: String,
        /// Only paths starting with this.
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        method: Option<String>,
        /// Requests per second per proxy, at most (the control plane caps it at 100).
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Exit after this many requests.
        #[arg(long)]
        max: Option<u64>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// Deletes one resource.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Join tokens: what a proxy presents (`--token-file`) to get its service's identity.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Checks the mesh's trust: CA and bundle expiry, rotation, each connected proxy's
    /// certificate, clock skew. Exit 1 if any check fails.
    Check,
    /// Explains a call from SRC to DST: the route that matches, its backends and weights,
    /// timeouts and retries, each endpoint's state, and the authorization decision. Asks a
    /// proxy of SRC when one can be reached (the code that serves requests decides).
    Explain {
        src: String,
        dst: String,
        #[arg(default_value = "GET")]
        method: String,
        #[arg(default_value = "/")]
        path: String,
        /// Request header NAME:VALUE (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: resources::Output,
    },
    /// The mesh CA: root rotation and status.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Runs a whole mesh on this machine from one file (control plane, apps, proxies).
    Up {
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        /// Directory for logs and state (default: a temporary directory).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Runs the demo mesh (examples/demo.yaml) with a load generator and a live summary.
    Demo(demo::DemoArgs),
    /// A small example service used by the demo mesh.
    #[command(hide = true)]
    ExampleApp(example_app::ExampleArgs),
    /// Prints the version.
    Version,
}

#[derive(clap::Subcommand)]
pub(crate) enum CaCommand {
    /// Starts a root rotation (new root signs, old and new are trusted; every proxy renews),
    /// or with --finish retires the old root once every proxy has renewed.
    Rotate {
        #[arg(long)]
        finish: bool,
        /// With --finish: retire the old root even if some proxy has not renewed yet.
        #[arg(long, requires = "finish")]
        force: bool,
    },
    /// Shows the rotation phase and how many roots are trusted.
    Status,
}

#[derive(clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Creates a token and prints it (once; only its hash is stored).
    Create {
        #[arg(long)]
        service: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// How long the token may be used, e.g. 1h, 24h.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many proxies may use it (default: any number until it expires).
        #[arg(long)]
        uses: Option<u32>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token: proxies can no longer use it for a first certificate.
    Revoke { id: String },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// gRPC API for proxies.
    #[arg(long, env = "TRELLIS_GRPC", default_value = "127.0.0.1:7440")]
    grpc: String,
    /// HTTP JSON API (`/api/v1/...`) and `/metrics`.
    #[arg(long, env = "TRELLIS_HTTP", default_value = "127.0.0.1:7441")]
    http: String,
    /// Embedded store and control-plane state.
    #[arg(long, env = "TRELLIS_DATA_DIR", default_value = "./trellis-data")]
    data_dir: std::path::PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "trellis.local")]
    trust_domain: String,
    /// An instance whose proxy sends nothing for this long leaves the registry.
    #[arg(long, env = "TRELLIS_HEARTBEAT_TTL", default_value = "10s")]
    heartbeat_ttl: String,
    /// Root CA certificate (PEM) to issue from, instead of one created in the data dir.
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    ca_cert: Option<std::path::PathBuf>,
    /// Private key (PKCS#8 PEM) of --ca-cert.
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    ca_key: Option<std::path::PathBuf>,
    /// Lifetime of workload certificates (proxies renew at about 70%); at least 1m.
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value = "24h")]
    cert_ttl: String,
    /// Log filter.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("trellis: cannot start runtime: {e}");
            ExitCode::from(1)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let api = || client::ApiClient::new(client::resolve_base(cli.control_http.clone()));
    let result = match &cli.command {
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Control(args) => return rt.block_on(run_control(args)),
        Command::Demo(args) => {
            return match rt.block_on(demo::run(args.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ up::UpError::Invalid { .. }) => {
                    eprintln!("trellis demo: invalid configuration: {e}");
                    ExitCode::from(64)
                }
                Err(e) => {
                    eprintln!("trellis demo: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Up { file, dir } => {
            return match rt.block_on(up::run(file, dir.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ up::UpError::Invalid { .. }) => {
                    eprintln!("trellis up: invalid configuration: {e}");
                    ExitCode::from(64)
                }
                Err(e) => {
                    eprintln!("trellis up: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::ExampleApp(args) => {
            return match rt.block_on(example_app::run(args.clone())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("example-app: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Apply { file, dry_run } => rt.block_on(resources::apply(&api(), file, *dry_run)),
        Command::Get {
            what,
            name,
            namespace,
            since,
            output,
        } => rt.block_on(resources::get(
            &api(),
            what,
            name.as_deref(),
            namespace,
            since.as_deref(),
            *output,
        )),
        Command::Stat {
            service,
            window,
            output,
        } => rt.block_on(observe::stat(&api(), service.as_deref(), *window, *output)),
        Command::Edges { window, output } => rt.block_on(observe::edges(&api(), *window, *output)),
        Command::Top {
            service,
            window,
            once,
            output,
        } => rt.block_on(observe::top(&api(), service, *window, *once, *output)),
        Command::Tap {
            service,
            path,
            method,
            rate,
            max,
            output,
        } => rt.block_on(observe::tap(
            &api(),
            &observe::TapArgs {
                service,
                path: path.as_deref(),
                method: method.as_deref(),
                rate: *rate,
                max: *max,
            },
            *output,
        )),
        Command::Delete {
            kind,
            name,
            namespace,
        } => rt.block_on(resources::delete(&api(), kind, name, namespace)),
        Command::Token(cmd) => rt.block_on(resources::token(&api(), cmd)),
        Command::Ca(cmd) => rt.block_on(resources::ca(&api(), cmd)),
        Command::Check => rt.block_on(resources::check(&api())),
        Command::Explain {
            src,
            dst,
            method,
            path,
            headers,
            output,
        } => rt.block_on(resources::explain(
            &api(),
            &resources::ExplainArgs {
                src,
                dst,
                method,
                path,
                headers,
            },
            *output,
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trellis: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run_control(args: &ControlArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level);
    let Ok(filter) = filter else {
        eprintln!(
            "trellis control: invalid configuration: --log-level {:?}",
            args.log_level
        );
        return ExitCode::from(64);
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let addr = |flag: &str, v: &str| {
        v.parse().map_err(|_| {
            eprintln!("trellis control: invalid configuration: --{flag}: {v:?} is not IP:PORT");
            ExitCode::from(64)
        })
    };
    let (grpc_addr, http_addr) = match (addr("grpc", &args.grpc), addr("http", &args.http)) {
        (Ok(g), Ok(h)) => (g, h),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let heartbeat_ttl = match trellis_core::duration::parse_duration(&args.heartbeat_ttl) {
        Ok(d) if d >= Duration::from_millis(300) => d,
        _ => {
            eprintln!(
                "trellis control: invalid configuration: --heartbeat-ttl: must be a duration of at least 300ms"
            );
            return ExitCode::from(64);
        }
    };
    let workload_cert_ttl = match trellis_core::duration::parse_duration(&args.cert_ttl) {
        Ok(d) if d >= trellis_control::ca::MIN_WORKLOAD_TTL => d,
        _ => {
            eprintln!(
                "trellis control: invalid configuration: --cert-ttl: must be a duration of at least 1m"
            );
            return ExitCode::from(64);
        }
    };
    let config = trellis_control::ControlConfig {
        trust_domain: args.trust_domain.clone(),
        heartbeat_ttl,
        ca: args.ca_cert.clone().zip(args.ca_key.clone()),
        workload_cert_ttl,
        ..trellis_control::ControlConfig::new(grpc_addr, http_addr, args.data_dir.clone())
    };
    let running = match trellis_control::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis control: {e}");
            return ExitCode::from(1);
        }
    };
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => running.stopped().await,
    }
    tracing::info!("control plane stopping");
    running.shutdown();
    ExitCode::SUCCESS
}
