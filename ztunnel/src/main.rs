use std::sync::Arc;

use clap::Parser;
use ztunnel::settings::Settings;

fn main() {
    let settings = Settings::parse();
    mesh_core::sys::raise_fd_limit();
    let tracing = settings
        .tracing
        .config(format!("ztunnel.{}", settings.node), &settings.log_level);
    let (guard, level) = match mesh_core::telemetry::init(&tracing) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ztunnel: telemetry: {e:#}");
            std::process::exit(2);
        }
    };
    let log: ztunnel::admin::LogControl = Arc::new(move |spec: Option<&str>| level.set(spec));
    let outcome = ztunnel::run(settings, log);
    if let Err(e) = &outcome {
        tracing::error!("ztunnel failed: {e:#}");
    }
    // Flushes queued spans and log lines (bounded); `exit` below would skip it.
    drop(guard);
    if let Err(e) = outcome {
        eprintln!("ztunnel: {e:#}");
        std::process::exit(1);
    }
}
