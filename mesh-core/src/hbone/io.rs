//! A CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), for
//! protocols that run inside a tunnel rather than being copied through it:
//! the waypoint's HTTP server and client speak HTTP over these.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tunnel::h2_io as h2_to_io;
use super::Tunnel;

/// One tunnel, readable and writable. Received frames are handed out without
/// copying beyond the caller's buffer. Writes are copied once (`AsyncWrite`
/// lends its buffer only for the call) into a buffer that leaves as one DATA
/// frame at flush: an HTTP response written as head, body and chunk marks
/// becomes one frame, one TLS record and one syscall instead of several.
pub struct TunnelIo {
    send: SendStream<Bytes>,
    /// Taken only on drop, to read the stream to its end.
    recv: Option<RecvStream>,
    /// The unread rest of the last received frame.
    pending: Bytes,
    /// Flow-control credit for bytes already handed out, returned in bulk.
    unreleased: usize,
    shut: bool,
    reset: bool,
    /// Written, not yet flushed.
    out: BytesMut,
}

/// Most bytes held before a write pushes them out without waiting for flush.
const WRITE_BUFFER: usize = 64 * 1024;

/// Credit is returned once this much has been read (or the frame is used
/// up), so a stream of small reads does not send a WINDOW_UPDATE each.
const RELEASE_BATCH: usize = 16 * 1024;

impl TunnelIo {
    pub fn new(tunnel: Tunnel) -> Self {
        let (send, recv) = tunnel.into_parts();
        TunnelIo {
            send,
            recv: Some(recv),
            pending: Bytes::new(),
            unreleased: 0,
            shut: false,
            reset: false,
            out: BytesMut::new(),
        }
    }

    /// Sends what was written, as far as flow control allows now.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            self.send.reserve_capacity(self.out.len());
            match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                },
                granted => {
                    let chunk = self.out.split_to(granted.min(self.out.len())).freeze();
                    self.send.send_data(chunk, false).map_err(h2_to_io)?;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the tunnel abruptly (RST_STREAM CANCEL), telling the far side the
    /// exchange failed rather than ended.
    pub fn reset(&mut self) {
        self.shut = true;
        self.reset = true;
        self.send.send_reset(h2::Reason::CANCEL);
    }

    fn release(&mut self, force: bool) -> io::Result<()> {
        if self.unreleased > 0 && (force || self.unreleased >= RELEASE_BATCH) {
            let n = std::mem::take(&mut self.unreleased);
            if let Some(recv) = self.recv.as_mut() {
                recv.flow_control().release_capacity(n).map_err(h2_to_io)?;
            }
        }
        Ok(())
    }
}

/// How long a closed tunnel waits for the peer's end of stream.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for TunnelIo {
    fn drop(&mut self) {
        // Whatever the protocol inside wrote last (an HTTP/2 GOAWAY, say) is
        // still queued: END_STREAM lets it reach the peer, where a reset
        // would discard it. `reset` is the way to signal failure.
        if self.reset {
            return;
        }
        if !self.shut {
            // Unflushed bytes go too: h2 queues data beyond the window.
            let rest = std::mem::take(&mut self.out).freeze();
            let _ = self.send.send_data(rest, true);
        }
        // Dropping the receive half before the peer's END_STREAM makes h2
        // reset the stream ("no longer needed"), which the peer counts as a
        // failed connection. Read to the end (bounded) instead.
        let Some(mut recv) = self.recv.take().filter(|r| !r.is_end_stream()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                while let Some(Ok(frame)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(frame.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            let Some(recv) = this.recv.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(frame)) => {
                    // Empty frames (END_STREAM often rides on one) carry nothing.
                    this.unreleased += frame.len();
                    this.pending = frame;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    this.release(true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        this.release(this.pending.is_empty())?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.out.len() >= WRITE_BUFFER {
            ready!(this.poll_send_out(cx))?;
        }
        let n = buf.len().min(WRITE_BUFFER - this.out.len());
        this.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.out.len() >= WRITE_BUFFER {
            ready!(this.poll_send_out(cx))?;
        }
        // Gathered here so callers (hyper) need not flatten into a buffer of
        // their own first: one copy instead of two.
        let mut n = 0;
        for b in bufs {
            let room = WRITE_BUFFER - this.out.len();
            if room == 0 {
                break;
            }
            let take = b.len().min(room);
            this.out.extend_from_slice(&b[..take]);
            n += take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Handing frames to h2 is the flush: its connection task writes them.
        self.get_mut().poll_send_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_out(cx))?;
        if !this.shut {
            this.shut = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A client-side TunnelIo and the server's view of the same stream, over
    /// an in-memory HTTP/2 connection.
    async fn pair() -> (TunnelIo, h2::server::SendResponse<Bytes>, RecvStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            let (req, respond) = conn.accept().await.expect("a stream").expect("no error");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (respond, req.into_body())
        });
        let (client, conn) = h2::client::handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (resp, send) = client.send_request(req, false).expect("send");
        let (mut respond, recv) = server.await.expect("server task");
        let server_send = respond
            .send_response(http::Response::new(()), false)
            .expect("respond");
        let resp = resp.await.expect("response");
        let tunnel = Tunnel::new(send, resp.into_body());
        // Keep the server's send side alive through the respond handle.
        drop(server_send);
        (TunnelIo::new(tunnel), respond, recv)
    }

    #[tokio::test]
    async fn writes_leave_as_one_frame_at_flush() {
        let (mut io, _respond, mut server_recv) = pair().await;
        io.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        io.write_all(b"content-length: 2\r\n\r\n").await.unwrap();
        io.write_all(b"ok").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), server_recv.data()).await;
        assert!(early.is_err(), "nothing leaves before flush");
        io.flush().await.unwrap();
        let frame = server_recv.data().await.expect("a frame").expect("data");
        assert_eq!(
            &frame[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        );
        io.shutdown().await.unwrap();
        // END_STREAM rides on an empty DATA frame.
        while let Some(frame) = server_recv.data().await {
            assert!(
                frame.expect("no reset").is_empty(),
                "nothing more after shutdown"
            );
        }
    }

    #[tokio::test]
    async fn a_dropped_tunnel_ends_its_stream_cleanly_with_unflushed_bytes() {
        let (mut io, _respond, mut server_recv) = pair().await;
        io.write_all(b"last words").await.unwrap();
        drop(io);
        let mut got = Vec::new();
        while let Some(frame) = server_recv.data().await {
            got.extend_from_slice(&frame.expect("no reset"));
        }
        assert_eq!(got, b"last words");
    }
}
