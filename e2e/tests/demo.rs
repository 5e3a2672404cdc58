//! The demo (quick-start command 1) runs the same code path as here and must
//! report what the mesh did: the namespace/eBPF demo as root, and the loopback
//! demo everywhere.

use std::process::Command;

fn demo(args: &[&str]) -> anyhow::Result<String> {
    Ok(demo_with_pid(args)?.0)
}

/// Runs the demo; returns its report and its pid (its namespaces carry it).
fn demo_with_pid(args: &[&str]) -> anyhow::Result<(String, u32)> {
    let child = Command::new(e2e::process::bin_path("ambit-demo")?)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo {args:?} failed:\n{stdout}\n{stderr}"
    );
    Ok((stdout, pid))
}

fn expect(report: &str, wanted: &[&str]) {
    for want in wanted {
        assert!(report.contains(want), "missing {want:?} in:\n{report}");
    }
}

#[test]
fn loopback_demo_reports_identities_denial_and_metrics() -> anyhow::Result<()> {
    let report = demo(&["--loopback", "--requests", "5"])?;
    expect(
        &report,
        &[
            "5/5 requests succeeded",
            "refused, as the policy says",
            "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/server  mTLS=yes",
            "result=RBAC",
            "istio_tcp_connections_opened_total  node2 (destination) 5",
            "demo OK",
        ],
    );
    Ok(())
}

#[test]
fn namespace_demo_reports_capture_mtls_and_refusal() -> anyhow::Result<()> {
    if !e2e::netns::root_or_skip("namespace_demo_reports_capture_mtls_and_refusal") {
        return Ok(());
    }
    let (report, pid) = demo_with_pid(&["--requests", "6"])?;
    expect(
        &report,
        &[
            "6/6 requests answered; v1 3, v2 3",
            "reviews saw the caller as 198.19.1.10",
            "refused: plaintext to a STRICT mTLS namespace",
            "TCP ports {15008}; marker in cleartext: no",
            "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/reviews  mTLS=yes  src=198.19.1.10",
            "demo OK",
        ],
    );
    let captured = report
        .lines()
        .find(|l| l.contains("captured_new"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(captured >= 6.0, "capture counters: {report}");
    // Nothing of the demo's left behind: namespaces and pins carry its pid.
    let mine = format!("ambit-{pid}-");
    let leftover = e2e::netns::ip(&["netns", "list"])?;
    assert!(
        !leftover.lines().any(|l| l.starts_with(&mine)),
        "namespaces left: {leftover}"
    );
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    Ok(())
}
