//! ambitctl: look at and operate an Ambit mesh, in a local network-namespace
//! cluster (`--local FILE`) or in Kubernetes (kubeconfig). See
//! `docs/ambitctl.md`.

pub mod backend;
pub mod cli;
pub mod http;
pub mod inventory;
pub mod kubernetes;
pub mod local;
pub mod netns;
pub mod report;
pub mod table;

pub use cli::{run, Cli};
