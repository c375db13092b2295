//! Requests from threads outside the shards (the admin API) to one shard's engine.
//!
//! Each shard has a [`Mailbox`]: a queue of jobs, closures run on the shard's thread with its
//! engine, and the waker of the task that runs them. Posting a job wakes that task from the
//! other thread (glommio takes foreign wakes and rouses a sleeping executor). The answer goes
//! back through whatever channel the job captured; when the shard stops, the jobs still queued
//! are dropped, and with them their reply channels, so no caller waits for a shard that is
//! gone.

use crate::core::engine::Engine;
use crate::core::time::Timestamp;
use crate::shard::clock;
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Mutex;
use std::task::{Poll, Waker};

/// Work for a shard: runs on its thread with its engine and the current time.
pub type Job = Box<dyn FnOnce(&mut Engine, Timestamp) + Send>;

/// A shard's queue of [`Job`]s.
#[derive(Default)]
pub struct Mailbox {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    waker: Option<Waker>,
    /// The shard stopped: nothing more is taken.
    closed: bool,
}

impl Mailbox {
    /// Queues `job` for the shard; gives it back when the shard has stopped.
    pub fn post(&self, job: Job) -> Result<(), Job> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return Err(job);
        }
        s.jobs.push(job);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Refuses further jobs and drops the queued ones (the shard is stopping).
    pub fn close(&self) {
        let jobs = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.closed = true;
            s.waker = None;
            std::mem::take(&mut s.jobs)
        };
        drop(jobs);
    }

    fn take(&self, waker: &Waker) -> Vec<Job> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.jobs.is_empty() {
            s.waker = Some(waker.clone());
        }
        std::mem::take(&mut s.jobs)
    }
}

/// Runs the jobs posted to `mailbox` with the shard's engine, as they come.
pub async fn serve(mailbox: std::sync::Arc<Mailbox>, engine: Rc<RefCell<Engine>>) {
    loop {
        let jobs = poll_fn(|cx| {
            let jobs = mailbox.take(cx.waker());
            if jobs.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(jobs)
            }
        })
        .await;
        for job in jobs {
            let now = clock::now();
            job(&mut engine.borrow_mut(), now);
        }
    }
}
