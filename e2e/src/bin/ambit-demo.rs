//! Quick-start command 1: the two-node ambient mesh demo.
//!
//! As root: network namespaces, eBPF capture, istiod-lite on the bundled
//! manifests. Otherwise (or with --loopback): two ztunnels on loopback.

use clap::Parser;
use e2e::demo::{loopback, netns, DemoArgs};

#[derive(Parser)]
#[command(
    name = "ambit-demo",
    about = "A two-node Ambit mesh with real traffic and a report"
)]
struct Args {
    /// Keep the mesh running after the report until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Requests the client sends (enough to see the route's 90/10 split).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Use the loopback demo even as root.
    #[arg(long)]
    loopback: bool,
    /// Build the namespace cluster from these manifests instead of
    /// examples/demo (pods give spec.nodeName nodeN and status.podIP in
    /// 198.19.N.0/24; the report expects the demo's client and reviews pods).
    #[arg(long)]
    manifests: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let demo = DemoArgs {
        keep: args.keep,
        requests: args.requests,
        manifests: args.manifests,
    };
    if args.loopback {
        return loopback::run(&demo).await;
    }
    if !e2e::netns::is_root() {
        eprintln!("not root: running the loopback demo (the namespace/eBPF demo needs root)\n");
        return loopback::run(&demo).await;
    }
    // Ctrl-C tears down in order (the demo stops at its next step); a second
    // one exits at once, leaving what the next start cleans up (stale
    // namespaces and pins of dead pids).
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nCtrl-C: tearing down (Ctrl-C again to exit at once)");
            e2e::demo::interrupt();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let result = netns::run(&demo).await;
    match result {
        Err(_) if e2e::demo::interrupted() => {
            eprintln!("interrupted; everything torn down");
            std::process::exit(130);
        }
        other => other,
    }
}
