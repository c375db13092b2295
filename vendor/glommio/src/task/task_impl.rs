// Unless explicitly stated otherwise all files in this repository are licensed
// under the MIT/Apache-2.0 License, at your convenience
//
// This product includes software developed at Datadog (https://www.datadoghq.com/). Copyright 2020 Datadog, Inc.
//
use core::{fmt, future::Future, marker::PhantomData, mem, ptr::NonNull};

#[cfg(feature = "debugging")]
use crate::task::debugging::TaskDebugger;
use crate::{
    dbg_context,
    task::{header::Header, raw::RawTask, state::*, JoinHandle},
};

use std::sync::atomic::Ordering;

/// Creates a new local task.
///
/// This constructor returns a [`Task`] reference that runs the future and a
/// [`JoinHandle`] that awaits its result.
///
/// When run, the task polls `future`. When woken up, it gets scheduled for
/// running by the `schedule` function.
///
/// [`Task`]: struct.Task.html
/// [`JoinHandle`]: struct.JoinHandle.html
pub(crate) fn spawn_local<F, R, S>(
    executor_id: usize,
    future: F,
    schedule: S,
    latency_matters: bool,
) -> (Task, JoinHandle<R>)
where
    F: Future<Output = R>,
    S: Fn(Task),
{
    // Allocate large futures on the heap.
    let raw_task = if mem::size_of::<F>() >= 2048 {
        let future = alloc::boxed::Box::pin(future);
        RawTask::<_, R, S>::allocate(future, schedule, executor_id, latency_matters)
    } else {
        RawTask::<_, R, S>::allocate(future, schedule, executor_id, latency_matters)
    };

    let task = Task { raw_task };
    let handle = JoinHandle {
        raw_task,
        _marker: PhantomData,
    };
    (task, handle)
}

/// A task reference that runs its future.
///
/// At any moment in time, there is at most one [`Task`] reference associated
/// with a particular task. Running consumes the [`Task`] reference and polls
/// its internal future. If the future is still pending after getting polled,
/// the [`Task`] reference simply won't exist until a [`Waker`] notifies the
/// task. If the future completes, its result becomes available to the
/// [`JoinHandle`].
///
/// When a task is woken up, its [`Task`] reference is recreated and passed to
/// the schedule function. In most executors, scheduling simply pushes the
/// [`Task`] reference into a queue of runnable tasks.
///
/// If the [`Task`] reference is dropped without getting run, the task is
/// automatically canceled. When canceled, the task won't be scheduled again
/// even if a [`Waker`] wakes it. It is possible for the [`JoinHandle`] to
/// cancel while the [`Task`] reference exists, in which case an attempt
/// to run the task won't do anything.
///
/// [`run()`]: struct.Task.html#method.run
/// [`JoinHandle`]: struct.JoinHandle.html
/// [`Task`]: struct.Task.html
/// [`Waker`]: https://doc.rust-lang.org/std/task/struct.Waker.html
pub struct Task {
    /// A pointer to the heap-allocated task.
    pub(crate) raw_task: NonNull<()>,
}

impl Task {
    /// Schedules the task.
    ///
    /// This is a convenience method that simply reschedules the task by passing
    /// it to its schedule function.
    ///
    /// If the task is canceled, this method won't do anything.
    pub(crate) fn schedule(self) {
        let ptr = self.raw_task.as_ptr();
        let header = ptr as *const Header;
        mem::forget(self);

        unsafe {
            ((*header).vtable.schedule)(ptr);
        }
    }

    /// Runs the task.
    ///
    /// Returns `true` if the task was woken while running, in which case it
    /// gets rescheduled at the end of this method invocation.
    ///
    /// This method polls the task's future. If the future completes, its result
    /// will become available to the [`JoinHandle`]. And if the future is
    /// still pending, the task will have to be woken up in order to be
    /// rescheduled and run again.
    ///
    /// If the task was canceled by a [`JoinHandle`] before it gets run, then
    /// this method won't do anything.
    ///
    /// It is possible that polling the future panics, in which case the panic
    /// will be propagated into the caller. It is advised that invocations
    /// of this method are wrapped inside [`catch_unwind`]. If a panic
    /// occurs, the task is automatically canceled.
    ///
    /// [`JoinHandle`]: struct.JoinHandle.html
    /// [`catch_unwind`]: https://doc.rust-lang.org/std/panic/fn.catch_unwind.html
    pub(crate) fn run(self) -> bool {
        let ptr = self.raw_task.as_ptr();
        dbg_context!(ptr, "run", {
            let header = ptr as *const Header;
            mem::forget(self);
            #[cfg(feature = "debugging")]
            TaskDebugger::set_current_task(ptr);
            #[cfg(feature = "wake-first")]
            let _current = CurrentTask::enter(ptr);
            unsafe { ((*header).vtable.run)(ptr) }
        })
    }

    /// ShardMQ patch 7: whether the task asked to go to the front of its queue when woken.
    #[cfg(feature = "wake-first")]
    pub(crate) fn wake_first(&self) -> bool {
        unsafe { (*(self.raw_task.as_ptr() as *const Header)).wake_first }
    }

    pub(crate) fn run_right_away(self) -> bool {
        let ptr = self.raw_task.as_ptr();
        let header = ptr as *const Header;
        mem::forget(self);

        unsafe {
            let refs = (*header).references.fetch_add(1, Ordering::Relaxed);
            assert_ne!(refs, i16::max_value());
            #[cfg(feature = "wake-first")]
            let _current = CurrentTask::enter(ptr);
            ((*header).vtable.run)(ptr)
        }
    }
}

// ShardMQ patch 7: the task being polled on this thread, so it can ask to be woken first.
#[cfg(feature = "wake-first")]
std::thread_local! {
    static CURRENT_TASK: std::cell::Cell<*const ()> = const { std::cell::Cell::new(core::ptr::null()) };
    /// Whether a task of this thread's executor has ever asked to be woken first.
    static WAKE_FIRST_IN_USE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// ShardMQ patch 8: whether some task of this thread's executor has asked to be woken first
/// (only then does a busy task queue look for completions between its tasks).
#[cfg(feature = "wake-first")]
pub(crate) fn wake_first_in_use() -> bool {
    WAKE_FIRST_IN_USE.with(|c| c.get())
}

/// Marks the task being polled for the duration of one run (restoring the outer one, as a
/// task may be run from inside another).
#[cfg(feature = "wake-first")]
struct CurrentTask(*const ());

#[cfg(feature = "wake-first")]
impl CurrentTask {
    fn enter(ptr: *const ()) -> Self {
        CurrentTask(CURRENT_TASK.with(|c| c.replace(ptr)))
    }
}

#[cfg(feature = "wake-first")]
impl Drop for CurrentTask {
    fn drop(&mut self) {
        CURRENT_TASK.with(|c| c.set(self.0));
    }
}

/// ShardMQ patch 7 (feature `wake-first`): asks that the task being polled now be put at the
/// front of its task queue, not the back, whenever it is woken from now on (until called with
/// `false`). Use it for a task whose progress frees work for many others (a consumer that
/// drains a queue): it then runs before the tasks woken with it, instead of after all of
/// them. A task that stays runnable (yields to its peers) should clear it first, or it would
/// run again at once. Does nothing outside a task. The first call with `true` on an executor
/// also makes its busy task queues look for new completions every few tasks (ShardMQ patch
/// 8), so that the task is woken while others still run.
#[cfg(feature = "wake-first")]
pub fn set_wake_first(on: bool) {
    if on {
        WAKE_FIRST_IN_USE.with(|c| c.set(true));
    }
    CURRENT_TASK.with(|c| {
        let ptr = c.get();
        if !ptr.is_null() {
            // Single-threaded: the header of the running task is not otherwise borrowed
            // while its future is polled.
            unsafe { (*(ptr as *mut Header)).wake_first = on };
        }
    });
}

impl Drop for Task {
    fn drop(&mut self) {
        let ptr = self.raw_task.as_ptr();
        let header = ptr as *mut Header;

        unsafe {
            // Cancel the task.
            (*header).cancel();

            // Drop the future.
            ((*header).vtable.drop_future)(ptr);

            // Mark the task as unscheduled.
            (*header).state &= !SCHEDULED;

            // Notify the awaiter that the future has been dropped.
            (*header).notify(None);

            // Drop the task reference.
            ((*header).vtable.drop_task)(ptr);
        }
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ptr = self.raw_task.as_ptr();
        let header = ptr as *const Header;

        f.debug_struct("Task")
            .field("header", unsafe { &(*header) })
            .finish()
    }
}
