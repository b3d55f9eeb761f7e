//! The body type used across the proxy, and a wrapper that observes a body's end.
//!
//! Bodies are streamed frame by frame, never collected, so a 1 GB upload costs the same memory as
//! a 1 KB one. [`ObservedBody`] counts bytes and reports once when the stream ends (or is dropped
//! early), which is when access logs and byte counters can be written.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

use crate::BoxError;

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new().map_err(|never| match never {}))
}

pub fn full(data: impl Into<Bytes>) -> Body {
    boxed(Full::new(data.into()).map_err(|never| match never {}))
}

/// How a body stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// All frames delivered.
    Complete,
    /// The stream failed.
    Error,
    /// The body was dropped before its end (e.g. the client went away).
    Cancelled,
}

/// Called exactly once with the byte count and how the body ended.
pub trait OnBodyEnd: Send + 'static {
    fn on_end(self: Box<Self>, bytes: u64, end: BodyEnd);
}

impl<F: FnOnce(u64, BodyEnd) + Send + 'static> OnBodyEnd for F {
    fn on_end(self: Box<Self>, bytes: u64, end: BodyEnd) {
        (*self)(bytes, end)
    }
}

pin_project_lite::pin_project! {
    /// Counts data bytes and calls its [`OnBodyEnd`] once, at end of stream, error or drop.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        bytes: u64,
        on_end: Option<Box<dyn OnBodyEnd>>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(cb) = this.on_end.take() {
                cb.on_end(*this.bytes, BodyEnd::Cancelled);
            }
        }
    }
}

impl<B> ObservedBody<B> {
    pub fn new(inner: B, on_end: impl OnBodyEnd) -> Self {
        Self {
            inner,
            bytes: 0,
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(cb) = this.on_end.take() {
                    cb.on_end(*this.bytes, BodyEnd::Error);
                }
            }
            Poll::Ready(None) => {
                if let Some(cb) = this.on_end.take() {
                    cb.on_end(*this.bytes, BodyEnd::Complete);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn reports_bytes_once_at_end() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let body = ObservedBody::new(Full::new(Bytes::from_static(b"hello")), move |n, end| {
            s.lock().expect("lock").push((n, end))
        });
        let collected = body.collect().await.expect("collect").to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(*seen.lock().expect("lock"), vec![(5, BodyEnd::Complete)]);
    }

    #[test]
    fn reports_cancel_on_drop() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let body = ObservedBody::new(Full::new(Bytes::from_static(b"x")), move |n, end| {
            s.lock().expect("lock").push((n, end))
        });
        drop(body);
        assert_eq!(*seen.lock().expect("lock"), vec![(0, BodyEnd::Cancelled)]);
    }
}
