//! `trellis-proxy`: the Trellis sidecar.
//!
//! Request path (see the project's `ARCHITECTURE.md`):
//! accept ([`server`]) → protocol detection ([`detect`]) → HTTP stack ([`http`]) or opaque TCP
//! ([`tcp`]) → endpoint ([`http::client`]). Everything observable goes through [`metrics`] and
//! [`access_log`], both passed down as arguments. The admin server ([`admin`]) runs on its own
//! small runtime so a scrape never competes with traffic.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod control;
pub mod detect;
pub mod drain;
pub mod error;
pub mod explain;
pub mod head;
pub mod http;
pub mod identity;
pub mod io;
pub mod layers;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod signals;
pub mod tap;
pub mod tcp;
pub mod trace;

/// Runs `task` on a thread of its own with a single-threaded runtime, so that work (admin,
/// control session, span export) never takes a worker from the data path.
pub fn spawn_with_own_runtime<F, Fut>(name: &str, task: F) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(task()))?;
    Ok(())
}

/// The error type every boxed body and service boundary uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
