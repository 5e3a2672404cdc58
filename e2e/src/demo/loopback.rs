//! The loopback demo (no root needed): two ztunnels ("nodes") on 127.X.Y.0/24, mTLS HBONE between
//! them, an HTTP server behind a service VIP, an authorization policy, real
//! traffic from curl, and a short report of what the mesh saw.
//!
//! This is the foundation-stage demo; the network-namespace/eBPF demo with a
//! control plane and waypoint replaces it as those land.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{field, DemoArgs};
use crate::mesh::TwoNodes;
use crate::process::metric_sum;

const POLICY: &str = r#"
- name: allow-client-only
  namespace: demo
  action: Allow
  rules:
  - from: [{principals: ["cluster.local/ns/demo/sa/client"]}]
    to: [{ports: [9000]}]
"#;

/// A minimal HTTP/1.1 server standing in for the application.
async fn http_server(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                while let Ok(n) = s.read(&mut buf[got..]).await {
                    if n == 0 {
                        return;
                    }
                    got += n;
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") || got == buf.len() {
                        break;
                    }
                }
                let body = format!("hello from demo/server (you are {peer})\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Runs curl through ztunnel's SOCKS5 port from `src`; returns (ok, output).
fn curl(socks: SocketAddr, src: std::net::IpAddr, url: &str) -> (bool, String) {
    super::run_client(
        Command::new("curl")
            .args(["-sS", "--max-time", "5", "--socks5"])
            .arg(socks.to_string())
            .args(["--interface", &src.to_string(), url]),
    )
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    println!("starting two ztunnels on loopback (node1: client, intruder; node2: server)...");
    let mesh = TwoNodes::start(POLICY)?;
    http_server(mesh.server_addr()).await?;
    let url = format!("http://{}/", mesh.vip_addr());
    println!(
        "  node1 ztunnel  {}   (SOCKS5 :15080, admin :15000, metrics :15020)",
        mesh.z1.ip
    );
    println!(
        "  node2 ztunnel  {}   (HBONE on each workload address, :15008)",
        mesh.z2.ip
    );
    println!(
        "  service echo   {} -> demo/server {}:9000",
        mesh.vip_addr(),
        mesh.server
    );
    println!("  policy         demo: ALLOW only cluster.local/ns/demo/sa/client on port 9000\n");

    let mut ok = 0;
    let mut sample = String::new();
    for _ in 0..args.requests {
        let (success, out) = curl(mesh.z1.socks5(), mesh.client, &url);
        if success {
            ok += 1;
            sample = out;
        } else {
            sample = out;
        }
    }
    println!(
        "client   -> {url}: {ok}/{} requests succeeded; last response: {sample}",
        args.requests
    );
    let (denied_ok, denied_out) = curl(mesh.z1.socks5(), mesh.intruder, &url);
    println!(
        "intruder -> {url}: {}  ({denied_out})\n",
        if denied_ok {
            "ALLOWED (unexpected!)"
        } else {
            "refused, as the policy says"
        }
    );

    // Let the last access-log lines and metrics land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("flows seen by node2's ztunnel (destination side):");
    let log2 = mesh.z2.log();
    let mut shown = 0;
    for line in log2.lines().filter(|l| l.contains(" access: ")) {
        if shown < 3 || line.contains("RBAC") {
            println!(
                "  {} -> {}  mTLS={}  sent={}B recv={}B  result={}{}",
                field(line, "src.identity"),
                field(line, "dst.identity"),
                if field(line, "security") == "mutual_tls" {
                    "yes"
                } else {
                    "no"
                },
                field(line, "bytes_sent"),
                field(line, "bytes_recv"),
                field(line, "result"),
                if line.contains("RBAC") {
                    format!("  ({})", line.split("error=").nth(1).unwrap_or("").trim())
                } else {
                    String::new()
                },
            );
            shown += 1;
        }
    }
    let m1 = mesh.z1.metrics()?;
    let m2 = mesh.z2.metrics()?;
    println!("\nkey metrics:");
    let opened_src = metric_sum(
        &m1,
        "istio_tcp_connections_opened_total",
        &[("reporter", "source"), ("response_flags", "-")],
    );
    let opened_dst = metric_sum(
        &m2,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("response_flags", "-")],
    );
    let denied = metric_sum(
        &m2,
        "istio_tcp_connections_closed_total",
        &[("response_flags", "RBAC")],
    );
    let bytes = metric_sum(
        &m2,
        "istio_tcp_sent_bytes_total",
        &[("reporter", "destination")],
    );
    println!("  istio_tcp_connections_opened_total  node1 (source)      {opened_src}");
    println!("  istio_tcp_connections_opened_total  node2 (destination) {opened_dst}");
    println!("  istio_tcp_connections_closed_total{{response_flags=\"RBAC\"}}  {denied}");
    println!("  istio_tcp_sent_bytes_total (server -> client)           {bytes}");
    let dump = mesh.z1.config_dump()?;
    for p in dump["hbonePool"].as_array().cloned().unwrap_or_default() {
        println!(
            "  hbone pool: {} -> {} via {}: {} connection(s)",
            p["source"].as_str().unwrap_or("?"),
            p["destination"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("?"),
            p["connections"]
        );
    }
    println!("\n(traces arrive with the waypoint; see docs/ for what is built so far)");

    if args.keep {
        println!("\nmesh is up; try:");
        println!(
            "  curl --socks5 {} --interface {} {url}",
            mesh.z1.socks5(),
            mesh.client
        );
        println!("  curl http://{}:15000/config_dump", mesh.z1.ip);
        println!("  curl http://{}:15020/metrics", mesh.z2.ip);
        println!(
            "  logs: {} {}",
            mesh.z1.log_path.display(),
            mesh.z2.log_path.display()
        );
        println!("Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    anyhow::ensure!(
        ok == args.requests,
        "only {ok}/{} client requests succeeded",
        args.requests
    );
    anyhow::ensure!(!denied_ok, "the intruder was not refused");
    println!("\ndemo OK; shutting down");
    Ok(())
}
