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

/// Requests in the namespace demo's split sample: with weights 90/10 the
/// share of reviews-v2 is Binomial(400, 0.1), mean 10 %, standard deviation
/// 1.5 %; the bounds below (5 % to 16 %) fail a correct waypoint about once in
/// 6,000 runs, and are far from L4 round robin's 50 %. 400 curls take a few
/// seconds.
const SPLIT_SAMPLE: usize = 400;

/// `<name> <number>` in `line` (e.g. `v1 361,`).
fn count_after(line: &str, name: &str) -> Option<usize> {
    let rest = line.split(&format!(" {name} ")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The last number on the first report line containing `needle`.
fn metric_line(report: &str, needle: &str) -> f64 {
    report
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[test]
fn namespace_demo_reports_waypoint_split_denial_capture_and_mtls() -> anyhow::Result<()> {
    if !e2e::netns::root_or_skip("namespace_demo_reports_waypoint_split_denial_capture_and_mtls") {
        return Ok(());
    }
    let n = SPLIT_SAMPLE.to_string();
    let (report, pid) = demo_with_pid(&["--requests", &n])?;
    expect(
        &report,
        &[
            &format!("{n}/{n} requests answered"),
            "split by HTTPRoute demo/reviews-split (weights 90/10), applied per request by the waypoint",
            "waypoint demo/waypoint up in pod demo/waypoint-0 (198.19.2.30:15008",
            // reviews is reached through the waypoint, which opens its own tunnel.
            "reviews saw the caller as 198.19.2.30",
            "POST http://198.18.128.10:9080/: 403 RBAC: access denied",
            "refused: plaintext to a STRICT mTLS namespace",
            "pod traffic on TCP ports {15008} (control plane and span export aside); marker in cleartext: no",
            // Source side: the client's ztunnel tunnels straight to the waypoint pod.
            "spiffe://cluster.local/ns/demo/sa/client -> spiffe://cluster.local/ns/demo/sa/waypoint  mTLS=yes  src=198.19.1.10",
            // Destination side: reviews' ztunnel sees the waypoint's identity.
            "spiffe://cluster.local/ns/demo/sa/waypoint -> spiffe://cluster.local/ns/demo/sa/reviews  mTLS=yes  src=198.19.2.30",
            // One request traced across both ztunnels and the waypoint.
            "spans from ztunnel.node1, waypoint.demo.waypoint, ztunnel.node2",
            "outbound  [ztunnel.node1, client,",
            "GET demo/reviews-split  [waypoint.demo.waypoint, server,",
            "inbound  [ztunnel.node2, server,",
            "demo OK",
        ],
    );
    let spans = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("trace "))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    assert!(spans >= 3, "a trace of {spans} spans: {report}");

    // The split is the HTTPRoute's 90/10, not L4 round robin.
    let line = report
        .lines()
        .find(|l| l.contains("requests answered"))
        .unwrap_or_default();
    let (v1, v2) = (
        count_after(line, "v1").unwrap_or(0),
        count_after(line, "v2").unwrap_or(0),
    );
    assert_eq!(v1 + v2, SPLIT_SAMPLE, "every answer from v1 or v2: {line}");
    let share = v2 as f64 / SPLIT_SAMPLE as f64;
    assert!(
        (0.05..=0.16).contains(&share),
        "reviews-v2 got {:.1} % of {SPLIT_SAMPLE} requests, want about 10 %: {line}",
        share * 100.0
    );

    // The waypoint counted every request it served: the sample, the denied
    // POST and the wire check's request; the split is in its labels too.
    let waypoint_total = metric_line(&report, "istio_requests_total{reporter=\"waypoint\"}");
    assert!(
        waypoint_total >= (SPLIT_SAMPLE + 2) as f64,
        "waypoint istio_requests_total: {report}"
    );
    let v2_served = metric_line(&report, "destination_service_name=\"reviews-v2\"");
    assert!(
        v2_served >= v2 as f64,
        "waypoint metrics for reviews-v2: {report}"
    );
    assert!(
        metric_line(&report, "response_code=\"403\"") >= 1.0,
        "{report}"
    );
    assert!(
        metric_line(&report, "captured_new") >= SPLIT_SAMPLE as f64,
        "capture counters: {report}"
    );

    // Nothing of the demo's left behind: namespaces and pins carry its pid,
    // and every process it started names its work dir in its arguments.
    let mine = format!("ambit-{pid}-");
    let leftover = e2e::netns::ip(&["netns", "list"])?;
    assert!(
        !leftover.lines().any(|l| l.starts_with(&mine)),
        "namespaces left: {leftover}"
    );
    // The BPF programs it attached are unloaded (the kernel frees them
    // shortly after their last link, pin and fd go) and its veths are gone.
    let ebpf = report
        .lines()
        .find_map(|l| l.strip_prefix("eBPF: programs "))
        .unwrap_or_default();
    let ids: Vec<u32> = ebpf
        .split(']')
        .next()
        .unwrap_or_default()
        .trim_start_matches('[')
        .split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect();
    assert!(
        !ids.is_empty(),
        "no attached programs in the report: {report}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ids.iter().any(|id| ebpf_redirect::program_loaded(*id))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let loaded: Vec<_> = ids
        .iter()
        .filter(|id| ebpf_redirect::program_loaded(**id))
        .collect();
    assert!(loaded.is_empty(), "BPF programs still loaded: {loaded:?}");
    let links: Vec<&str> = ebpf
        .split(": ")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(!links.is_empty(), "no links in the report: {report}");
    let host_links = e2e::netns::ip(&["-o", "link", "show"])?;
    let left: Vec<_> = links
        .iter()
        .filter(|l| {
            host_links.contains(&format!(" {l}@")) || host_links.contains(&format!(" {l}:"))
        })
        .collect();
    assert!(left.is_empty(), "links left: {left:?}");
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    let work_dir = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("work dir "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert!(!work_dir.is_empty(), "no work dir in the report: {report}");
    assert!(!std::path::Path::new(&work_dir).exists(), "{work_dir} left");
    let procs: Vec<String> = std::fs::read_dir("/proc")?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&work_dir))
        .collect();
    assert!(procs.is_empty(), "processes left: {procs:?}");
    Ok(())
}
