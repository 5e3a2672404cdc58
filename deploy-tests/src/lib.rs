//! Checks of `deploy/` that run under `cargo nextest` with no cluster, no
//! Helm and no Docker engine (none of them can be installed here):
//!
//! * [`gotmpl`]: the Go-template subset the chart is written in, so the
//!   chart renders in-process exactly as far as that subset goes, and fails
//!   loudly beyond it;
//! * [`chart`]: Helm's chart layout, values merge (checked against
//!   `values.schema.json` by [`values_schema`]) and document splitting on
//!   top of it;
//! * [`objects`]: every rendered document parsed into its k8s-openapi type,
//!   refusing unknown kinds and fields the type does not have.

pub mod chart;
pub mod gotmpl;
pub mod objects;
pub mod values_schema;

/// The workspace root.
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy-tests lives in the workspace")
        .to_path_buf()
}
