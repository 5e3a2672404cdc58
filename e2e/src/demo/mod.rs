//! The demo behind quick-start command 1: the network-namespace mesh with
//! eBPF capture when run as root, else the loopback mesh.

pub mod loopback;
pub mod netns;

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
