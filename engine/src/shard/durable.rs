//! Durability notifications: the durable watermark, the sticky write error, and the
//! [`Durable`] future that tasks await on them.
//!
//! The log moves the watermark after each synced batch (or sets the error when a sync
//! failed, or a passing one while a full disk stalls it); a waiter holds only an `Rc` of
//! the [`Notifier`], never a borrow of the shard, so it can wait across the commit that
//! wakes it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::error::WriteError;

/// Durability notifications: the watermark and the tasks waiting for it.
#[derive(Default)]
pub(crate) struct Notifier {
    durable_seq: Cell<u64>,
    failed: Cell<Option<WriteError>>,
    /// A commit found the disk full: waiters hear it, until the watermark moves.
    stalled: Cell<Option<WriteError>>,
    waiters: RefCell<Vec<Waker>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("durable_seq", &self.durable_seq.get()).finish()
    }
}

impl Notifier {
    /// A notifier whose watermark starts at `durable_seq`.
    pub(crate) fn new(durable_seq: u64) -> Notifier {
        let notifier = Notifier::default();
        notifier.durable_seq.set(durable_seq);
        notifier
    }

    /// The highest durable record sequence number.
    pub(crate) fn durable_seq(&self) -> u64 {
        self.durable_seq.get()
    }

    /// Moves the watermark to `durable_seq` and wakes every waiter.
    pub(crate) fn advance(&self, durable_seq: u64) {
        self.durable_seq.set(durable_seq);
        self.stalled.set(None);
        self.wake_all();
    }

    /// A commit failed for lack of space and will be tried again: wakes every waiter
    /// with `error`, which holds only until the next successful commit.
    pub(crate) fn stall(&self, error: WriteError) {
        self.stalled.set(Some(error));
        self.wake_all();
    }

    /// Records the error that stops the shard and wakes every waiter with it.
    pub(crate) fn fail(&self, error: WriteError) {
        self.failed.set(Some(error));
        self.wake_all();
    }

    fn wake_all(&self) {
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// Resolves when a record is durable (or the shard failed, or stalled on a full disk).
#[derive(Debug)]
pub struct Durable {
    notifier: Rc<Notifier>,
    record_seq: u64,
}

impl Durable {
    /// Waits on `notifier` for `record_seq`.
    pub(crate) fn new(notifier: Rc<Notifier>, record_seq: u64) -> Durable {
        Durable { notifier, record_seq }
    }
}

impl Future for Durable {
    type Output = Result<(), WriteError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.notifier.durable_seq.get() >= self.record_seq {
            return Poll::Ready(Ok(()));
        }
        if let Some(error) = self.notifier.failed.take() {
            self.notifier.failed.set(Some(error.clone()));
            return Poll::Ready(Err(error));
        }
        if let Some(error) = self.notifier.stalled.take() {
            self.notifier.stalled.set(Some(error.clone()));
            return Poll::Ready(Err(error));
        }
        self.notifier.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
