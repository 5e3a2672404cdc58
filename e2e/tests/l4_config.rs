//! A bad config file is rejected with its line and reason; a running ztunnel
//! keeps its last good config.

use std::process::Command;
use std::time::Duration;

use e2e::client::{echo_roundtrip, socks5_connect};
use e2e::mesh::TwoNodes;
use e2e::process::{bin_path, metric_sum};
use e2e::servers;

const DENY_INTRUDER: &str = r#"
- name: deny-intruder
  namespace: demo
  action: Deny
  rules: [{from: [{principals: ["cluster.local/ns/other/sa/intruder"]}]}]
"#;

/// (what, edit of the good config, text the error must contain)
fn bad_variants(good: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "unknown field",
            good.replacen(
                "  serviceAccount: client\n",
                "  serviceAccount: client\n  colour: blue\n",
                1,
            ),
            "unknown field `colour`",
        ),
        (
            "bad IP",
            good.replacen(
                "  node: node1\n  addresses: [\"",
                "  node: node1\n  addresses: [\"300.1.1.1\", \"",
                1,
            ),
            "invalid IP address syntax",
        ),
        (
            "duplicate workload",
            good.replacen(
                "- name: intruder\n  namespace: other",
                "- name: client\n  namespace: demo",
                1,
            ),
            "duplicate demo/client",
        ),
    ]
}

fn line_of(src: &str, needle: &str) -> usize {
    src.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect("needle in config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_ztunnel_keeps_last_good_config() -> anyhow::Result<()> {
    let mesh = TwoNodes::start(DENY_INTRUDER)?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let good = TwoNodes::config(&mesh.addrs(), DENY_INTRUDER);
    for (i, (what, bad, reason)) in bad_variants(&good).into_iter().enumerate() {
        mesh.rewrite_config(&bad, "config rejected")?;
        let log = mesh.z1.log();
        let expected_line = match what {
            "unknown field" => line_of(&bad, "colour"),
            "bad IP" => line_of(&bad, "300.1.1.1"),
            _ => bad
                .lines()
                .enumerate()
                .filter(|(_, l)| *l == "- name: client")
                .nth(1)
                .map(|(i, _)| i + 1)
                .unwrap_or(0),
        };
        let line = log
            .lines()
            .filter(|l| l.contains("config rejected"))
            .nth(i)
            .unwrap_or_default();
        assert!(line.contains(reason), "{what}: {line}");
        assert!(
            line.contains(&format!("line {expected_line}")),
            "{what}: want line {expected_line}: {line}"
        );
        // The last good config still applies: traffic flows and the DENY still holds.
        echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
        assert!(
            socks5_connect(mesh.z1.socks5(), mesh.intruder, mesh.server_addr())
                .await
                .is_err(),
            "{what}: DENY policy lost"
        );
    }
    let text = mesh.z1.metrics()?;
    assert_eq!(
        metric_sum(
            &text,
            "ambit_config_reloads_total",
            &[("result", "config_rejected")]
        ),
        3.0,
        "{text}"
    );
    // And a good file is picked up again.
    mesh.set_policies("[]")?;
    echo_roundtrip(mesh.z1.socks5(), mesh.intruder, mesh.server_addr()).await?;
    Ok(())
}

#[test]
fn bad_config_at_startup_fails_with_line_and_reason() -> anyhow::Result<()> {
    let dir = e2e::mesh::TempDir::new("ambit-badcfg")?;
    let pki = e2e::Pki::new()?;
    pki.write_root(dir.path())?;
    let subnet = e2e::Subnet::random();
    let good = TwoNodes::config(
        &e2e::mesh::Addrs {
            client: subnet.workload(0),
            intruder: subnet.workload(1),
            server: subnet.workload(2),
            vip: subnet.ip(200),
            ghost: subnet.workload(3),
        },
        "[]",
    );
    for (what, bad, reason) in bad_variants(&good) {
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, &bad)?;
        let out = Command::new(bin_path("ztunnel")?)
            .arg("--config")
            .arg(&path)
            .arg("--certs")
            .arg(dir.path())
            .args(["--node", "node1", "--bind-ip", &subnet.node(1).to_string()])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: must not start");
        assert!(
            stderr.contains(reason) && stderr.contains("line "),
            "{what}: {stderr}"
        );
    }
    let _ = Duration::ZERO;
    Ok(())
}
