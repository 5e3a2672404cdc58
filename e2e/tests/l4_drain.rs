//! SIGTERM: stop accepting, let open tunnels finish, then exit.

use std::time::Duration;

use e2e::client::socks5_connect;
use e2e::mesh::TwoNodes;
use e2e::servers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_tunnels() -> anyhow::Result<()> {
    let mut mesh = TwoNodes::start("[]")?;
    let _echo = servers::echo(mesh.server_addr()).await?;
    let mut open = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await?;
    open.write_all(b"before").await?;
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await?;

    mesh.z1.terminate();
    mesh.z1.wait_log("draining", Duration::from_secs(5))?;
    // No new connections...
    let late = socks5_connect(mesh.z1.socks5(), mesh.client, mesh.server_addr()).await;
    assert!(
        late.is_err(),
        "a draining ztunnel must not accept new connections"
    );
    // ...but the open tunnel keeps working until it ends.
    open.write_all(b"during").await?;
    open.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"during");
    open.shutdown().await?;
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await?;
    let code = mesh.z1.wait_exit(Duration::from_secs(10))?;
    assert_eq!(code, Some(0));
    let log = mesh.z1.log();
    assert!(log.contains("drained, exiting"), "{log}");
    assert!(
        log.contains("bytes_sent=12"),
        "the drained tunnel is logged whole:\n{log}"
    );
    Ok(())
}
