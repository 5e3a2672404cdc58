//! Bad peers are refused with a clear log line and a metric, and the ztunnel
//! keeps serving everyone else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use e2e::client::{echo_roundtrip, socks5_connect};
use e2e::mesh::TwoNodes;
use e2e::process::metric_sum;
use e2e::{servers, Pki};
use mesh_core::hbone::{H2Client, H2Tuning, HboneError};
use mesh_core::tls::{self, ExpectedIdentityVerifier, WorkloadCertificate};
use mesh_core::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cert(pki: &Pki, id: &Identity, expired: bool) -> WorkloadCertificate {
    let now = SystemTime::now();
    let (nb, na) = if expired {
        (
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
    } else {
        (
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    };
    pki.ca
        .issue_with_validity(id, nb, na)
        .and_then(|c| Ok(c.to_workload_certificate()?))
        .expect("issue test certificate")
}

/// Dials an HBONE peer as `tls` and opens one CONNECT to `target`.
async fn hbone_attempt(
    peer: SocketAddr,
    tls: rustls::ClientConfig,
    target: SocketAddr,
) -> Result<(), HboneError> {
    hbone_attempt_with(peer, tls, target, &[]).await
}

async fn hbone_attempt_with(
    peer: SocketAddr,
    tls: rustls::ClientConfig,
    target: SocketAddr,
    headers: &[(http::HeaderName, http::HeaderValue)],
) -> Result<(), HboneError> {
    let client = H2Client::connect(
        peer,
        Arc::new(tls),
        H2Tuning::default(),
        Duration::from_secs(5),
        || {},
    )
    .await?;
    client.open(target, headers).await.map(|_| ())
}

fn failures(text: &str, direction: &str, reason: &str) -> f64 {
    metric_sum(
        text,
        "ambit_connection_failures_total",
        &[("direction", direction), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_others_keep_working() -> anyhow::Result<()> {
    let mesh = TwoNodes::start("[]")?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let roots = mesh.pki.ca.trust_roots()?;
    let client_id = Pki::identity("demo", "client");
    let server_id = Pki::identity("demo", "server");
    let hbone2 = SocketAddr::new(mesh.server, 15008);
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;

    // 1. A server proving the wrong identity: "ghost" (node3) is impersonated by a
    //    peer holding a valid certificate for demo/server. ztunnel 1 must refuse.
    let impostor_cfg = tls::server_config(&cert(&mesh.pki, &server_id, false), &roots)?;
    let impostor = tokio::net::TcpListener::bind(SocketAddr::new(mesh.ghost, 15008)).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(impostor_cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = impostor.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let attempt = socks5_connect(
        mesh.z1.socks5(),
        mesh.client,
        SocketAddr::new(mesh.ghost, 9000),
    )
    .await;
    assert!(attempt.is_err(), "tunnel to an impostor must fail");
    let log = mesh.z1.wait_log(
        "is not the expected spiffe://cluster.local/ns/demo/sa/ghost",
        Duration::from_secs(5),
    )?;
    assert!(
        log.contains("server identity spiffe://cluster.local/ns/demo/sa/server"),
        "{log}"
    );
    mesh.z1
        .wait_for_metric(
            "ambit_connection_failures_total",
            &[
                ("direction", "outbound"),
                ("reason", "tls_handshake_failed"),
            ],
            1.0,
        )
        .await?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;

    // 2-4. Clients ztunnel 2 must refuse at the TLS handshake.
    let verifier = || {
        Arc::new(ExpectedIdentityVerifier::new(
            roots.store(),
            vec![server_id.clone()],
        ))
    };
    let other_pki = Pki::new()?;
    let no_cert = {
        let mut c = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier())
            .with_no_client_auth();
        c.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        c
    };
    let cases = [
        (
            "expired client certificate",
            tls::client_config(
                &cert(&mesh.pki, &client_id, true),
                &roots,
                vec![server_id.clone()],
            )?,
            &["certificate expired"][..],
        ),
        (
            "unknown CA",
            tls::client_config(
                &cert(&other_pki, &client_id, false),
                &roots,
                vec![server_id.clone()],
            )?,
            &["UnknownIssuer", "BadSignature"][..],
        ),
        (
            "no client certificate",
            no_cert,
            &["peer sent no certificates"][..],
        ),
    ];
    let mut expected_failures = 0.0;
    for (what, cfg, log_says) in cases {
        let result = hbone_attempt(hbone2, cfg, mesh.server_addr()).await;
        assert!(result.is_err(), "{what}: must be refused");
        expected_failures += 1.0;
        let text = mesh
            .z2
            .wait_for_metric(
                "ambit_connection_failures_total",
                &[("direction", "inbound"), ("reason", "tls_handshake_failed")],
                expected_failures,
            )
            .await?;
        assert_eq!(
            failures(&text, "inbound", "tls_handshake_failed"),
            expected_failures,
            "{what}"
        );
        // Two roots with the same subject (two installs) fail as BadSignature,
        // distinct ones as UnknownIssuer: both are "not our CA".
        // Logs are written in batches: wait for this case's own line.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = mesh.z2.log();
            if log_says.iter().any(|s| log.contains(s)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: none of {log_says:?} in\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    }

    // 5. Plain HTTP/1.1 to the HBONE port.
    let mut plain = tokio::net::TcpStream::connect(hbone2).await?;
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await?;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plain HTTP must not be served"
    );
    expected_failures += 1.0;
    mesh.z2
        .wait_for_metric(
            "ambit_connection_failures_total",
            &[("direction", "inbound"), ("reason", "tls_handshake_failed")],
            expected_failures,
        )
        .await?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;

    // 6. A valid peer asking ztunnel 2 to CONNECT somewhere that is not on node2.
    // A valid client of ztunnel 2: right CA, right identity, unexpired.
    let good = || {
        tls::client_config(
            &cert(&mesh.pki, &client_id, false),
            &roots,
            vec![server_id.clone()],
        )
    };

    let elsewhere = SocketAddr::new(mesh.client, 9000);
    match hbone_attempt(hbone2, good()?, elsewhere).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::BAD_REQUEST),
        other => panic!("CONNECT to a non-local destination: {other:?}"),
    }
    mesh.z2
        .wait_log("not a workload on node node2", Duration::from_secs(5))?;
    mesh.z2
        .wait_for_metric(
            "ambit_connection_failures_total",
            &[("direction", "inbound"), ("reason", "not_local")],
            1.0,
        )
        .await?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;

    // 7. A valid peer claiming someone else's address (to get past ipBlocks).

    let spoof = [(
        http::HeaderName::from_static(mesh_core::hbone::FORWARDED),
        http::HeaderValue::from_str(&mesh_core::hbone::forwarded_for(mesh.intruder))?,
    )];
    match hbone_attempt_with(hbone2, good()?, mesh.server_addr(), &spoof).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::BAD_REQUEST),
        other => panic!("spoofed Forwarded: {other:?}"),
    }
    mesh.z2.wait_log(
        "is not a workload with identity spiffe://cluster.local/ns/demo/sa/client",
        Duration::from_secs(5),
    )?;

    // 8. A tunnel into the HBONE port itself (would hide the real source).

    match hbone_attempt(hbone2, good()?, hbone2).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::BAD_REQUEST),
        other => panic!("CONNECT to the HBONE port: {other:?}"),
    }
    mesh.z2
        .wait_for_metric(
            "ambit_connection_failures_total",
            &[("direction", "inbound"), ("reason", "self_call")],
            1.0,
        )
        .await?;
    echo_roundtrip(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    Ok(())
}
