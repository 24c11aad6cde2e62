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
    /// Read at least one byte into `buf` (0 means end of stream), making
    /// room for at least `chunk` bytes first.
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl Transport for tokio::net::TcpStream {
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
