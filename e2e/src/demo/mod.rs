//! The demo behind quick-start command 1: the network-namespace mesh with
//! eBPF capture when run as root, else the loopback mesh.

pub mod loopback;
pub mod netns;

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks the running demo to stop and tear down (Ctrl-C). The demo checks
/// between steps and requests, so teardown runs in order, as on success.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once [`interrupt`] was called: `?` unwinds the demo, and every
/// namespace, process and pin it made is removed as its owner drops.
pub(crate) fn check_interrupted() -> anyhow::Result<()> {
    anyhow::ensure!(!interrupted(), "interrupted");
    Ok(())
}

/// Options shared by both demos.
#[derive(Clone, Debug)]
pub struct DemoArgs {
    /// Keep the mesh up after the report until Ctrl-C.
    pub keep: bool,
    /// Requests the client sends.
    pub requests: usize,
    /// Manifests for the namespace demo (default: the bundled examples/demo).
    pub manifests: Option<std::path::PathBuf>,
}

/// Runs a command (curl, in the demos) and returns (success, stdout+stderr).
pub(crate) fn run_client(cmd: &mut std::process::Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            (o.status.success(), text.trim().to_string())
        }
        Err(e) => (false, format!("{cmd:?} not runnable: {e}")),
    }
}

/// The value of `key=` in an access-log line.
pub(crate) fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!(" {key}=");
    line.find(&pat)
        .map(|i| &line[i + pat.len()..])
        .map(|rest| rest.split(' ').next().unwrap_or("").trim_matches('"'))
        .unwrap_or("-")
}
