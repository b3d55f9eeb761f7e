//! Process logs through `tracing`, with the filter changeable at run time (`/log-level`).

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::admin::LogLevel;
use crate::config::LogFormat;

struct Reloadable {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogLevel for Reloadable {
    fn get(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_owned();
        }
        Ok(())
    }
}

/// Installs the global subscriber (once per process; the binary calls it). Logs go to stderr so
/// stdout stays free for the access log.
pub fn init(format: LogFormat, filter: &str) -> Result<Arc<dyn LogLevel>, String> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| format!("--log-level {filter:?}: {e}"))?;
    let (filter_layer, handle) = reload::Layer::new(parsed);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Plain => registry.with(fmt.with_ansi(false)).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(Arc::new(Reloadable {
        handle,
        current: Mutex::new(filter.to_owned()),
    }))
}

/// A log level that only remembers its value; for in-process tests that share one subscriber.
#[derive(Default)]
pub struct Fixed(Mutex<String>);

impl LogLevel for Fixed {
    fn get(&self) -> String {
        self.0.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        if let Ok(mut c) = self.0.lock() {
            *c = filter.to_owned();
        }
        Ok(())
    }
}
