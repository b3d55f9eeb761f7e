//! A request body that can be sent again: the first try streams the original body while a copy
//! of what passed is kept (up to a limit); a retry replays that copy and then continues with
//! whatever the first try had not read yet. Bodies larger than the limit are streamed without
//! a copy and are never retried. Nothing waits for the whole body before the first try, so
//! streaming requests (gRPC client streams) are not delayed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::BoxError;
use crate::body::Body;

struct Shared {
    /// The original body, until it ends.
    source: Option<Body>,
    /// Every data frame read so far (cleared once `overflowed`).
    chunks: Vec<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    source_done: bool,
    /// More than `limit` bytes passed, or the source failed: no replay.
    overflowed: bool,
    limit: usize,
    /// The copy allowed to read; older tries are cut off.
    newest: u64,
}

/// One try's view of a replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    /// Chunks of `shared.chunks` this copy has sent.
    sent: usize,
    trailers_sent: bool,
}

/// Makes further copies of a [`ReplayBody`] for retries.
#[derive(Clone)]
pub struct ReplayHandle {
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplayBody {
    pub fn new(body: Body, limit: usize) -> (Self, ReplayHandle) {
        let done = body.is_end_stream();
        let shared = Arc::new(Mutex::new(Shared {
            source: (!done).then_some(body),
            chunks: Vec::new(),
            buffered: 0,
            trailers: None,
            source_done: done,
            overflowed: false,
            limit,
            newest: 0,
        }));
        (
            Self {
                shared: shared.clone(),
                generation: 0,
                sent: 0,
                trailers_sent: false,
            },
            ReplayHandle { shared },
        )
    }
}

impl ReplayHandle {
    /// A fresh copy from the start, or `None` once the body is too large to replay. Older
    /// copies stop yielding data.
    pub fn replay(&self) -> Option<ReplayBody> {
        let mut s = lock(&self.shared);
        if s.overflowed {
            return None;
        }
        s.newest += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            generation: s.newest,
            sent: 0,
            trailers_sent: false,
        })
    }

    pub fn can_replay(&self) -> bool {
        !lock(&self.shared).overflowed
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = lock(&this.shared);
        if this.generation != s.newest {
            return Poll::Ready(Some(Err("request body taken over by a retry".into())));
        }
        if this.sent < s.chunks.len() {
            let chunk = s.chunks[this.sent].clone();
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.source_done {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.source_done = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.overflowed = true;
                s.source_done = true;
                s.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        s.buffered += data.len();
                        if s.buffered > s.limit {
                            s.overflowed = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(data.clone());
                        }
                    }
                    this.sent = s.chunks.len();
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.source_done && self.sent >= s.chunks.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        if s.source_done {
            let rest: usize = s.chunks.iter().skip(self.sent).map(Bytes::len).sum();
            return SizeHint::with_exact(rest as u64);
        }
        match &s.source {
            // Only a copy that has sent nothing yet can pass the original's hint on.
            Some(b) if self.sent == 0 && s.chunks.is_empty() => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A body that yields its chunks one frame at a time.
    struct Chunks(VecDeque<Bytes>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunked(parts: &[&'static str]) -> Body {
        body::boxed(Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        ))
    }

    async fn read(b: ReplayBody) -> Result<Bytes, BoxError> {
        b.collect().await.map(|c| c.to_bytes())
    }

    #[tokio::test]
    async fn replays_what_the_first_try_read_and_the_rest() {
        let (mut first, handle) = ReplayBody::new(chunked(&["ab", "cd", "ef"]), 100);
        // The first try reads one chunk and fails.
        let frame = first.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "ab");
        let second = handle.replay().expect("replayable");
        assert_eq!(read(second).await.expect("body"), "abcdef");
        // The superseded copy cannot interleave.
        assert!(first.frame().await.expect("frame").is_err());
        assert_eq!(
            read(handle.replay().expect("again")).await.expect("body"),
            "abcdef"
        );
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_not_replayed() {
        let (first, handle) = ReplayBody::new(chunked(&["0123456789", "0123456789"]), 15);
        assert_eq!(read(first).await.expect("body").len(), 20);
        assert!(!handle.can_replay());
        assert!(handle.replay().is_none());
    }

    #[tokio::test]
    async fn empty_bodies_end_at_once() {
        let (first, handle) = ReplayBody::new(body::empty(), 10);
        assert!(first.is_end_stream());
        let again = handle.replay().expect("replayable");
        assert!(again.is_end_stream());
        assert_eq!(read(again).await.expect("body").len(), 0);
    }
}
