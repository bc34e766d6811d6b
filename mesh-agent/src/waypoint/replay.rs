//! A request body that can be sent more than once, for retries: what the first attempt reads
//! from the client is kept (up to a cap) while it streams upstream, and a later attempt
//! replays it before reading on from the client. A body larger than the cap streams as
//! usual but can no longer be replayed; the request is then not retried (Envoy's rule,
//! with its buffer limit).
//!
//! Only the newest attempt's body may read: starting an attempt ends the bodies of the
//! earlier ones, so a connection that still polls an abandoned attempt's body cannot take
//! bytes that belong to the next one.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// The default cap: Envoy's per-request buffer limit for retries as Istio configures it.
pub const MAX_REPLAY: usize = 64 * 1024;

type Inner = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

struct Shared {
    inner: Inner,
    /// The frames read so far, while they fit under the cap.
    kept: Vec<Bytes>,
    kept_bytes: usize,
    cap: usize,
    /// More was read than the cap: no replay.
    overflowed: bool,
    /// The client's body ended (with these trailers, if any).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// The attempt whose body may read.
    generation: u64,
    /// Told when the body ended or overflowed (for [`Replay::complete`]).
    settled: Arc<tokio::sync::Notify>,
}

/// The handle that makes attempts' bodies.
#[derive(Clone)]
pub struct Replay(Arc<Mutex<Shared>>);

impl Replay {
    /// Keeps up to `cap` bytes of `body` for replays.
    pub fn new(body: Inner, cap: usize) -> Self {
        Self(Arc::new(Mutex::new(Shared {
            inner: body,
            kept: Vec::new(),
            kept_bytes: 0,
            cap,
            overflowed: false,
            ended: false,
            trailers: None,
            generation: 0,
            settled: Arc::default(),
        })))
    }

    /// The whole body and its trailers once the client has sent them, for a mirror: `None`
    /// when it does not fit the cap, or has not ended within `wait`.
    pub async fn complete(&self, wait: Duration) -> Option<(Bytes, Option<HeaderMap>)> {
        let settled = self.0.lock().expect("replay lock").settled.clone();
        let check = || {
            let shared = self.0.lock().expect("replay lock");
            if shared.overflowed {
                return Some(None);
            }
            if shared.ended || (shared.kept.is_empty() && shared.inner.is_end_stream()) {
                let mut body = bytes::BytesMut::with_capacity(shared.kept_bytes);
                for chunk in &shared.kept {
                    body.extend_from_slice(chunk);
                }
                return Some(Some((body.freeze(), shared.trailers.clone())));
            }
            None
        };
        tokio::time::timeout(wait, async {
            loop {
                let notified = settled.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(done) = check() {
                    return done;
                }
                notified.await;
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// The body of the next attempt; the earlier attempts' bodies end.
    pub fn attempt(&self) -> ReplayBody {
        let mut shared = self.0.lock().expect("replay lock");
        shared.generation += 1;
        ReplayBody {
            shared: self.0.clone(),
            generation: shared.generation,
            position: 0,
            trailers_sent: false,
        }
    }

    /// Whether another attempt can send the whole body.
    pub fn can_replay(&self) -> bool {
        !self.0.lock().expect("replay lock").overflowed
    }
}

/// One attempt's body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// Kept frames already sent by this attempt.
    position: usize,
    trailers_sent: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().expect("replay lock");
        if shared.generation != this.generation {
            // A newer attempt owns the client's body now.
            return Poll::Ready(None);
        }
        if this.position < shared.kept.len() {
            let frame = shared.kept[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(t) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut shared.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                shared.settled.notify_waiters();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !shared.overflowed {
                        if shared.kept_bytes + data.len() <= shared.cap {
                            shared.kept_bytes += data.len();
                            shared.kept.push(data.clone());
                            this.position = shared.kept.len();
                        } else {
                            // Nothing is kept any more: no attempt can replay.
                            shared.overflowed = true;
                            shared.kept = Vec::new();
                            shared.kept_bytes = 0;
                            this.position = 0;
                            shared.settled.notify_waiters();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    shared.trailers = Some(t.clone());
                    shared.ended = true;
                    this.trailers_sent = true;
                    shared.settled.notify_waiters();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    /// Known at once for a request without a body, so that hyper sends it without one
    /// (no empty DATA frame, no chunked encoding for a GET).
    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().expect("replay lock");
        if shared.generation != self.generation {
            return true;
        }
        if self.position < shared.kept.len() {
            return false;
        }
        if shared.ended {
            return self.trailers_sent || shared.trailers.is_none();
        }
        shared.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().expect("replay lock");
        if shared.ended && !shared.overflowed {
            let left: usize = shared.kept[self.position.min(shared.kept.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            return SizeHint::with_exact(left as u64);
        }
        let mut hint = shared.inner.size_hint();
        if !shared.overflowed {
            let kept: usize = shared.kept[self.position.min(shared.kept.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            hint.set_lower(hint.lower() + kept as u64);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + kept as u64);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(chunks: &[&'static [u8]]) -> Inner {
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn read(b: ReplayBody) -> Vec<u8> {
        b.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_small_body_is_replayed_whole_by_every_attempt() {
        let replay = Replay::new(body(&[b"hello ", b"world"]), MAX_REPLAY);
        assert_eq!(read(replay.attempt()).await, b"hello world");
        assert!(replay.can_replay());
        assert_eq!(read(replay.attempt()).await, b"hello world");
        assert_eq!(read(replay.attempt()).await, b"hello world");
    }

    #[tokio::test]
    async fn a_retry_after_a_partial_read_replays_then_reads_on() {
        let replay = Replay::new(body(&[b"one ", b"two ", b"three"]), MAX_REPLAY);
        let mut first = replay.attempt();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().as_ref(), b"one ");
        // The first attempt failed after one frame; the second gets everything.
        let second = replay.attempt();
        assert_eq!(read(second).await, b"one two three");
        // The abandoned body has ended.
        assert!(first.frame().await.is_none());
    }

    #[test]
    fn an_empty_body_is_known_to_be_empty_before_it_is_read() {
        let empty: Inner = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        let replay = Replay::new(empty, MAX_REPLAY);
        let first = replay.attempt();
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        assert!(
            !Replay::new(body(&[b"x"]), MAX_REPLAY)
                .attempt()
                .is_end_stream()
        );
    }

    #[tokio::test]
    async fn a_mirror_gets_the_whole_body_once_the_client_sent_it() {
        let replay = Replay::new(body(&[b"to ", b"mirror"]), MAX_REPLAY);
        let mirror = tokio::spawn({
            let replay = replay.clone();
            async move { replay.complete(Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(read(replay.attempt()).await, b"to mirror");
        let (copy, trailers) = mirror.await.unwrap().expect("complete");
        assert_eq!((copy.as_ref(), trailers), (&b"to mirror"[..], None));
        // Past the cap: no copy.
        let big = Replay::new(body(&[b"0123456789", b"abcdefghij"]), 15);
        read(big.attempt()).await;
        assert!(big.complete(Duration::from_secs(1)).await.is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_but_cannot_be_replayed() {
        let replay = Replay::new(body(&[b"0123456789", b"abcdefghij", b"klm"]), 15);
        assert_eq!(read(replay.attempt()).await, b"0123456789abcdefghijklm");
        assert!(!replay.can_replay());
    }
}
