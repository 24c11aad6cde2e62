//! The byte streams a connection can run over (TCP, TLS, WebSocket).
//!
//! Plain TCP waits for readability *before* it needs a read buffer, so an
//! idle connection holds no buffer at all: that is what keeps memory per
//! idle connection near the size of the session itself.

use bytes::BytesMut;
use std::future::Future;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// Bytes read per system call once a connection is established.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// [`Transport::poll_idle`] works: idle connections over it park.
    const PARKS: bool = false;

    /// Read at least one byte into `buf` (0 means end of stream), making
    /// room for at least `chunk` bytes first.
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// Register `cx` for the stream's next read readiness without reading,
    /// so an idle connection can wait with no task (`park.rs`). `None`: this
    /// transport cannot (TLS and WebSocket keep bytes of their own that a
    /// readiness poll would not see), so its connections keep their task.
    fn poll_idle(&self, _cx: &mut std::task::Context<'_>) -> Option<std::task::Poll<()>> {
        None
    }
}

impl Transport for tokio::net::TcpStream {
    const PARKS: bool = true;

    fn poll_idle(&self, cx: &mut std::task::Context<'_>) -> Option<std::task::Poll<()>> {
        // A peek, not `poll_read_ready`: readiness stays cached after a
        // read that did not drain the socket, and only an attempt that
        // finds it empty clears it and registers the waker. Data, the end
        // of the stream and errors all count as ready: the read that
        // follows handles them.
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        Some(self.poll_peek(cx, &mut buf).map(|_| ()))
    }

    async fn read_some(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        loop {
            // poll_read_ready keeps its waker in the socket's registration,
            // so waiting stores no future state in the connection's task.
            std::future::poll_fn(|cx| self.poll_read_ready(cx)).await?;
            buf.reserve(chunk);
            match self.try_read_buf(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness was stale: give the buffer back before
                    // waiting, or every idle connection would hold one.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

macro_rules! buffered_transport {
    ($($t:ty),*) => {$(
        impl Transport for $t {
            async fn read_some(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
                buf.reserve(chunk);
                self.read_buf(buf).await
            }
        }
    )*};
}

buffered_transport!(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    tokio::io::DuplexStream
);
