//! A client connection that stops reading its response is cut off.
//!
//! The response body (the tee) is polled by the connection only when the connection can write:
//! a client that stops reading fills its socket buffers, the connection stops polling the body,
//! and nothing in the body runs again — not its timers, not its `end` record. The request would
//! hold its concurrency slot, and its record would wait, for as long as the client keeps the
//! socket open. So the socket itself keeps a deadline: a write that cannot make progress for
//! `client_write_timeout_ms` fails with `TimedOut`. The connection then ends with an error and
//! drops the response body, which drains AOAI's answer (within the drain bounds) and records it
//! as for any client that went away.
//!
//! The timer is armed only while a write is blocked, so a client that keeps up costs nothing
//! beyond one branch per write; the `Sleep` is allocated on a connection's first stall and
//! reused after that.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An `AsyncRead + AsyncWrite` whose writes fail once blocked for longer than `timeout`.
pub(crate) struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Allocated on the first blocked write; armed while a write stays blocked.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> WriteDeadline<T> {
    pub(crate) fn new(inner: T, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            timer: None,
            armed: false,
        }
    }

    /// Called with a write's outcome: progress disarms the timer; a blocked write arms it (if
    /// it is not armed yet) and fails once it fires.
    fn watch<R>(
        &mut self,
        outcome: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        if outcome.is_ready() {
            self.armed = false;
            return outcome;
        }
        let deadline = Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            ))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let outcome = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(outcome, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let outcome = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(outcome, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let outcome = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(outcome, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let outcome = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(outcome, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_write_blocked_past_the_timeout_fails_and_progress_resets_it() {
        // A pipe whose reader reads only when told: writes block once its buffer is full.
        let (writer, mut reader) = tokio::io::duplex(64);
        let timeout = Duration::from_millis(100);
        let mut guarded = WriteDeadline::new(writer, timeout);
        guarded.write_all(&[0u8; 64]).await.unwrap();
        // Reading frees the buffer: the next blocked write starts a fresh deadline.
        let mut sink = [0u8; 64];
        tokio::io::AsyncReadExt::read_exact(&mut reader, &mut sink)
            .await
            .unwrap();
        guarded.write_all(&[0u8; 64]).await.unwrap();
        let started = Instant::now();
        let err = guarded.write_all(&[0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Not before the deadline: a lower bound, which no slow machine can break.
        assert!(started.elapsed() >= timeout);
    }
}
