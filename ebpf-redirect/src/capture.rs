//! Loading, configuring and attaching the capture programs with aya.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::os::fd::AsRawFd;

use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::{CAPTURE_MARK, CAPTURE_ROUTE_TABLE};

static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

const OUTBOUND: &str = "capture_outbound";
const INBOUND: &str = "capture_inbound";
/// The sk_lookup program handing SYNs that meet ztunnel's TIME_WAIT sockets
/// to its listeners (see `bpf/capture.c`).
const TIME_WAIT_HANDOFF: &str = "hand_over_time_wait";
/// Slots of `handoff_listeners`, as `enum listener_slot` in `bpf/capture.c`.
const SLOT_OUTBOUND: u32 = 0;
const SLOT_HBONE: u32 = 1;
const SLOT_PLAINTEXT: u32 = 2;
const MAPS: [&str; 7] = [
    "capture_config",
    "capture_config6",
    "enrolled_pods",
    "enrolled_pods6",
    "excluded_ports",
    "excluded_ports6",
    "capture_stats",
];
const OUTBOUND_LINK: &str = "link-out-";
const INBOUND_LINK: &str = "link-in-";
/// Pins of [`Capture::attach_neighbour`]'s links. The name predates
/// non-mesh neighbours (it was for waypoints only); kept, so a ztunnel
/// upgraded in place adopts what its predecessor pinned.
const NEIGHBOUR_LINK: &str = "link-wp-";

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

/// Mirrors `struct capture_config` in `bpf/capture.c` (ports in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CaptureConfig {
    listener_ip: u32,
    listener_port: u16,
    hbone_port: u16,
    plaintext_port: u16,
    pad: u16,
}

// SAFETY: plain-old-data with a C layout and no padding bytes left undefined
// (the explicit `pad` field covers them).
unsafe impl aya::Pod for CaptureConfig {}

/// Mirrors `struct capture_config6` in `bpf/capture.c`: the outbound listener
/// for IPv6 connections (address and port in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CaptureConfig6 {
    listener_ip: [u8; 16],
    listener_port: u16,
    pad: u16,
}

// SAFETY: C layout (16 + 2 + 2 bytes, alignment 2), no implicit padding.
unsafe impl aya::Pod for CaptureConfig6 {}

/// Which way a connection goes, relative to the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound = 0,
    Inbound = 1,
}

/// Mirrors `struct exclusion_key` in `bpf/capture.c`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ExclusionKey {
    pod_ip: u32,
    port: u16,
    direction: u8,
    pad: u8,
}

impl ExclusionKey {
    fn new(pod: Option<Ipv4Addr>, port: u16, direction: Direction) -> Self {
        ExclusionKey {
            pod_ip: pod.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
            port,
            direction: direction as u8,
            pad: 0,
        }
    }
}

// SAFETY: C layout, no implicit padding (the explicit `pad` covers it).
unsafe impl aya::Pod for ExclusionKey {}

/// Mirrors `struct exclusion_key6` in `bpf/capture.c` (`::` = any pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ExclusionKey6 {
    pod_ip: [u8; 16],
    port: u16,
    direction: u8,
    pad: u8,
}

impl ExclusionKey6 {
    fn new(pod: Option<Ipv6Addr>, port: u16, direction: Direction) -> Self {
        ExclusionKey6 {
            pod_ip: pod.map_or([0; 16], |ip| ip.octets()),
            port,
            direction: direction as u8,
            pad: 0,
        }
    }
}

// SAFETY: C layout (16 + 2 + 1 + 1 bytes; the C side's u32 array makes its
// alignment 4, which adds no padding to 20 bytes).
unsafe impl aya::Pod for ExclusionKey6 {}

/// Counters kept by the program (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub captured_new: u64,
    pub captured_established: u64,
    pub passed: u64,
    pub excluded: u64,
    pub dropped_no_listener: u64,
    pub dropped_assign_failed: u64,
    pub inbound_hbone: u64,
    pub inbound_plaintext: u64,
    pub dropped_malformed: u64,
    /// An enrolled pod's IPv6 TCP behind extension headers (or a packet
    /// that cannot be told apart from it): not captured, so dropped.
    pub dropped_ipv6: u64,
    /// New connections on the tuple of one ztunnel had closed first, handed
    /// from its TIME_WAIT socket to its listener.
    pub time_wait_handoffs: u64,
    /// Such connections refused because the listener was gone.
    pub dropped_handoff_no_listener: u64,
}

/// ztunnel's listening sockets, for the connections capture hands over
/// itself (see [`Capture::set_listener_sockets`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenerSockets<'a> {
    pub outbound: Option<std::os::fd::BorrowedFd<'a>>,
    pub hbone: Option<std::os::fd::BorrowedFd<'a>>,
    pub plaintext: Option<std::os::fd::BorrowedFd<'a>>,
}

/// A tc link held open and pinned at `pin`, so it outlives the process.
struct Attached {
    _link: FdLink,
    pin: PathBuf,
    /// The interface it was attached to: a same-named interface created later
    /// (a restarted pod's new veth) has another index and needs a new link.
    ifindex: u32,
}

fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// The loaded capture programs, their pinned maps and pinned links.
///
/// Dropping it leaves everything pinned and attached on purpose: while
/// ztunnel is down its listeners are gone and enrolled pods fail closed; the
/// next ztunnel adopts the pins. [`Capture::remove_all`] is the real teardown.
pub struct Capture {
    ebpf: Ebpf,
    config: CaptureConfig,
    config6: CaptureConfig6,
    pin_dir: PathBuf,
    /// Pod interfaces (outbound program).
    links: HashMap<String, Attached>,
    /// Node uplinks (inbound program).
    uplinks: HashMap<String, Attached>,
    /// Veths of local pods that are not captured themselves (waypoints,
    /// non-mesh pods): inbound program.
    neighbours: HashMap<String, Attached>,
    /// The TIME_WAIT hand-off's link to the network namespace, held while
    /// anything is attached (this process's, not pinned).
    handoff: Option<SkLookupLinkId>,
}

impl Capture {
    /// Loads the programs into the current network namespace's kernel, steering
    /// new outbound connections to `listener` (see [`Capture::set_listener`]).
    /// Maps are pinned under `pin_dir` (on bpffs) and reused if a previous
    /// instance left them there.
    pub fn load(listener: SocketAddr, pin_dir: &Path) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(pin_dir).map_err(|e| {
            CaptureError::Load(format!(
                "creating {}: {e} (is bpffs mounted?)",
                pin_dir.display()
            ))
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(CAPTURE_OBJECT)
            .map_err(|e| CaptureError::Load(e.to_string()))?;
        for name in [OUTBOUND, INBOUND] {
            program(&mut ebpf, name)
                .map_err(CaptureError::Load)?
                .load()
                .map_err(|e| CaptureError::Load(format!("{name}: {e:?}")))?;
        }
        sk_lookup(&mut ebpf)?
            .load()
            .map_err(|e| CaptureError::Load(format!("{TIME_WAIT_HANDOFF}: {e:?}")))?;
        let mut capture = Capture {
            ebpf,
            config: CaptureConfig::default(),
            config6: CaptureConfig6::default(),
            pin_dir: pin_dir.to_path_buf(),
            links: HashMap::new(),
            uplinks: HashMap::new(),
            neighbours: HashMap::new(),
            handoff: None,
        };
        capture.set_listener(Some(listener))?;
        Ok(capture)
    }

    /// Interfaces with a pinned outbound link in the pin directory, whether or
    /// not this instance holds them (a previous one may have left them).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        self.pinned(OUTBOUND_LINK)
    }

    fn pinned(&self, prefix: &str) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.pin_dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(prefix))
                    .map(str::to_string)
            })
            .collect()
    }

    /// Detaches and unpins everything, and removes the pinned maps: nothing of
    /// ours is left in the kernel once this process exits.
    pub fn remove_all(&mut self) -> Result<(), CaptureError> {
        for ifname in self.pinned(OUTBOUND_LINK) {
            self.detach(&ifname)?;
            release_pin(&self.pin_dir.join(format!("{OUTBOUND_LINK}{ifname}")))?;
        }
        for ifname in self.pinned(INBOUND_LINK) {
            self.detach_uplink(&ifname)?;
            release_pin(&self.pin_dir.join(format!("{INBOUND_LINK}{ifname}")))?;
        }
        for ifname in self.pinned(NEIGHBOUR_LINK) {
            self.detach_neighbour(&ifname)?;
        }
        if let Some(link) = self.handoff.take() {
            sk_lookup(&mut self.ebpf)?
                .detach(link)
                .map_err(|e| CaptureError::Attach(TIME_WAIT_HANDOFF.into(), format!("{e:?}")))?;
        }
        for map in MAPS {
            match std::fs::remove_file(self.pin_dir.join(map)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CaptureError::Map(map_name(map), e.to_string())),
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        Ok(())
    }

    /// Before attaching anything: the maps pinned again (after
    /// [`Capture::remove_all`]) and the TIME_WAIT hand-off attached to the
    /// calling thread's network namespace.
    fn ensure_installed(&mut self) -> Result<(), CaptureError> {
        self.ensure_maps_pinned()?;
        if self.handoff.is_none() {
            let netns = this_netns()?;
            let link = sk_lookup(&mut self.ebpf)?.attach(netns).map_err(|e| {
                CaptureError::Attach(
                    "network namespace".into(),
                    format!("{TIME_WAIT_HANDOFF}: {e:?}"),
                )
            })?;
            self.handoff = Some(link);
        }
        Ok(())
    }

    fn ensure_maps_pinned(&self) -> Result<(), CaptureError> {
        std::fs::create_dir_all(&self.pin_dir)
            .map_err(|e| CaptureError::Load(format!("creating {}: {e}", self.pin_dir.display())))?;
        for name in MAPS {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| CaptureError::Map(map_name(name), "missing".into()))?;
            map.pin(&path)
                .map_err(|e| CaptureError::Map(map_name(name), e.to_string()))?;
        }
        Ok(())
    }

    /// Points new outbound connections at `listener`, or (`None`) drops them:
    /// fail closed. An IPv4 address takes IPv4 only; `[::]` is taken for a
    /// dual-stack wildcard (IPv4 and IPv6 connections, each kept to its own
    /// destination), as ztunnel binds it; another IPv6 address takes IPv6
    /// only. New connections of a family the listener does not take are
    /// dropped.
    pub fn set_listener(&mut self, listener: Option<SocketAddr>) -> Result<(), CaptureError> {
        let (v4, v6) = per_family(listener);
        let (ip, port) = v4.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
        self.config.listener_ip = u32::from_ne_bytes(ip.octets());
        self.config.listener_port = port.to_be();
        let (ip, port) = v6.unwrap_or((Ipv6Addr::UNSPECIFIED, 0));
        self.config6.listener_ip = ip.octets();
        self.config6.listener_port = port.to_be();
        self.write_config()
    }

    /// The listening sockets behind [`Capture::set_listener`] and
    /// [`Capture::set_inbound_ports`]: a new connection that reuses the tuple
    /// of one ztunnel closed first is handed to them from the TIME_WAIT
    /// socket (without them it is refused, and the client retries later).
    /// The kernel drops a socket from the map when it closes.
    pub fn set_listener_sockets(&mut self, sockets: ListenerSockets) -> Result<(), CaptureError> {
        const NAME: &str = "handoff_listeners";
        let map = self
            .ebpf
            .map_mut(NAME)
            .ok_or_else(|| CaptureError::Map(NAME, "missing".into()))?;
        let mut slots: SockMap<_> =
            SockMap::try_from(map).map_err(|e| CaptureError::Map(NAME, e.to_string()))?;
        for (slot, socket) in [
            (SLOT_OUTBOUND, sockets.outbound),
            (SLOT_HBONE, sockets.hbone),
            (SLOT_PLAINTEXT, sockets.plaintext),
        ] {
            let result = match socket {
                Some(fd) => slots.set(slot, &fd.as_raw_fd(), 0),
                // An empty slot answers EINVAL (the index is in range).
                None => match slots.clear_index(&slot) {
                    Err(aya::maps::MapError::SyscallError(e))
                        if matches!(
                            e.io_error.raw_os_error(),
                            Some(libc::EINVAL | libc::ENOENT)
                        ) =>
                    {
                        Ok(())
                    }
                    other => other,
                },
            };
            result.map_err(|e| CaptureError::Map(NAME, format!("slot {slot}: {e}")))?;
        }
        Ok(())
    }

    /// Inbound: connections to enrolled pods on `hbone` go to the HBONE
    /// listener, all others to the plaintext listener (0 = none: dropped).
    pub fn set_inbound_ports(&mut self, hbone: u16, plaintext: u16) -> Result<(), CaptureError> {
        self.config.hbone_port = hbone.to_be();
        self.config.plaintext_port = plaintext.to_be();
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), CaptureError> {
        let map = self
            .ebpf
            .map_mut("capture_config")
            .ok_or_else(|| CaptureError::Map("capture_config", "missing".into()))?;
        let mut config: Array<_, CaptureConfig> =
            Array::try_from(map).map_err(|e| CaptureError::Map("capture_config", e.to_string()))?;
        config
            .set(0, self.config, 0)
            .map_err(|e| CaptureError::Map("capture_config", e.to_string()))?;
        let map = self
            .ebpf
            .map_mut("capture_config6")
            .ok_or_else(|| CaptureError::Map("capture_config6", "missing".into()))?;
        let mut config: Array<_, CaptureConfig6> = Array::try_from(map)
            .map_err(|e| CaptureError::Map("capture_config6", e.to_string()))?;
        config
            .set(0, self.config6, 0)
            .map_err(|e| CaptureError::Map("capture_config6", e.to_string()))
    }

    /// Marks `ip` as an enrolled pod on this node (its inbound TCP is captured).
    pub fn enroll(&mut self, ip: IpAddr) -> Result<(), CaptureError> {
        let ip = canonical_ip(ip);
        if ip.is_unspecified() {
            return Err(CaptureError::Map(
                "enrolled_pods",
                format!("{ip} is not a pod address"),
            ));
        }
        match ip {
            IpAddr::V4(v4) => self
                .enrolled_map()?
                .insert(u32::from_ne_bytes(v4.octets()), 1, 0)
                .map_err(|e| CaptureError::Map("enrolled_pods", e.to_string())),
            IpAddr::V6(v6) => self
                .enrolled_map6()?
                .insert(v6.octets(), 1, 0)
                .map_err(|e| CaptureError::Map("enrolled_pods6", e.to_string())),
        }
    }

    pub fn unenroll(&mut self, ip: IpAddr) -> Result<(), CaptureError> {
        let removed = match canonical_ip(ip) {
            IpAddr::V4(v4) => self
                .enrolled_map()?
                .remove(&u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => self.enrolled_map6()?.remove(&v6.octets()),
        };
        match removed {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(CaptureError::Map("enrolled_pods", e.to_string())),
        }
    }

    /// The enrolled addresses, both families.
    pub fn enrolled(&self) -> Vec<IpAddr> {
        let mut all = Vec::new();
        if let Some(pods) = self
            .ebpf
            .map("enrolled_pods")
            .and_then(|m| BpfHashMap::<_, u32, u8>::try_from(m).ok())
        {
            all.extend(
                pods.keys()
                    .filter_map(Result::ok)
                    .map(|k| IpAddr::from(Ipv4Addr::from(k.to_ne_bytes()))),
            );
        }
        if let Some(pods) = self
            .ebpf
            .map("enrolled_pods6")
            .and_then(|m| BpfHashMap::<_, [u8; 16], u8>::try_from(m).ok())
        {
            all.extend(
                pods.keys()
                    .filter_map(Result::ok)
                    .map(|k| IpAddr::from(Ipv6Addr::from(k))),
            );
        }
        all
    }

    fn enrolled_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, u32, u8>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("enrolled_pods")
            .ok_or_else(|| CaptureError::Map("enrolled_pods", "missing".into()))?;
        BpfHashMap::try_from(map).map_err(|e| CaptureError::Map("enrolled_pods", e.to_string()))
    }

    fn enrolled_map6(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, [u8; 16], u8>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("enrolled_pods6")
            .ok_or_else(|| CaptureError::Map("enrolled_pods6", "missing".into()))?;
        BpfHashMap::try_from(map).map_err(|e| CaptureError::Map("enrolled_pods6", e.to_string()))
    }

    /// Lets connections to `port` bypass capture, for `pod` (or, with
    /// `None`, every pod of the node, both families) in `direction`.
    pub fn exclude_port(
        &mut self,
        pod: Option<IpAddr>,
        port: u16,
        direction: Direction,
    ) -> Result<(), CaptureError> {
        let pod = pod.map(canonical_ip);
        if !matches!(pod, Some(IpAddr::V6(_))) {
            let v4 = match pod {
                Some(IpAddr::V4(v4)) => Some(v4),
                _ => None,
            };
            self.exclusions()?
                .insert(ExclusionKey::new(v4, port, direction), 1, 0)
                .map_err(|e| CaptureError::Map("excluded_ports", e.to_string()))?;
        }
        if !matches!(pod, Some(IpAddr::V4(_))) {
            let v6 = match pod {
                Some(IpAddr::V6(v6)) => Some(v6),
                _ => None,
            };
            self.exclusions6()?
                .insert(ExclusionKey6::new(v6, port, direction), 1, 0)
                .map_err(|e| CaptureError::Map("excluded_ports6", e.to_string()))?;
        }
        Ok(())
    }

    /// Removes the exclusions of every pod not in `keep` (pods that left).
    pub fn retain_exclusions(&mut self, keep: &[IpAddr]) -> Result<(), CaptureError> {
        let keep: Vec<IpAddr> = keep.iter().copied().map(canonical_ip).collect();
        let mut map = self.exclusions()?;
        let stale: Vec<ExclusionKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.pod_ip != 0
                    && !keep.contains(&IpAddr::from(Ipv4Addr::from(k.pod_ip.to_ne_bytes())))
            })
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        let mut map = self.exclusions6()?;
        let stale: Vec<ExclusionKey6> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.pod_ip != [0; 16] && !keep.contains(&IpAddr::from(Ipv6Addr::from(k.pod_ip)))
            })
            .collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// Makes `pod`'s exclusions exactly `ports` (outbound, inbound).
    pub fn set_exclusions(
        &mut self,
        pod: IpAddr,
        outbound: &[u16],
        inbound: &[u16],
    ) -> Result<(), CaptureError> {
        let pod = canonical_ip(pod);
        if pod.is_unspecified() {
            // The unspecified address is the node-wide wildcard: never write
            // it for a "pod".
            return Err(CaptureError::Map(
                "excluded_ports",
                format!("{pod} is not a pod address"),
            ));
        }
        let ports = || {
            outbound
                .iter()
                .map(|p| (*p, Direction::Outbound))
                .chain(inbound.iter().map(|p| (*p, Direction::Inbound)))
        };
        match pod {
            IpAddr::V4(v4) => {
                let want = ports()
                    .map(|(p, d)| ExclusionKey::new(Some(v4), p, d))
                    .collect();
                let pod_key = u32::from_ne_bytes(v4.octets());
                let map = self.exclusions()?;
                replace_keys(map, want, |k| k.pod_ip == pod_key, "excluded_ports")
            }
            IpAddr::V6(v6) => {
                let want = ports()
                    .map(|(p, d)| ExclusionKey6::new(Some(v6), p, d))
                    .collect();
                let pod_key = v6.octets();
                let map = self.exclusions6()?;
                replace_keys(map, want, |k| k.pod_ip == pod_key, "excluded_ports6")
            }
        }
    }

    fn exclusions(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, ExclusionKey, u8>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("excluded_ports")
            .ok_or_else(|| CaptureError::Map("excluded_ports", "missing".into()))?;
        BpfHashMap::try_from(map).map_err(|e| CaptureError::Map("excluded_ports", e.to_string()))
    }

    fn exclusions6(
        &mut self,
    ) -> Result<BpfHashMap<&mut aya::maps::MapData, ExclusionKey6, u8>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("excluded_ports6")
            .ok_or_else(|| CaptureError::Map("excluded_ports6", "missing".into()))?;
        BpfHashMap::try_from(map).map_err(|e| CaptureError::Map("excluded_ports6", e.to_string()))
    }

    /// Attaches the outbound program at tc ingress of `interface` (the host
    /// side of a pod's veth), adopting a link a previous instance pinned (the
    /// program is swapped atomically). Attaching twice is a no-op.
    pub fn attach(&mut self, interface: &str) -> Result<(), CaptureError> {
        self.ensure_installed()?;
        let pin = self.pin_dir.join(format!("{OUTBOUND_LINK}{interface}"));
        attach_to(&mut self.ebpf, &mut self.links, OUTBOUND, interface, pin)
    }

    /// Detaches the outbound program from `interface` (and drops its pin).
    pub fn detach(&mut self, interface: &str) -> Result<(), CaptureError> {
        let pin = self.pin_dir.join(format!("{OUTBOUND_LINK}{interface}"));
        detach_from(&mut self.links, interface, &pin)
    }

    /// Attaches the inbound program at tc ingress of the node uplink `interface`.
    pub fn attach_uplink(&mut self, interface: &str) -> Result<(), CaptureError> {
        self.ensure_installed()?;
        let pin = self.pin_dir.join(format!("{INBOUND_LINK}{interface}"));
        attach_to(&mut self.ebpf, &mut self.uplinks, INBOUND, interface, pin)
    }

    pub fn detach_uplink(&mut self, interface: &str) -> Result<(), CaptureError> {
        let pin = self.pin_dir.join(format!("{INBOUND_LINK}{interface}"));
        detach_from(&mut self.uplinks, interface, &pin)
    }

    /// Attaches the inbound program at tc ingress of `interface`, the host
    /// side of the veth of a local pod that is not captured itself: a
    /// waypoint, or a pod outside the mesh. What it sends to an enrolled pod
    /// on this node never crosses the uplink, and `bpf_sk_assign` works only
    /// at ingress, so it is steered where it enters the node: to the HBONE
    /// listener (port 15008) or the plaintext one (where STRICT refuses it),
    /// as from the uplink. Its other traffic passes untouched.
    pub fn attach_neighbour(&mut self, interface: &str) -> Result<(), CaptureError> {
        self.ensure_installed()?;
        let pin = self.pin_dir.join(format!("{NEIGHBOUR_LINK}{interface}"));
        attach_to(
            &mut self.ebpf,
            &mut self.neighbours,
            INBOUND,
            interface,
            pin,
        )
    }

    pub fn detach_neighbour(&mut self, interface: &str) -> Result<(), CaptureError> {
        let pin = self.pin_dir.join(format!("{NEIGHBOUR_LINK}{interface}"));
        detach_from(&mut self.neighbours, interface, &pin)
    }

    /// Neighbour interfaces with a pinned link, whether or not this instance
    /// holds them (a previous one may have left them).
    pub fn pinned_neighbour_interfaces(&self) -> Vec<String> {
        self.pinned(NEIGHBOUR_LINK)
    }

    pub fn attached_neighbours(&self) -> impl Iterator<Item = &str> {
        self.neighbours.keys().map(String::as_str)
    }

    /// Forgets (and unpins) links whose interface is gone or was replaced by a
    /// same-named one, so the next attach makes a fresh link. Returns their names.
    pub fn drop_stale_links(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        for links in [&mut self.links, &mut self.uplinks, &mut self.neighbours] {
            let stale: Vec<String> = links
                .iter()
                .filter(|(name, a)| ifindex(name) != a.ifindex)
                .map(|(name, _)| name.clone())
                .collect();
            for name in stale {
                if let Some(a) = links.remove(&name) {
                    let _ = release_pin(&a.pin);
                }
                gone.push(name);
            }
        }
        gone
    }

    /// Whether anything of ours is pinned (so [`Capture::remove_all`] has work).
    pub fn is_installed(&self) -> bool {
        self.pin_dir.exists()
    }

    pub fn has_uplink(&self, interface: &str) -> bool {
        self.uplinks.contains_key(interface)
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
        let handoff_stats = self
            .ebpf
            .map("handoff_stats")
            .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok());
        let handoff = |i: u32| -> u64 {
            handoff_stats
                .as_ref()
                .and_then(|s| s.get(&i, 0).ok())
                .map_or(0, |v| v.iter().sum())
        };
        Ok(CaptureStats {
            captured_new: read(0),
            captured_established: read(1),
            passed: read(2),
            excluded: read(3),
            dropped_no_listener: read(4),
            dropped_assign_failed: read(5),
            inbound_hbone: read(6),
            inbound_plaintext: read(7),
            dropped_malformed: read(8),
            dropped_ipv6: read(9),
            time_wait_handoffs: handoff(0),
            dropped_handoff_no_listener: handoff(1),
        })
    }
}

fn sk_lookup(ebpf: &mut Ebpf) -> Result<&mut SkLookup, CaptureError> {
    ebpf.program_mut(TIME_WAIT_HANDOFF)
        .ok_or_else(|| CaptureError::Load(format!("no program {TIME_WAIT_HANDOFF}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| {
            CaptureError::Load(format!("{TIME_WAIT_HANDOFF}: {e}"))
        })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| format!("{name}: {e}"))
}

fn attach_to(
    ebpf: &mut Ebpf,
    links: &mut HashMap<String, Attached>,
    name: &str,
    interface: &str,
    pin: PathBuf,
) -> Result<(), CaptureError> {
    if links.contains_key(interface) {
        return Ok(());
    }
    let attach_err = |e: String| CaptureError::Attach(interface.to_string(), e);
    let prog = program(ebpf, name).map_err(&attach_err)?;
    let link_id = match PinnedLink::from_pin(&pin) {
        // A previous instance's link: swap our program in, no gap in capture.
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))
                .map_err(|e| attach_err(format!("{e:?}")))?;
            prog.attach_to_link(link)
                .map_err(|e| attach_err(format!("{e:?}")))?
        }
        Err(_) => {
            // Kernels >= 6.6 attach with tcx links and need no qdisc; older
            // ones need clsact (and cannot pin the result; see the docs).
            match prog.attach(interface, TcAttachType::Ingress) {
                Ok(id) => id,
                Err(_) => {
                    let _ = aya::programs::tc::qdisc_add_clsact(interface);
                    prog.attach(interface, TcAttachType::Ingress)
                        .map_err(|e| attach_err(format!("{e:?}")))?
                }
            }
        }
    };
    let owned = prog
        .take_link(link_id)
        .map_err(|e| attach_err(format!("{e:?}")))?;
    let fd_link =
        FdLink::try_from(owned).map_err(|e| attach_err(format!("not a tcx link: {e:?}")))?;
    let link = if pin.exists() {
        fd_link
    } else {
        FdLink::from(
            fd_link
                .pin(&pin)
                .map_err(|e| attach_err(format!("pinning: {e:?}")))?,
        )
    };
    links.insert(
        interface.to_string(),
        Attached {
            _link: link,
            pin,
            ifindex: ifindex(interface),
        },
    );
    Ok(())
}

fn detach_from(
    links: &mut HashMap<String, Attached>,
    interface: &str,
    pin: &Path,
) -> Result<(), CaptureError> {
    if let Some(attached) = links.remove(interface) {
        // Removing the pin and closing our fd releases the link: detached.
        release_pin(&attached.pin)?;
        return Ok(());
    }
    release_pin(pin)
}

fn release_pin(pin: &Path) -> Result<(), CaptureError> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CaptureError::Attach(
            pin.display().to_string(),
            e.to_string(),
        )),
    }
}

/// The outbound listener's address and port for each family, if it takes
/// that family (see [`Capture::set_listener`]).
type FamilyListener<A> = Option<(A, u16)>;

fn per_family(
    listener: Option<SocketAddr>,
) -> (FamilyListener<Ipv4Addr>, FamilyListener<Ipv6Addr>) {
    match listener.map(canonical) {
        None => (None, None),
        Some(SocketAddr::V4(l)) => (Some((*l.ip(), l.port())), None),
        Some(SocketAddr::V6(l)) if l.ip().is_unspecified() => (
            Some((Ipv4Addr::UNSPECIFIED, l.port())),
            Some((Ipv6Addr::UNSPECIFIED, l.port())),
        ),
        Some(SocketAddr::V6(l)) => (None, Some((*l.ip(), l.port()))),
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses here: the programs see
/// them as IPv4 packets.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// Makes the keys of `map` that `mine` selects exactly `want` (each set to 1).
fn replace_keys<K>(
    mut map: BpfHashMap<&mut aya::maps::MapData, K, u8>,
    want: std::collections::HashSet<K>,
    mine: impl Fn(&K) -> bool,
    name: &'static str,
) -> Result<(), CaptureError>
where
    K: aya::Pod + Eq + std::hash::Hash,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| mine(k) && !want.contains(k))
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    for k in want {
        map.insert(k, 1, 0)
            .map_err(|e| CaptureError::Map(name, e.to_string()))?;
    }
    Ok(())
}

fn map_name(name: &str) -> &'static str {
    MAPS.into_iter().find(|m| *m == name).unwrap_or("map")
}

/// Node routing for captured packets: marked packets are delivered locally,
/// both families (IPv6 only where the kernel has it). Idempotent; runs `ip`
/// in the calling thread's network namespace.
pub fn setup_node_routing() -> Result<(), CaptureError> {
    let table = CAPTURE_ROUTE_TABLE.to_string();
    let mark = format!("{CAPTURE_MARK:#x}");
    let want = format!("fwmark {mark} lookup {table}");
    let mut families = vec![("-4", "0.0.0.0/0")];
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        families.push(("-6", "::/0"));
    }
    for (family, any) in families {
        let rules = run_ip(&[family, "rule", "show"])?;
        if !rules.contains(&want) {
            run_ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        run_ip(&[
            family, "route", "replace", "local", any, "dev", "lo", "table", &table,
        ])?;
    }
    // IPv6 needs no forwarding for capture (marked packets are delivered,
    // never forwarded); turning it on would also stop the node from taking
    // router advertisements.
    enable_ipv4_forwarding()?;
    Ok(())
}

/// Turns IPv4 forwarding on unless it already is: Kubernetes nodes have it
/// on, and a container's `/proc/sys` is read-only, so writing it regardless
/// would fail capture in any unprivileged ztunnel.
fn enable_ipv4_forwarding() -> Result<(), CaptureError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1")
        .map_err(|e| CaptureError::Routing(format!("enabling ip_forward: {e}")))
}

/// The interface the calling thread's namespace routes `ip` out of: for a pod
/// address on its node, the host side of the pod's veth.
pub fn interface_for(ip: IpAddr) -> Result<String, CaptureError> {
    let out = run_ip(&["-o", "route", "get", &ip.to_string()])?;
    let dev = out
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| CaptureError::Routing(format!("no interface for {ip}: {}", out.trim())))?;
    // A pod is reached directly over its own link. A local address, a route
    // via a gateway or the loopback device means the address is not a pod
    // here, and capturing that interface would take the node's traffic.
    let first = out.split_whitespace().next().unwrap_or("");
    if first == "local" || out.contains(" via ") || dev == "lo" {
        return Err(CaptureError::Routing(format!(
            "{ip} is not a pod on this node ({})",
            out.trim()
        )));
    }
    Ok(dev)
}

/// The veth interfaces of the calling thread's namespace: on a node, the
/// host sides of its pods' links (the uplink too, if it is one).
pub fn veth_interfaces() -> Result<Vec<String>, CaptureError> {
    let out = run_ip(&["-o", "link", "show", "type", "veth"])?;
    Ok(parse_link_names(&out))
}

/// Names from `ip -o link` lines (`7: va12@if6: <...> ...`).
fn parse_link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .filter(|name| !name.is_empty())
        .collect()
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

/// Ids of the programs attached at tc ingress of `interface` (tcx), in the
/// calling thread's namespace.
pub fn ingress_programs(interface: &str) -> Result<Vec<u32>, CaptureError> {
    let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)
        .map_err(|e| CaptureError::Attach(interface.to_string(), format!("{e:?}")))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// The `sk_lookup` programs attached to the calling thread's network
/// namespace (the TIME_WAIT hand-off is one), by id.
pub fn netns_lookup_programs() -> Result<Vec<u32>, CaptureError> {
    let netns = this_netns()?;
    let mut ids = [0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: std::os::fd::AsRawFd::as_raw_fd(&netns) as u32,
        attach_type: BPF_SK_LOOKUP,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..ProgQueryAttr::default()
    };
    // SAFETY: BPF_PROG_QUERY reads `attr` (its size passed) and writes at
    // most `prog_cnt` ids into `ids`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>(),
        )
    };
    if rc != 0 {
        return Err(CaptureError::Attach(
            "network namespace".into(),
            format!("BPF_PROG_QUERY: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(ids[..(attr.prog_cnt as usize).min(ids.len())].to_vec())
}

/// The calling thread's network namespace (a thread may have entered
/// another than its process's).
fn this_netns() -> Result<std::fs::File, CaptureError> {
    std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| CaptureError::Attach("network namespace".into(), e.to_string()))
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_SK_LOOKUP: u32 = 36;

/// The `query` member of `union bpf_attr` (uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Whether a BPF program with this id is still loaded anywhere in the kernel.
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_come_without_their_peer() {
        let out = "7: va12ab@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue\n\
                   9: eth0: <BROADCAST> mtu 1500\n";
        assert_eq!(parse_link_names(out), ["va12ab", "eth0"]);
        assert!(parse_link_names("").is_empty());
        assert!(parse_link_names("garbage without separators").is_empty());
    }

    #[test]
    fn listener_families() {
        let any4 = Ipv4Addr::UNSPECIFIED;
        let any6 = Ipv6Addr::UNSPECIFIED;
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(per_family(None), (None, None));
        assert_eq!(per_family(at("0.0.0.0:15001")), (Some((any4, 15001)), None));
        assert_eq!(
            per_family(at("[::]:15001")),
            (Some((any4, 15001)), Some((any6, 15001)))
        );
        let ip6: Ipv6Addr = "2001:2::1".parse().unwrap();
        assert_eq!(
            per_family(at("[2001:2::1]:15001")),
            (None, Some((ip6, 15001)))
        );
        let ip4 = Ipv4Addr::new(198, 18, 0, 1);
        assert_eq!(
            per_family(at("[::ffff:198.18.0.1]:15001")),
            (Some((ip4, 15001)), None)
        );
    }

    #[test]
    fn map_keys_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<CaptureConfig>(), 12);
        assert_eq!(std::mem::size_of::<CaptureConfig6>(), 20);
        assert_eq!(std::mem::size_of::<ExclusionKey>(), 8);
        assert_eq!(std::mem::size_of::<ExclusionKey6>(), 20);
        assert_eq!(
            canonical_ip("::ffff:198.19.1.10".parse().unwrap()),
            "198.19.1.10".parse::<IpAddr>().unwrap()
        );
    }
}
