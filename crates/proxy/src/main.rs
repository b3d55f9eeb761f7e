//! `trellis-proxy` entry point: parse flags, start, wait for SIGTERM/SIGINT or `/shutdown`,
//! drain, exit. Exit codes: 0 ok, 1 runtime failure, 2 usage, 64 invalid configuration.

use std::process::ExitCode;

use clap::Parser;
use trellis_proxy::config::{Args, ProxyConfig};
use trellis_proxy::{app, logging};

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ProxyConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-proxy: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let log_level = match logging::init(config.log_format, &config.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("trellis-proxy: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name("data")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-proxy: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let running = match app::start(config, log_level).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("trellis-proxy: {e}");
                return ExitCode::from(1);
            }
        };
        let drain = running.drain.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            drain.request();
        });
        running.wait_and_drain().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            // Without signal handlers, only /shutdown stops us.
            std::future::pending::<()>().await;
        }
    }
}
