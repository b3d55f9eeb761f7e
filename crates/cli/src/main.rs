//! `trellis`: the operator CLI and local mesh runner.
//!
//! Today: `trellis demo` (two services on loopback talking through two real proxies) and
//! `trellis version`. The control plane (`trellis control`), `up`, `apply`/`get` arrive with the
//! control plane work.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a local demo mesh: two services, each with its own trellis-proxy, on loopback.
    Demo(demo::DemoArgs),
    /// Prints the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Demo(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("trellis: cannot start runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(demo::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
