use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

use tokio::sync::{watch, Semaphore};

/// How long a peer that completed TLS may take to send the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

use super::{H2Tuning, HboneError, Tunnel, MAX_STREAMS_PER_CONNECTION};

/// The mTLS side of an accepted HBONE connection.
pub type ServerStream = tokio_rustls::server::TlsStream<super::HboneTransport>;

/// Why an HBONE connection was not accepted: a short reason (for metrics)
/// and a message.
pub type AcceptError = (&'static str, String);

/// Completes the server side of mTLS on an accepted HBONE connection within
/// `timeout` and returns the stream with the peer's identity (from its
/// client certificate).
pub async fn accept_mtls(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<(ServerStream, crate::Identity), AcceptError> {
    super::set_keepalive(&tcp);
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(super::transport(tcp));
    let tls = match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let why = crate::tls::describe_io_error(&e);
            return Err(("tls_handshake_failed", format!("TLS handshake: {why}")));
        }
        Err(_) => {
            return Err((
                "tls_handshake_failed",
                "TLS handshake timed out".to_string(),
            ))
        }
    };
    match crate::tls::peer_identity(tls.get_ref().1) {
        Ok(id) => Ok((tls, id)),
        Err(e) => Err(("no_peer_identity", format!("client certificate: {e}"))),
    }
}

/// A CONNECT request received on an HBONE connection, not yet answered.
pub struct IncomingTunnel {
    request: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
}

impl IncomingTunnel {
    pub fn method(&self) -> &Method {
        self.request.method()
    }

    pub fn headers(&self) -> &http::HeaderMap {
        self.request.headers()
    }

    /// The tunnel target from `:authority`; it must be a literal `ip:port`.
    pub fn target(&self) -> Result<SocketAddr, HboneError> {
        if self.request.method() != Method::CONNECT {
            return Err(HboneError::BadRequest(format!(
                "method {} is not CONNECT",
                self.request.method()
            )));
        }
        let authority = self
            .request
            .uri()
            .authority()
            .ok_or_else(|| HboneError::BadRequest("CONNECT without :authority".into()))?;
        authority.as_str().parse().map_err(|_| {
            HboneError::BadRequest(format!("authority {:?} is not ip:port", authority.as_str()))
        })
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<Tunnel, HboneError> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(Tunnel::new(send, self.request.into_body()))
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        // The peer may already have gone; nothing more to do then.
        let _ = self.respond.send_response(response, true);
    }
}

/// Runs the HTTP/2 server side of one established mTLS connection, handing every
/// stream to `handler` on its own task. When `drain` flips to true the server
/// sends GOAWAY and returns once the open streams have finished.
pub async fn serve_connection<IO, H, F>(
    io: IO,
    tuning: H2Tuning,
    mut drain: watch::Receiver<bool>,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(IncomingTunnel) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(tuning.stream_window)
        .initial_connection_window_size(tuning.connection_window())
        .max_frame_size(tuning.max_frame_size)
        .max_send_buffer_size(tuning.max_frame_size as usize)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION as u32)
        // CONNECT carries a handful of short headers; h2's 16 MiB default
        // would let one peer make us buffer a lot for nothing.
        .max_header_list_size(16 * 1024)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            HboneError::BadRequest("no HTTP/2 preface within the handshake timeout".into())
        })??;
    // Streams the peer reset still run their handler (say, an upstream connect)
    // after h2 has freed their slot; this bounds handlers, not just streams.
    let handlers = Arc::new(Semaphore::new(MAX_STREAMS_PER_CONNECTION));
    let mut draining = *drain.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    // Never wait here: this loop drives the connection's I/O, which
                    // the running handlers need to finish.
                    let Ok(permit) = handlers.clone().try_acquire_owned() else {
                        let mut respond = respond;
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    // Boxed where it is made: a handler's state is kilobytes,
                    // and Tokio and the wrapping block move it by value.
                    let task = Box::pin(handler(IncomingTunnel { request, respond }));
                    tokio::spawn(async move {
                        task.await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            changed = drain.changed(), if !draining => {
                // A dropped sender means the process is going away: drain too.
                let _ = changed;
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}
