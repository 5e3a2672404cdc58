//! A CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), for
//! protocols that run inside a tunnel rather than being copied through it:
//! the waypoint's HTTP server and client speak HTTP over these.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tunnel::h2_io as h2_to_io;
use super::Tunnel;

/// One tunnel, readable and writable. Received frames are handed out without
/// copying beyond the caller's buffer; each write is copied once into a
/// frame, as `AsyncWrite` lends its buffer only for the call.
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
}

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
        }
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
            let _ = self.send.send_data(Bytes::new(), true);
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
        this.send.reserve_capacity(buf.len());
        loop {
            match this.send.capacity() {
                0 => match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                },
                granted => {
                    let n = granted.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends queued frames from its connection task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
