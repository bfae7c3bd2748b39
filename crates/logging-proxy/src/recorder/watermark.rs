//! "Written up to sequence N", and the responses waiting for their number.
//!
//! Every response's last chunk waits for its `end` record to be journaled. With a watch
//! channel, each group the journal thread wrote woke *every* waiting response, to find most of
//! them still short of their number: at 64 concurrent requests that is ~64 wake-ups a group
//! instead of the few whose records were in it. Here waiters are kept by sequence number and
//! an advance wakes exactly those it passes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct Watermark {
    reached: AtomicU64,
    /// Wakers by the sequence number they wait for.
    waiters: Mutex<BTreeMap<u64, Vec<Waker>>>,
}

impl Watermark {
    pub(crate) fn get(&self) -> u64 {
        self.reached.load(Ordering::Acquire)
    }

    /// Moves the mark up to `to` (never down) and wakes the waiters it passed.
    pub(crate) fn advance(&self, to: u64) {
        if self.reached.fetch_max(to, Ordering::AcqRel) >= to {
            return;
        }
        let passed = {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            let rest = waiters.split_off(&to.saturating_add(1));
            std::mem::replace(&mut *waiters, rest)
        };
        for waker in passed.into_values().flatten() {
            waker.wake();
        }
    }

    /// Releases every waiter, whatever it waits for: the writer is gone.
    pub(crate) fn close(&self) {
        self.advance(u64::MAX);
    }

    fn poll_reached(&self, seq: u64, cx: &mut Context<'_>) -> Poll<()> {
        if self.get() >= seq {
            return Poll::Ready(());
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked at again under the lock: an advance stores the mark before it takes the lock,
        // so either it is seen here or this waker is in the map when the advance drains it.
        if self.get() >= seq {
            return Poll::Ready(());
        }
        let wakers = waiters.entry(seq).or_default();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A future that completes once `mark` reaches `seq`.
pub(crate) fn reached(mark: Arc<Watermark>, seq: u64) -> impl Future<Output = ()> + Send + 'static {
    std::future::poll_fn(move |cx| mark.poll_reached(seq, cx))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_advance_wakes_only_the_waiters_it_passes() {
        let mark = Arc::new(Watermark::default());
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let mut futures: Vec<_> = [1u64, 2, 3]
            .iter()
            .map(|&seq| Box::pin(reached(mark.clone(), seq)))
            .collect();
        for (f, c) in futures.iter_mut().zip(&counts) {
            let waker = Waker::from(c.clone());
            assert!(
                f.as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        mark.advance(2);
        let woken: Vec<usize> = counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, [1, 1, 0], "only the waiters for 1 and 2");
        let waker = Waker::from(counts[2].clone());
        let mut cx = Context::from_waker(&waker);
        assert!(futures[0].as_mut().poll(&mut cx).is_ready());
        assert!(futures[2].as_mut().poll(&mut cx).is_pending());
        mark.advance(1);
        assert_eq!(mark.get(), 2, "never moves down");
        mark.close();
        assert!(futures[2].as_mut().poll(&mut cx).is_ready());
    }
}
