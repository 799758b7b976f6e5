//! A request body that must keep arriving: each frame within a timeout of being asked for.
//!
//! tower-http's `RequestBodyTimeout` does the same, but arms its timer before it looks at
//! the body, so every frame costs a timer-wheel insert and removal even when the body is
//! already in hyper's buffer, as a small JSON request's is. That showed in the reply-cache
//! hit path. This one asks the body first and arms the timer only when it has to wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// The error a stalled body ends with; the extractor that reads the body refuses it.
#[derive(Debug, thiserror::Error)]
#[error("no part of the request body arrived within {0:?}")]
pub struct BodyStalled(Duration);

pub struct BodyTimeout {
    body: Body,
    timeout: Duration,
    /// Armed while the body is pending; cleared by each frame.
    stalled_at: Option<Pin<Box<Sleep>>>,
}

impl BodyTimeout {
    pub fn new(body: Body, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            stalled_at: None,
        }
    }
}

impl http_body::Body for BodyTimeout {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.stalled_at = None;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let stalled_at = this
            .stalled_at
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled_at.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    /// A body fed by the test, a piece at a time.
    fn fed_body() -> (mpsc::Sender<Bytes>, BodyTimeout) {
        let (tx, rx) = mpsc::channel(4);
        let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
        (
            tx,
            BodyTimeout::new(Body::from_stream(stream), Duration::from_secs(1)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_is_read_whole_however_long_it_takes() {
        let (tx, body) = fed_body();
        let feeder = tokio::spawn(async move {
            for piece in ["{\"a\":", "1", "}"] {
                // Each piece within the timeout, all of them well past it.
                tokio::time::sleep(Duration::from_millis(900)).await;
                tx.send(Bytes::from(piece)).await.expect("reader alive");
            }
        });
        let bytes = body.collect().await.expect("read").to_bytes();
        assert_eq!(bytes, "{\"a\":1}");
        feeder.await.expect("feeder");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_fails_after_the_timeout() {
        let (tx, body) = fed_body();
        tx.send(Bytes::from("{")).await.expect("reader alive");
        let started = tokio::time::Instant::now();
        // Bounded, so that a timer never armed fails the test instead of hanging it.
        let err = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("the body ends by the timeout")
            .expect_err("a stalled body fails");
        assert!(err.downcast_ref::<BodyStalled>().is_some(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_already_here_arms_no_timer() {
        let mut body = BodyTimeout::new(Body::from("{}"), Duration::from_secs(1));
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from("{}")));
        assert!(body.stalled_at.is_none());
        assert!(body.frame().await.is_none());
        assert!(body.stalled_at.is_none());
    }
}
