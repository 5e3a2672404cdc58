use clap::Parser;
use waypoint::settings::Settings;

fn main() {
    let settings = Settings::parse();
    mesh_core::sys::raise_fd_limit();
    let tracing = waypoint::telemetry::TracingConfig {
        otlp_endpoint: settings.otlp_endpoint.clone(),
        sampling_ratio: settings.trace_sampling,
        service_name: format!("waypoint.{}", settings.gateway.replace('/', ".")),
        log_filter: settings.log_level.clone(),
    };
    let guard = match waypoint::telemetry::init(&tracing) {
        Ok(g) => g,
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
