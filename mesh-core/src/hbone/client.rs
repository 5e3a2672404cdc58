use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{H2Tuning, HboneError, Tunnel};

/// One HBONE connection: mTLS to the peer's port 15008, HTTP/2 on top.
#[derive(Clone)]
pub struct H2Client {
    send_request: h2::client::SendRequest<Bytes>,
}

impl H2Client {
    /// Dials `addr`, completes mTLS with `tls` and the HTTP/2 handshake, and spawns
    /// the connection driver. `on_close` runs when the connection ends.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        tuning: H2Tuning,
        timeout: Duration,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<H2Client, HboneError> {
        let dial = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| HboneError::Connect(addr, e))?;
            tcp.set_nodelay(true)
                .map_err(|e| HboneError::Connect(addr, e))?;
            super::set_keepalive(&tcp);
            // The server name is not checked (identities are), but rustls needs one.
            let name = ServerName::IpAddress(addr.ip().into());
            let tls = TlsConnector::from(tls)
                .connect(name, super::transport(tcp))
                .await
                .map_err(|e| HboneError::Tls(addr, e))?;
            let (send_request, connection) = h2::client::Builder::new()
                .initial_window_size(tuning.stream_window)
                .initial_connection_window_size(tuning.connection_window())
                .max_frame_size(tuning.max_frame_size)
                .max_send_buffer_size(tuning.max_frame_size as usize)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%addr, error = %e, "hbone connection ended with error");
                }
                on_close();
            });
            Ok::<_, HboneError>(H2Client { send_request })
        };
        tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| HboneError::Timeout(addr))?
    }

    /// Streams the peer currently allows at once.
    pub fn max_send_streams(&self) -> usize {
        self.send_request.current_max_send_streams()
    }

    /// Opens a CONNECT stream to `authority` (the destination `ip:port`) and waits for 2xx.
    pub async fn open(
        &self,
        authority: SocketAddr,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Tunnel, HboneError> {
        let mut send_request = self.send_request.clone().ready().await?;
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string());
        for (k, v) in headers {
            builder = builder.header(k, v);
        }
        let request = builder
            .body(())
            .map_err(|e| HboneError::BadRequest(e.to_string()))?;
        let (response, send) = send_request.send_request(request, false)?;
        let response = response.await?;
        if !response.status().is_success() {
            return Err(HboneError::Status(response.status()));
        }
        Ok(Tunnel::new(send, response.into_body()))
    }
}
