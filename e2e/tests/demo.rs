//! The demo (quick-start command 1) runs the same code path as here and must
//! report what the mesh did.

use std::process::Command;

#[test]
fn demo_reports_identities_denial_and_metrics() -> anyhow::Result<()> {
    let out = Command::new(e2e::process::bin_path("ambit-demo")?)
        .args(["--requests", "5"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for want in [
        "5/5 requests succeeded",
        "refused, as the policy says",
        "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/server  mTLS=yes",
        "result=RBAC",
        "istio_tcp_connections_opened_total  node2 (destination) 5",
        "demo OK",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    Ok(())
}
