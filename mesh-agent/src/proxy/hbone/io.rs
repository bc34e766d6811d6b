//! An HBONE tunnel as a byte stream (`AsyncRead` + `AsyncWrite`), for what speaks a
//! protocol over the tunnel rather than pumping it to a socket: the waypoint's HTTP server
//! and client. A read hands out one DATA frame at a time and returns its flow-control
//! capacity as soon as it is consumed; a write sends what the stream's window allows; shutdown
//! ends the stream (`END_STREAM`).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Stream, io_error};

pub struct TunnelIo<G = ()> {
    stream: Stream,
    pending: Bytes,
    finished: bool,
    /// Held for as long as the tunnel (e.g. its slot in a pooled connection).
    _guard: G,
}

impl TunnelIo<()> {
    pub fn new(stream: Stream) -> Self {
        Self::with_guard(stream, ())
    }
}

impl<G> TunnelIo<G> {
    pub fn with_guard(stream: Stream, guard: G) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
            finished: false,
            _guard: guard,
        }
    }
}

impl<G: Unpin> AsyncRead for TunnelIo<G> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<G: Unpin> AsyncWrite for TunnelIo<G> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut this.stream.send;
        send.reserve_capacity(buf.len());
        let granted = match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        if granted == 0 {
            // The stream was reset or closed under us.
            return match ready!(send.poll_reset(cx)) {
                Ok(reason) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("tunnel reset: {reason:?}"),
                ))),
                Err(e) => Poll::Ready(Err(io_error(e))),
            };
        }
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.finished {
            this.finished = true;
            // Fails only when the stream is already gone: then it is shut down anyway.
            let _ = this.stream.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}
