//! `trellis-bench-backend`: a minimal HTTP/1.1 keep-alive server used as the
//! benchmark's upstream and as the "direct" baseline.
//!
//! Usage: `trellis-bench-backend [--listen ADDR] [--threads N] [--body TEXT]`
//!
//! Prints `listening ADDR` (the bound address) as its first stdout line, then
//! answers every request with `200 OK` and a small fixed body.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const USAGE: &str = "\
usage: trellis-bench-backend [--listen ADDR] [--threads N] [--body TEXT]
  --listen ADDR   address to bind (default 127.0.0.1:0); the bound address is
                  printed as the first stdout line: `listening ADDR`
  --threads N     runtime worker threads (default 1)
  --body TEXT     response body (default \"hello trellis\")";

struct Args {
    listen: SocketAddr,
    threads: usize,
    body: Bytes,
}

fn parse_args() -> Result<Args, String> {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut threads = 1usize;
    let mut body = Bytes::from_static(b"hello trellis");
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = v
                    .parse()
                    .map_err(|e| format!("invalid --listen address {v:?}: {e}"))?;
            }
            "--threads" => {
                let v = value("--threads")?;
                threads =
                    v.parse().ok().filter(|n: &usize| *n >= 1).ok_or_else(|| {
                        format!("invalid --threads {v:?}: expected an integer >= 1")
                    })?;
            }
            "--body" => body = Bytes::from(value("--body")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen,
        threads,
        body,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("trellis-bench-backend: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-bench-backend: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench-backend: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read bound address: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {local}").map_err(|e| format!("stdout: {e}"))?;
        out.flush().map_err(|e| format!("stdout: {e}"))?;
    }

    let body = args.body;
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            () = &mut shutdown => return Ok(()),
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("trellis-bench-backend: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    // Drain the request body so the connection can be reused;
                    // errors here only mean the client went away.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(body))
                            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                    )
                }
            });
            // Connection errors (resets, malformed requests) are the client's
            // problem; the benchmark backend stays silent about them.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
