//! A client reusing its source port through capture right after a
//! connection the mesh closed first: the mesh's side of the old connection
//! is still in TIME_WAIT when the new SYN arrives.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::cluster::Pod;
use crate::process::{metric_sum, Ztunnel};

/// What the client saw.
#[derive(Debug)]
pub struct Reuse {
    /// How long each connect took.
    pub connects: Vec<Duration>,
    /// SYNs the client's namespace had to send again meanwhile.
    pub syn_retransmits: u64,
}

/// `rounds` connections from `from` in `client` to `to` in `server`, one
/// after the other from the same source port. The server speaks and closes
/// first, so the close reaches the client through the mesh and the mesh
/// (the client's node's ztunnel) ends its side first.
pub fn reuse_source_port(
    client: &Pod,
    from: SocketAddr,
    server: &Pod,
    to: SocketAddr,
    rounds: usize,
) -> anyhow::Result<Reuse> {
    let listener = server.ns.run(move || Ok(TcpListener::bind(to)?))?;
    let served = std::thread::spawn(move || {
        for _ in 0..rounds {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.write_all(b"bye");
            }
        }
    });
    let before = client.ns.run(|| tcp_ext("TCPSynRetrans"))?;
    let connects = client.ns.run(move || {
        let mut took = Vec::new();
        for _ in 0..rounds {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(from),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&from.into())?;
            let start = Instant::now();
            socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
            took.push(start.elapsed());
            let mut s: TcpStream = socket.into();
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            anyhow::ensure!(got == b"bye", "got {got:?}");
        }
        Ok(took)
    })?;
    let after = client.ns.run(|| tcp_ext("TCPSynRetrans"))?;
    let _ = served.join();
    Ok(Reuse {
        connects,
        syn_retransmits: after.saturating_sub(before),
    })
}

/// `ambit_capture_packets_total{result="time_wait_handoff"}` of `z` once it
/// reaches `want` (counters are copied from the BPF maps once a second).
pub fn handoffs(z: &Ztunnel, want: f64) -> anyhow::Result<f64> {
    const METRIC: &str = "ambit_capture_packets_total";
    let labels = [("result", "time_wait_handoff")];
    let text = z.wait_for_metric_blocking(METRIC, &labels, want)?;
    Ok(metric_sum(&text, METRIC, &labels))
}

/// A `TcpExt` counter of the calling thread's network namespace.
pub fn tcp_ext(name: &str) -> anyhow::Result<u64> {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("no TcpExt in /proc/thread-self/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.parse::<u64>())
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no TcpExt counter {name}"))
}
