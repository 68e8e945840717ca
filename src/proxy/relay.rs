//! The upstream's response body on its way to the caller: passed on frame by frame as it
//! arrives (never buffered whole, so SSE events flush one by one and a 1 GiB answer passes in
//! flat memory), cut when the upstream stalls longer than the idle timeout or the exchange's
//! deadline passes, redacted of the key when asked. Dropping it (the caller went away) drops
//! the upstream body, which cancels the upstream request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::redact::Redactor;

/// How a relayed body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The upstream body ended and all of it was handed on.
    Complete,
    /// The upstream stalled past the idle timeout, or the deadline passed.
    TimedOut,
    /// The upstream connection failed mid-body.
    Failed,
    /// The caller went away first.
    CallerGone,
}

/// Called once, when the body ends one way or another.
pub type OnEnd = Box<dyn FnOnce(End) + Send>;

/// Why a relayed body was cut (the caller's connection is then closed mid-body).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the proxied exchange passed its deadline")]
    Deadline,
    #[error("the upstream body failed")]
    Upstream,
}

pub struct Relay {
    inner: reqwest::Body,
    /// Bytes read before the relay began (an error answer's first part), handed on first.
    prefix: Option<Bytes>,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    deadline: Pin<Box<Sleep>>,
    redactor: Option<Redactor>,
    on_end: Option<OnEnd>,
    /// The body ended (completely or not); nothing more is polled.
    done: bool,
}

impl Relay {
    pub fn new(
        inner: reqwest::Body,
        prefix: Bytes,
        idle: Duration,
        deadline: Instant,
        redactor: Option<Redactor>,
        on_end: Option<OnEnd>,
    ) -> Relay {
        Relay {
            inner,
            prefix: (!prefix.is_empty()).then_some(prefix),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle.min(deadline - Instant::now()))),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            redactor,
            on_end,
            done: false,
        }
    }

    fn end(&mut self, how: End) {
        self.done = true;
        if let Some(on_end) = self.on_end.take() {
            on_end(how);
        }
    }

    fn rearm_idle(&mut self) {
        let next = (Instant::now() + self.idle).min(self.deadline.deadline());
        self.idle_timer.as_mut().reset(next);
    }

    fn data(&mut self, bytes: Bytes) -> Bytes {
        match &mut self.redactor {
            Some(r) => r.push(&bytes),
            None => bytes,
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            let data = this.data(prefix);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.end(End::TimedOut);
            return Poll::Ready(Some(Err(RelayError::Deadline)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.rearm_idle();
                match frame.into_data() {
                    Ok(bytes) => {
                        let data = this.data(bytes);
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.end(End::Failed);
                Poll::Ready(Some(Err(RelayError::Upstream)))
            }
            Poll::Ready(None) => {
                this.end(End::Complete);
                match this.redactor.take().map(|mut r| r.finish()) {
                    Some(tail) if !tail.is_empty() => Poll::Ready(Some(Ok(Frame::data(tail)))),
                    _ => Poll::Ready(None),
                }
            }
            Poll::Pending => {
                if this.idle_timer.as_mut().poll(cx).is_ready() {
                    this.end(End::TimedOut);
                    return Poll::Ready(Some(Err(RelayError::Idle(this.idle))));
                }
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Exact only when nothing is rewritten or held back.
        if self.redactor.is_none() && self.prefix.is_none() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(End::CallerGone);
    }
}
