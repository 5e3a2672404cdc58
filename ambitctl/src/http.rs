//! Plain HTTP/1.1 GET to a component's admin or monitoring port.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest answer read: a config dump of a large mesh is a few MiB.
pub const MAX_BODY: usize = 64 << 20;

/// What an endpoint answered.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// The body as JSON, if the answer was 200.
    pub fn json(&self, what: &str) -> anyhow::Result<serde_json::Value> {
        if self.status != 200 {
            bail!("{what}: HTTP {}: {}", self.status, first_line(&self.body));
        }
        serde_json::from_str(&self.body).with_context(|| format!("{what}: not JSON"))
    }
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// GET `path` over `stream` (one request, then the connection is dropped).
pub async fn get(
    stream: TcpStream,
    host: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    tokio::time::timeout(timeout, get_inner(stream, host, path))
        .await
        .with_context(|| format!("GET {path} from {host}: no answer within {timeout:?}"))?
}

async fn get_inner(stream: TcpStream, host: &str, path: &str) -> anyhow::Result<Reply> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "ambitctl")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} from {host}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer to GET {path} from {host}: {e}"))?
        .to_bytes();
    driver.abort();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
