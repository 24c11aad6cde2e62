//! The byte streams a connection can run over (TCP, TLS, WebSocket).
//!
//! Plain TCP waits for readability *before* it needs a read buffer, so an
//! idle connection holds no buffer at all: that is what keeps memory per
//! idle connection near the size of the session itself.

use bytes::BytesMut;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read per system call once a connection is established.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// [`Transport::park_io`] works: idle connections over it park.
    const PARKS: bool = false;

    /// Read at least one byte into `buf` (0 means end of stream), making
    /// room for at least `chunk` bytes first.
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// Have `waker` woken at the stream's next read readiness without
    /// reading, so an idle connection can wait with no task (`park.rs`).
    /// `None`: this transport cannot (TLS and WebSocket keep bytes of their
    /// own that a readiness poll would not see), so its connections keep
    /// their task. After `Pending`, [`Transport::unpark_io`] must be called
    /// before the stream is used again.
    fn park_io(&mut self, _waker: &Waker) -> Option<Poll<()>> {
        None
    }

    /// Undo [`Transport::park_io`]; a no-op if the stream is not parked.
    fn unpark_io(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for TcpStream {
    const PARKS: bool = true;

    fn park_io(&mut self, waker: &Waker) -> Option<Poll<()>> {
        // A peek, not `poll_read_ready`: readiness stays cached after a
        // read that did not drain the socket, and only an attempt that
        // finds it empty clears it and registers the waker. Data, the end
        // of the stream and errors all count as ready: the read that
        // follows handles them.
        let mut cx = Context::from_waker(waker);
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        Some(self.poll_peek(&mut cx, &mut buf).map(|_| ()))
    }

    async fn read_some(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        loop {
            // poll_read_ready keeps its waker in the socket's registration,
            // so waiting stores no future state in the connection's task.
            std::future::poll_fn(|cx| self.poll_read_ready(cx)).await?;
            buf.reserve(chunk);
            // A read that did not fill the space it had drained the
            // socket: its readiness is cleared now (as tokio's own
            // `poll_read` does), so the next read waits for new data
            // instead of first failing with `WouldBlock`. A busy publisher
            // made one such wasted `recvfrom` per read before.
            let space = buf.capacity() - buf.len();
            let mut short = None;
            let read = self.try_io(tokio::io::Interest::READABLE, || {
                let n = self.try_read_buf(buf)?;
                if n > 0 && n < space {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match read {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(n) = short {
                        return Ok(n);
                    }
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

/// A plain-TCP connection's stream: tokio's while the connection is active,
/// the parking reactor's while it is parked (`park.rs`). Tokio's
/// registration of a socket costs 256 bytes for as long as it lasts; the
/// parking reactor's, a slot of 16.
pub struct Tcp(TcpState);

enum TcpState {
    Live(TcpStream),
    /// Parked, or — holding no socket ([`crate::park::ParkedSocket::gone`])
    /// — during a hand-over or after one failed: every operation then
    /// fails and the connection ends.
    Parked(crate::park::ParkedSocket),
}

impl From<TcpStream> for Tcp {
    fn from(stream: TcpStream) -> Tcp {
        Tcp(TcpState::Live(stream))
    }
}

fn not_live() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is parked or lost")
}

impl Tcp {
    fn live(self: Pin<&mut Self>) -> Option<Pin<&mut TcpStream>> {
        match &mut self.get_mut().0 {
            TcpState::Live(s) => Some(Pin::new(s)),
            _ => None,
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.live() {
            Some(s) => s.poll_read(cx, buf),
            None => Poll::Ready(Err(not_live())),
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.live() {
            Some(s) => s.poll_write(cx, buf),
            None => Poll::Ready(Err(not_live())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.live() {
            Some(s) => s.poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(not_live())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.live() {
            Some(s) => s.poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.live() {
            Some(s) => s.poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Transport for Tcp {
    const PARKS: bool = true;

    async fn read_some(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        match &mut self.0 {
            TcpState::Live(s) => s.read_some(buf, chunk).await,
            _ => Err(not_live()),
        }
    }

    fn park_io(&mut self, waker: &Waker) -> Option<Poll<()>> {
        let Some(reactor) = crate::park::reactor() else {
            // No reactor: wait in tokio's.
            return match &mut self.0 {
                TcpState::Live(s) => s.park_io(waker),
                _ => Some(Poll::Ready(())),
            };
        };
        let TcpState::Live(stream) = std::mem::replace(
            &mut self.0,
            TcpState::Parked(crate::park::ParkedSocket::gone()),
        ) else {
            return Some(Poll::Ready(()));
        };
        // Leaves tokio's reactor (its registration is freed).
        let socket = match stream.into_std() {
            Ok(s) => s,
            // The socket is gone: the read that follows ends the connection.
            Err(_) => return Some(Poll::Ready(())),
        };
        match reactor.park(socket, waker) {
            Ok(parked) => {
                self.0 = TcpState::Parked(parked);
                Some(Poll::Pending)
            }
            Err((socket, e)) => {
                tracing::debug!(error = %e, "cannot hand a socket to the parking reactor");
                match TcpStream::from_std(socket) {
                    Ok(s) => {
                        self.0 = TcpState::Live(s);
                        match &mut self.0 {
                            TcpState::Live(s) => s.park_io(waker),
                            _ => Some(Poll::Ready(())),
                        }
                    }
                    Err(_) => Some(Poll::Ready(())),
                }
            }
        }
    }

    fn unpark_io(&mut self) -> io::Result<()> {
        if !matches!(self.0, TcpState::Parked(_)) {
            return Ok(());
        }
        let TcpState::Parked(parked) = std::mem::replace(
            &mut self.0,
            TcpState::Parked(crate::park::ParkedSocket::gone()),
        ) else {
            return Ok(());
        };
        let socket = parked.unpark().ok_or_else(not_live)?;
        self.0 = TcpState::Live(TcpStream::from_std(socket)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn woken(count: &Count) -> bool {
        for _ in 0..500 {
            if count.0.load(Ordering::SeqCst) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    async fn pair() -> (TcpStream, Tcp) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, Tcp::from(server))
    }

    /// A parked socket is watched by the parking reactor, not tokio's: it
    /// wakes its waker when data arrives (and not before), cannot be used
    /// until it is taken back, and then reads what arrived.
    #[tokio::test]
    async fn parked_socket_wakes_on_data_and_comes_back() {
        let (mut client, mut tcp) = pair().await;
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        assert_eq!(tcp.park_io(&waker), Some(Poll::Pending));
        assert!(matches!(tcp.0, TcpState::Parked(_)), "left tokio's reactor");
        let mut buf = BytesMut::new();
        assert!(tcp.read_some(&mut buf, 64).await.is_err(), "parked: no I/O");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "no data, no wake-up");

        client.write_all(b"hello").await.expect("write");
        assert!(woken(&count).await, "data wakes the parked connection");
        tcp.unpark_io().expect("back to tokio");
        assert!(matches!(tcp.0, TcpState::Live(_)));
        let n = tcp.read_some(&mut buf, 64).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        // Unparking twice is harmless.
        tcp.unpark_io().expect("no-op");
    }

    /// Data that arrived before the parking wakes it at once, and so does
    /// the peer hanging up; the reply path works after either.
    #[tokio::test]
    async fn pending_data_and_hang_up_wake_at_once() {
        let (mut client, mut tcp) = pair().await;
        client.write_all(b"early").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = Arc::new(Count::default());
        assert_eq!(
            tcp.park_io(&Waker::from(count.clone())),
            Some(Poll::Pending)
        );
        assert!(woken(&count).await, "readable at parking time");
        tcp.unpark_io().expect("unpark");
        let mut buf = BytesMut::new();
        tcp.read_some(&mut buf, 64).await.expect("read");
        assert_eq!(&buf[..], b"early");
        tcp.write_all(b"reply").await.expect("write after unpark");
        let mut reply = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut reply)
            .await
            .expect("reply");
        assert_eq!(&reply, b"reply");

        let count = Arc::new(Count::default());
        assert_eq!(
            tcp.park_io(&Waker::from(count.clone())),
            Some(Poll::Pending)
        );
        drop(client);
        assert!(woken(&count).await, "a hang-up wakes too");
        tcp.unpark_io().expect("unpark");
        let mut buf = BytesMut::new();
        assert_eq!(tcp.read_some(&mut buf, 64).await.expect("eof"), 0);
    }

    /// Dropping a parked socket frees its slot: the reactor's table does
    /// not grow with connections that come and go.
    #[tokio::test]
    async fn dropped_parked_sockets_free_their_slots() {
        for _ in 0..3 {
            let (_client, mut tcp) = pair().await;
            let count = Arc::new(Count::default());
            assert_eq!(tcp.park_io(&Waker::from(count)), Some(Poll::Pending));
            drop(tcp);
        }
        let reactor = crate::park::reactor().expect("reactor");
        let (live, total) = reactor.occupancy();
        assert!(live <= total);
        // Other tests may park at the same time, but never this many.
        assert!(total < 64, "slots are reused ({total} allocated)");
    }
}
