use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter};
use ztunnel::settings::Settings;

fn main() {
    let settings = Settings::parse();
    mesh_core::sys::raise_fd_limit();
    let filter = match EnvFilter::try_new(&settings.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ztunnel: bad log level {:?}: {e}", settings.log_level);
            std::process::exit(2);
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    // Batched: see log_writer for why and what it costs.
    let (writer, log_guard) = mesh_core::log_writer::BatchedStderr::start();
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(writer).with_ansi(false))
        .init();
    let log: ztunnel::admin::LogControl = Arc::new(move |level: Option<&str>| {
        if let Some(level) = level {
            let f = EnvFilter::try_new(level).map_err(|e| format!("bad filter {level:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle
            .with_current(|f| f.to_string())
            .map_err(|e| e.to_string())
    });
    let outcome = ztunnel::run(settings, log);
    if let Err(e) = &outcome {
        tracing::error!("ztunnel failed: {e:#}");
    }
    // Flushes the queued log lines; `exit` below would skip it.
    drop(log_guard);
    if let Err(e) = outcome {
        eprintln!("ztunnel: {e:#}");
        std::process::exit(1);
    }
}
