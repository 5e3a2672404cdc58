use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;

/// Read buffer per direction once the peer sends in bulk. Chunks are split
/// off and frozen, then handed to h2 without copying; once h2 has written them
/// the allocation is reclaimed by `reserve`, so the steady state does not
/// allocate per chunk. Kept under glibc's mmap threshold (128 KiB) so a fresh
/// buffer, when one is needed, comes from the heap rather than an mmap + page
/// faults + munmap.
const READ_BUFFER: usize = 64 * 1024;
/// The first buffer. Most connections carry a request and a response that fit
/// in it; a 64 KiB block per connection and direction cost the allocator more
/// than anything else on a short connection. A read that fills the buffer
/// switches to [`READ_BUFFER`].
const FIRST_READ_BUFFER: usize = 8 * 1024;

/// One CONNECT stream: the byte pipe between two HBONE endpoints.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
}

/// Bytes moved by a copy and how it ended.
#[derive(Debug, Default)]
pub struct CopyOutcome {
    /// Bytes read from the TCP socket and sent into the tunnel.
    pub tcp_to_tunnel: u64,
    /// Bytes received from the tunnel and written to the TCP socket.
    pub tunnel_to_tcp: u64,
    pub error: Option<io::Error>,
}

impl Tunnel {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Tunnel { send, recv }
    }

    /// Splits into the two directions, for callers that drive them separately.
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream) {
        (self.send, self.recv)
    }

    /// Sends `data` ahead of the copy: bytes the client sent before the
    /// tunnel was up (say, after a SOCKS5 request). h2 holds them until the
    /// stream's window allows.
    pub fn send_early(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.send
            .send_data(Bytes::copy_from_slice(data), false)
            .map_err(h2_io)
    }
}

/// Copies both ways between `tcp` and `tunnel` until both directions finish.
///
/// A FIN from the TCP side ends the tunnel's send direction (END_STREAM); the end
/// of the tunnel's receive direction shuts down the TCP write side: each half
/// closes independently. An error on either side resets the other (RST_STREAM,
/// TCP RST) so neither peer waits on a dead connection.
///
/// If `stop` resolves first (say, policy no longer allows the connection), both
/// sides are reset and the outcome carries the reason as its error.
pub async fn copy_tcp_tunnel(
    mut tcp: TcpStream,
    tunnel: Tunnel,
    stop: impl std::future::Future<Output = String>,
) -> CopyOutcome {
    let Tunnel { mut send, mut recv } = tunnel;
    let mut outcome = CopyOutcome::default();
    let (mut r, mut w) = tcp.split();
    let copy = async {
        tokio::try_join!(
            tcp_to_h2(&mut r, &mut send, &mut outcome.tcp_to_tunnel),
            h2_to_tcp(&mut recv, &mut w, &mut outcome.tunnel_to_tcp),
        )
    };
    let result = tokio::select! {
        r = copy => r.map(|_| ()),
        why = stop => Err(io::Error::new(io::ErrorKind::ConnectionAborted, why)),
    };
    if let Err(e) = result {
        send.send_reset(h2::Reason::CANCEL);
        // Zero linger turns the close into a RST, telling the TCP peer the far side failed.
        let _ = tcp.set_zero_linger();
        outcome.error = Some(e);
    }
    outcome
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
    counter: &mut u64,
) -> io::Result<()> {
    let mut size = FIRST_READ_BUFFER;
    let mut buf = BytesMut::with_capacity(size);
    loop {
        if buf.capacity() < size / 4 {
            buf.reserve(size);
        }
        let room = buf.capacity();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        if n == room {
            size = READ_BUFFER;
        }
        *counter += n as u64;
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match send.capacity() {
                0 => match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed")),
                },
                n => n,
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

/// Most frames gathered into one vectored write.
const MAX_GATHER: usize = 32;

async fn h2_to_tcp(
    recv: &mut RecvStream,
    w: &mut WriteHalf<'_>,
    counter: &mut u64,
) -> io::Result<()> {
    // Allocated once per tunnel; holds the frames of one write.
    let mut frames: Vec<Bytes> = Vec::with_capacity(MAX_GATHER);
    loop {
        match recv.data().await {
            Some(first) => frames.push(first.map_err(h2_io)?),
            None => return w.shutdown().await,
        }
        // Take every frame already received without waiting, so a burst costs
        // one syscall instead of one per 16 KiB frame.
        let mut ended = false;
        while frames.len() < MAX_GATHER {
            match poll_fn(|cx| Poll::Ready(recv.poll_data(cx))).await {
                Poll::Ready(Some(frame)) => frames.push(frame.map_err(h2_io)?),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        // An empty DATA frame (END_STREAM often rides on one) has nothing to write,
        // and a vectored write of only empty slices would report zero bytes.
        frames.retain(|f| !f.is_empty());
        let n: usize = frames.iter().map(Bytes::len).sum();
        if ended && n > 0 {
            // The last data and the FIN in one segment: corked, the data waits
            // in the send queue, and the shutdown below adds the FIN to it and
            // pushes it. The peer wakes once instead of twice (a short
            // request/response connection ends exactly like this).
            let _ = socket2::SockRef::from(w.as_ref()).set_tcp_cork(true);
        }
        write_all_vectored(w, &mut frames).await?;
        *counter += n as u64;
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
        if ended {
            return w.shutdown().await;
        }
    }
}

/// Writes every frame, in order, with as few syscalls as the socket allows;
/// leaves `frames` empty.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        let mut slices = [IoSlice::new(&[]); MAX_GATHER];
        let count = (frames.len() - first).min(MAX_GATHER);
        for (slot, frame) in slices.iter_mut().zip(&frames[first..first + count]) {
            *slot = IoSlice::new(frame);
        }
        let mut written = w.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let head = &mut frames[first];
            if written >= head.len() {
                written -= head.len();
                first += 1;
            } else {
                head.advance(written);
                written = 0;
            }
        }
    }
    frames.clear();
    Ok(())
}

pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}
