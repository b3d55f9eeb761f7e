//! I/O helpers: replaying bytes that detection already read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// A stream that yields `prefix` first, then reads from `inner`. Writes go straight through.
    #[derive(Debug)]
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: impl Into<Bytes>, inner: T) -> Self {
        Self {
            prefix: prefix.into(),
            inner,
        }
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_prefix_then_inner() {
        let inner: &[u8] = b" world";
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        io.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}

pin_project_lite::pin_project! {
    #[project = IdleTimeoutProj]
    /// Fails reads and writes with `TimedOut` once the stream saw no activity for `idle`.
    ///
    /// The timer is re-armed lazily: activity only records a timestamp, and when the timer
    /// fires early because of activity it is pushed to `last activity + idle`. So the per-read
    /// cost is one `Instant::now()`, not a timer-wheel update.
    pub struct IdleTimeout<T> {
        #[pin]
        inner: T,
        // Boxed so the wrapper stays `Unpin`, as hyper requires of its I/O.
        timer: Pin<Box<tokio::time::Sleep>>,
        idle: std::time::Duration,
        last_activity: tokio::time::Instant,
    }
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, idle: std::time::Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            idle,
            last_activity: now,
        }
    }
}

fn check_idle(
    mut timer: Pin<&mut tokio::time::Sleep>,
    last_activity: tokio::time::Instant,
    idle: std::time::Duration,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let deadline = last_activity + idle;
        if deadline <= tokio::time::Instant::now() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
        }
        timer.as_mut().reset(deadline);
    }
}

use std::future::Future as _;

impl<T> IdleTimeoutProj<'_, T> {
    /// Records activity when `poll` completed; checks the idle deadline when it is pending.
    fn observe<R>(
        &mut self,
        poll: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(r) => {
                *self.last_activity = tokio::time::Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => {
                check_idle(self.timer.as_mut(), *self.last_activity, *self.idle, cx)?;
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_read(cx, buf);
        this.observe(poll, cx)
    }
}

impl<T: AsyncWrite> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_write(cx, buf);
        this.observe(poll, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_write_vectored(cx, bufs);
        this.observe(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_streams_time_out_and_active_ones_do_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = IdleTimeout::new(a, Duration::from_secs(10));
        // Activity every 6 s keeps it alive past 10 s.
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                b.write_all(b"x").await.expect("write");
            }
            b
        });
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            io.read_exact(&mut byte)
                .await
                .expect("active stream stays open");
        }
        let _b = writer.await.expect("writer");
        let err = io
            .read_exact(&mut byte)
            .await
            .expect_err("idle stream times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
