//! A packet capture for tests: an AF_PACKET socket in a namespace records every
//! frame until stopped (bounded in bytes and time).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

const MAX_BYTES: usize = 256 << 20;

pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<Vec<Vec<u8>>>>>,
}

/// What a capture saw.
pub struct Capture {
    pub frames: Vec<Vec<u8>>,
}

impl Sniffer {
    /// Starts capturing on every interface of namespace `netns`.
    pub fn start(netns: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{netns}");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<Vec<u8>>> {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns affects only this thread; socket/setsockopt/recv
            // get valid pointers and lengths.
            let fd = unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    anyhow::bail!("setns: {}", std::io::Error::last_os_error());
                }
                let raw = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                if raw < 0 {
                    anyhow::bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(raw);
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                fd
            };
            let _ = ready_tx.send(());
            let mut frames = Vec::new();
            let mut total = 0usize;
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Acquire) && total < MAX_BYTES {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    total += n as usize;
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            Ok(frames)
        });
        ready_rx.recv_timeout(std::time::Duration::from_secs(10))?;
        Ok(Sniffer {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> anyhow::Result<Capture> {
        self.stop.store(true, Ordering::Release);
        let frames = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            _ => anyhow::bail!("sniffer thread failed"),
        };
        Ok(Capture { frames })
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Capture {
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.frames
            .iter()
            .any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// (source port, destination port) of every TCP frame, IPv4 or IPv6
    /// (IPv6 with TCP right after the fixed header).
    pub fn tcp_ports(&self) -> Vec<(u16, u16)> {
        self.frames.iter().filter_map(|f| tcp_ports(f)).collect()
    }

    /// How many frames were IPv6 TCP.
    pub fn ipv6_tcp_frames(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| f.get(12..14) == Some(&[0x86, 0xdd]) && tcp_ports(f).is_some())
            .count()
    }
}

fn tcp_ports(f: &[u8]) -> Option<(u16, u16)> {
    let t = match f.get(12..14)? {
        // Ethernet (14) + IPv4 with protocol 6.
        [0x08, 0x00] if *f.get(23)? == 6 => 14 + usize::from(f.get(14)? & 0x0f) * 4,
        // Ethernet (14) + IPv6 (40) with next header 6.
        [0x86, 0xdd] if *f.get(20)? == 6 => 14 + 40,
        _ => return None,
    };
    let ports = f.get(t..t + 4)?;
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}
