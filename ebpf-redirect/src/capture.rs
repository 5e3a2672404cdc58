//! Loading, configuring and attaching the outbound capture program with aya.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::process::Command;

use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;

use crate::{CAPTURE_MARK, CAPTURE_ROUTE_TABLE};

static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

const PROGRAM: &str = "capture_outbound";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the BPF object: {0}")]
    Load(String),
    #[error("BPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("attaching to {0}: {1}")]
    Attach(String, String),
    #[error("node routing: {0}")]
    Routing(String),
}

/// Mirrors `struct capture_config` in `bpf/capture.c`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CaptureConfig {
    listener_ip: u32,
    listener_port: u16,
    pad: u16,
}

// SAFETY: plain-old-data with a C layout and no padding bytes left undefined
// (the explicit `pad` field covers them).
unsafe impl aya::Pod for CaptureConfig {}

/// Counters kept by the program (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub captured_new: u64,
    pub captured_established: u64,
    pub passed: u64,
    pub excluded: u64,
    pub dropped_no_listener: u64,
    pub dropped_assign_failed: u64,
}

/// The loaded capture program and the interfaces it is attached to. Dropping
/// it detaches everything and unloads the program.
pub struct Capture {
    ebpf: Ebpf,
    links: HashMap<String, SchedClassifierLinkId>,
}

impl Capture {
    /// Loads the program into the current network namespace's kernel, steering
    /// new connections to `listener` (IP 0.0.0.0 = a wildcard listener).
    pub fn load(listener: SocketAddrV4) -> Result<Self, CaptureError> {
        let mut ebpf = Ebpf::load(CAPTURE_OBJECT).map_err(|e| CaptureError::Load(e.to_string()))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| CaptureError::Load(format!("no program {PROGRAM}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| CaptureError::Load(e.to_string()))?;
        prog.load()
            .map_err(|e| CaptureError::Load(format!("{e:?}")))?;
        let mut capture = Capture {
            ebpf,
            links: HashMap::new(),
        };
        capture.set_listener(Some(listener))?;
        Ok(capture)
    }

    /// Points new connections at `listener`, or (`None`) drops them: fail closed.
    pub fn set_listener(&mut self, listener: Option<SocketAddrV4>) -> Result<(), CaptureError> {
        let map = self
            .ebpf
            .map_mut("capture_config")
            .ok_or_else(|| CaptureError::Map("capture_config", "missing".into()))?;
        let mut config: Array<_, CaptureConfig> =
            Array::try_from(map).map_err(|e| CaptureError::Map("capture_config", e.to_string()))?;
        let value = listener.map_or_else(CaptureConfig::default, |l| CaptureConfig {
            listener_ip: u32::from_ne_bytes(l.ip().octets()),
            listener_port: l.port().to_be(),
            pad: 0,
        });
        config
            .set(0, value, 0)
            .map_err(|e| CaptureError::Map("capture_config", e.to_string()))
    }

    /// Lets connections to `port` bypass capture.
    pub fn exclude_port(&mut self, port: u16) -> Result<(), CaptureError> {
        let map = self
            .ebpf
            .map_mut("excluded_ports")
            .ok_or_else(|| CaptureError::Map("excluded_ports", "missing".into()))?;
        let mut ports: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(map)
            .map_err(|e| CaptureError::Map("excluded_ports", e.to_string()))?;
        ports
            .insert(port, 1, 0)
            .map_err(|e| CaptureError::Map("excluded_ports", e.to_string()))
    }

    /// Attaches at tc ingress of `interface` (the host side of a pod's veth).
    /// Attaching twice to the same interface is a no-op.
    pub fn attach(&mut self, interface: &str) -> Result<(), CaptureError> {
        if self.links.contains_key(interface) {
            return Ok(());
        }
        let attach_err = |e: String| CaptureError::Attach(interface.to_string(), e);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| attach_err("program missing".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
        // Kernels >= 6.6 attach with tcx links and need no qdisc; older ones need clsact.
        let link = match prog.attach(interface, TcAttachType::Ingress) {
            Ok(link) => link,
            Err(_) => {
                let _ = aya::programs::tc::qdisc_add_clsact(interface);
                prog.attach(interface, TcAttachType::Ingress)
                    .map_err(|e| attach_err(format!("{e:?}")))?
            }
        };
        self.links.insert(interface.to_string(), link);
        Ok(())
    }

    /// Detaches from `interface`; unknown interfaces are ignored.
    pub fn detach(&mut self, interface: &str) -> Result<(), CaptureError> {
        let Some(link) = self.links.remove(interface) else {
            return Ok(());
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| CaptureError::Attach(interface.into(), "program missing".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| {
                CaptureError::Attach(interface.into(), e.to_string())
            })?;
        prog.detach(link)
            .map_err(|e| CaptureError::Attach(interface.to_string(), format!("{e:?}")))
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    pub fn stats(&self) -> Result<CaptureStats, CaptureError> {
        let map = self
            .ebpf
            .map("capture_stats")
            .ok_or_else(|| CaptureError::Map("capture_stats", "missing".into()))?;
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map)
            .map_err(|e| CaptureError::Map("capture_stats", e.to_string()))?;
        let read = |i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        Ok(CaptureStats {
            captured_new: read(0),
            captured_established: read(1),
            passed: read(2),
            excluded: read(3),
            dropped_no_listener: read(4),
            dropped_assign_failed: read(5),
        })
    }
}

/// Node routing for captured packets: marked packets are delivered locally.
/// Idempotent; runs `ip` in the calling thread's network namespace.
pub fn setup_node_routing() -> Result<(), CaptureError> {
    let rules = run_ip(&["rule", "show"])?;
    let want = format!("fwmark {CAPTURE_MARK:#x} lookup {CAPTURE_ROUTE_TABLE}");
    if !rules.contains(&want) {
        run_ip(&[
            "rule",
            "add",
            "fwmark",
            &format!("{CAPTURE_MARK:#x}"),
            "lookup",
            &CAPTURE_ROUTE_TABLE.to_string(),
        ])?;
    }
    run_ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &CAPTURE_ROUTE_TABLE.to_string(),
    ])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| CaptureError::Routing(format!("enabling ip_forward: {e}")))?;
    Ok(())
}

/// The interface the calling thread's namespace routes `ip` out of: for a pod
/// address on its node, the host side of the pod's veth.
pub fn interface_for(ip: std::net::Ipv4Addr) -> Result<String, CaptureError> {
    let out = run_ip(&["-o", "route", "get", &ip.to_string()])?;
    out.split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| CaptureError::Routing(format!("no interface for {ip}: {}", out.trim())))
}

fn run_ip(args: &[&str]) -> Result<String, CaptureError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CaptureError::Routing(format!("running ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(CaptureError::Routing(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
