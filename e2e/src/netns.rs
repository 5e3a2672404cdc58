//! Network namespaces for tests that need a real network: created with
//! iproute2, entered per thread with setns(2), always deleted on drop.
//!
//! Names are `ambit-<pid>-<role>-<random>`, so parallel tests never collide
//! and namespaces left by a crashed run (dead pid) are removed at the next start.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context};

const PREFIX: &str = "ambit-";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True if the test may run; otherwise prints a loud SKIPPED line. Tests that
/// need root run in CI, which is root.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "\n*** SKIPPED {test}: needs root (network namespaces, eBPF). CI runs it as root. ***\n"
    );
    false
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(role: &str) -> anyhow::Result<Self> {
        cleanup_stale();
        let name = format!(
            "{PREFIX}{}-{role}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Moves the calling thread into this namespace (for good: use a thread of
    /// its own, see [`Netns::spawn`]).
    pub fn enter(&self) -> anyhow::Result<()> {
        let f = File::open(format!("/run/netns/{}", self.name)).context("opening netns")?;
        // SAFETY: setns on a valid namespace fd affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<F, R>(&self, f: F) -> std::thread::JoinHandle<anyhow::Result<R>>
    where
        F: FnOnce() -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f_ns = File::open(&path).context("opening netns")?;
            // SAFETY: as in `enter`.
            if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<F, R>(&self, f: F) -> anyhow::Result<R>
    where
        F: FnOnce() -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a new thread inside the namespace called `name`, and waits.
pub fn run_in<F, R>(name: &str, f: F) -> anyhow::Result<R>
where
    F: FnOnce() -> anyhow::Result<R> + Send + 'static,
    R: Send + 'static,
{
    let path = format!("/run/netns/{name}");
    let handle = std::thread::spawn(move || {
        let f_ns = File::open(&path).context("opening netns")?;
        // SAFETY: setns on a valid namespace fd affects only this new thread.
        if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    });
    match handle.join() {
        Ok(r) => r,
        Err(_) => bail!("thread in {name} panicked"),
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth ends inside it.
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// Removes pin directories left behind by processes that no longer exist.
fn cleanup_stale_pins() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in dir.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Deletes namespaces left behind by test processes that no longer exist.
pub fn cleanup_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (tests pin maps and links there).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()?;
    if !out.status.success() {
        bail!(
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A directory on bpffs of this test's own, removed (with whatever is pinned
/// in it) on drop.
pub struct PinDir(std::path::PathBuf);

impl PinDir {
    pub fn new() -> anyhow::Result<Self> {
        ensure_bpffs()?;
        cleanup_stale_pins();
        let p = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/{PREFIX}{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        ));
        std::fs::create_dir_all(&p)?;
        Ok(PinDir(p))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A veth pair joining two namespaces, with a short random suffix in its names.
pub fn veth(a: &Netns, b: &Netns) -> anyhow::Result<(String, String)> {
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (ea, eb) = (format!("va{tag}"), format!("vb{tag}"));
    ip(&[
        "link",
        "add",
        &ea,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &eb,
        "netns",
        b.name(),
    ])?;
    Ok((ea, eb))
}
