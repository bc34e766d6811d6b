//! The frames an HBONE connection writes in one turn leave in one TLS write.
//!
//! `h2` copies a small frame into its write buffer, but holds a DATA frame of more than
//! 256 bytes aside, writes it out on its own and flushes before it takes the next; and
//! tokio-rustls turns every write into a TLS record and a `writev`. A connection whose
//! streams had eight 1 KiB responses ready wrote eight records with eight system calls
//! and woke its peer up to eight times (measured on the destination agent: 1.00 `writev`
//! per keep-alive request, against 0.32 on the source agent, whose requests are small).
//!
//! [`Batched`] sits between `h2` and TLS. It takes `h2`'s writes into one buffer and,
//! when `h2` flushes, leaves the bytes there until the connection's task runs again: it
//! wakes the task and answers that the flush is done. The task is queued behind the
//! other tasks already ready (the stream pumps that read their sockets in the same turn,
//! ADR 017), so their frames join the buffer, and the next turn writes everything at
//! once. [`Turns::count`] counts the task's turns; a flush is held only within the turn
//! that first saw the bytes, and never outside a counted turn (a handshake awaited
//! inline). Large writes (bulk transfers' frames) go to TLS as they are, without the
//! copy, after what is buffered; the buffer never holds more than [`BATCH_MAX`], and
//! shutdown writes it out first.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before they are written even within a turn.
pub const BATCH_MAX: usize = 64 * 1024;
/// A write at least this large goes to TLS directly (a full TLS record's worth).
const DIRECT: usize = 16 * 1024;

/// How many times the task that drives a connection has been polled; shared by the
/// connection's [`Batched`] I/O and the [`Turns::count`] future around the task's work.
#[derive(Clone, Debug, Default)]
pub struct Turns(Arc<AtomicU64>);

impl Turns {
    /// Runs `work`, counting each of its polls as a turn.
    pub async fn count<F: Future>(self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        // Odd while a turn runs, even between turns.
        std::future::poll_fn(|cx| {
            self.0.fetch_add(1, Ordering::Relaxed);
            let done = work.as_mut().poll(cx);
            self.0.fetch_add(1, Ordering::Relaxed);
            done
        })
        .await
    }

    /// The turn running now, if one is: outside a counted poll nothing is held.
    fn now(&self) -> Option<u64> {
        // One task polls and reads it; tokio orders a task's polls across threads.
        let n = self.0.load(Ordering::Relaxed);
        (n % 2 == 1).then_some(n)
    }
}

/// The I/O under an HTTP/2 connection, with its writes gathered per turn (module docs).
pub struct Batched<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream has taken.
    written: usize,
    turns: Turns,
    /// The turn in which a flush was first held, while bytes wait for the next turn.
    held_in: Option<u64>,
}

impl<T> Batched<T> {
    /// `inner` with batched writes, and the turns its driving task must count.
    pub fn new(inner: T) -> (Self, Turns) {
        let turns = Turns::default();
        let io = Batched {
            inner,
            buf: Vec::new(),
            written: 0,
            turns: turns.clone(),
            held_in: None,
        };
        (io, turns)
    }
}

impl<T: AsyncWrite + Unpin> Batched<T> {
    /// Writes out what is buffered; the buffer's memory goes with it (an idle connection
    /// holds none).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        self.held_in = None;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: writes out the buffer when they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buf.len() + len > BATCH_MAX {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Batched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.len() >= DIRECT {
            ready!(this.poll_drain(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        ready!(this.poll_room(cx, data.len()))?;
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = data.iter().map(|b| b.len()).sum::<usize>();
        if len >= DIRECT {
            ready!(this.poll_drain(cx))?;
            return Pin::new(&mut this.inner).poll_write_vectored(cx, data);
        }
        ready!(this.poll_room(cx, len))?;
        for b in data {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        // A frame's header and its payload come in one call.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written < this.buf.len() {
            match (this.held_in, this.turns.now()) {
                (None, Some(now)) => {
                    this.held_in = Some(now);
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
                (Some(turn), Some(now)) if turn == now => return Poll::Ready(Ok(())),
                _ => ready!(this.poll_drain(cx))?,
            }
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Batched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Duration};

    use bytes::Bytes;
    use tokio::io::DuplexStream;

    use super::*;

    /// A stream that counts the writes it took.
    struct Counting {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    /// Eight streams' frames made ready together go out in one write of the connection's
    /// I/O (without the batching: eight, one per frame), and all arrive.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_ready_together_leave_in_one_write() {
        const STREAMS: usize = 8;
        const FRAME: usize = 1100;
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let writes = Arc::new(AtomicUsize::new(0));
        let (io, turns) = Batched::new(Counting {
            inner: a,
            writes: writes.clone(),
        });
        // The server echoes each stream's bytes into one count.
        let received = Arc::new(AtomicUsize::new(0));
        let got = received.clone();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                let got = got.clone();
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        got.fetch_add(data.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        let (mut sender, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(turns.count(conn));
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            let request = http::Request::post("http://x/").body(()).unwrap();
            let (response, send) = sender.send_request(request, false).unwrap();
            response.await.unwrap();
            streams.push(send);
            sender = sender.ready().await.unwrap();
        }
        // Everything so far has been written; now the frames, all in this one turn.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = writes.load(Ordering::Relaxed);
        for send in &mut streams {
            send.send_data(Bytes::from(vec![7u8; FRAME]), false)
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while received.load(Ordering::Relaxed) < STREAMS * FRAME {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every frame arrives (a held flush was never written)");
        assert_eq!(writes.load(Ordering::Relaxed) - before, 1);
    }

    /// A large write goes through as it is, after what was buffered, in order.
    #[tokio::test]
    async fn large_writes_pass_after_the_buffered_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1024 * 1024);
        let (mut io, turns) = Batched::new(a);
        let small = vec![1u8; 100];
        let large = vec![2u8; DIRECT * 2];
        turns
            .count(async {
                io.write_all(&small).await.unwrap();
                io.write_all(&large).await.unwrap();
                io.shutdown().await.unwrap();
            })
            .await;
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), small.len() + large.len());
        assert_eq!(&got[..100], &small[..]);
        assert!(got[100..].iter().all(|&x| x == 2));
    }
}
