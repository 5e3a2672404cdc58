use clap::Parser;
use waypoint::settings::Settings;

fn main() {
    let settings = Settings::parse();
    mesh_core::sys::raise_fd_limit();
    let tracing = settings.tracing.config(
        format!("waypoint.{}", settings.gateway.replace('/', ".")),
        &settings.log_level,
    );
    // The waypoint has no run-time log level endpoint: the handle is unused.
    let guard = match mesh_core::telemetry::init(&tracing) {
        Ok((g, _log_level)) => g,
        Err(e) => {
            eprintln!("waypoint: telemetry: {e:#}");
            std::process::exit(2);
        }
    };
    let outcome = waypoint::run(settings);
    if let Err(e) = &outcome {
        tracing::error!("waypoint failed: {e:#}");
    }
    // Flushes queued spans (bounded); `exit` below would skip it.
    drop(guard);
    if let Err(e) = outcome {
        eprintln!("waypoint: {e:#}");
        std::process::exit(1);
    }
}
