//! Test servers standing in for applications.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Echoes every byte back, and half-closes after the client does.
pub async fn echo(addr: SocketAddr) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    }))
}

/// Reads until EOF, then writes `reply` and closes: exercises half-close both ways.
pub async fn read_then_reply(
    addr: SocketAddr,
    reply: &'static [u8],
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s.write_all(format!("{}:", got.len()).as_bytes()).await;
                    let _ = s.write_all(reply).await;
                }
                let _ = s.shutdown().await;
            });
        }
    }))
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for GiB transfers.
pub struct PatternGen(u64);

impl PatternGen {
    pub fn new(seed: u64) -> Self {
        PatternGen(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// FNV-1a over 8-byte words: a fast checksum for comparing transfers.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Checksum {
    h: u64,
    len: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.h == 0 {
            self.h = 0xcbf29ce484222325;
        }
        while !data.is_empty() {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len == 8 {
                self.h = (self.h ^ u64::from_le_bytes(self.tail)).wrapping_mul(0x100000001b3);
                self.tail_len = 0;
            }
        }
    }

    pub fn finish(&self) -> (u64, u64) {
        let mut h = self.h;
        for b in &self.tail[..self.tail_len] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        (h, self.len)
    }
}
