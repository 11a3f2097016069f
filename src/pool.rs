//! Helper threads kept for the life of the process, for `parallel::run_beside`.
//!
//! Why not a thread per batch: a backup, restore or verify hands out a batch of segments every
//! millisecond or so. Spawning a helper for each, and joining it, left a core idle between
//! batches; on a virtual machine an idle core halts, and waking it again is slow, slower still
//! after the machine was idle for a moment (docs/benchmarks-history.md, "Helper threads"). So
//! helpers stay: after a task each one polls for the next for `SPIN` (yielding to any other
//! runnable thread meanwhile) before it sleeps on a condition variable.
//!
//! A task borrows the caller's stack. `run` guarantees it never outlives the call: the caller
//! takes back every ticket no helper has claimed yet and waits for the claimed ones to finish,
//! also when its own work panics. A helper that panics hands the panic to the caller.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper (or a caller waiting for one) polls before it sleeps. Most gaps
/// between batches are shorter; 0.3 ms did as well as 2 ms here (docs/benchmarks-history.md,
/// "Helper threads").
const SPIN: Duration = Duration::from_micros(300);

/// One `run` call: the task its helpers run, and how many are running it.
struct Scope {
    task: *const (dyn Fn() + Sync),
    running: AtomicUsize,
    caller: Thread,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A claim on a helper for one scope. Only ever dereferenced by the helper that took it out of
/// the queue, while the scope's `running` count includes that helper.
#[derive(Clone, Copy)]
struct Ticket(*const Scope);

// SAFETY: the scope outlives every claimed ticket (see `run`), and its task is `Sync`.
unsafe impl Send for Ticket {}

struct State {
    queue: VecDeque<Ticket>,
    /// Helpers waiting for work (polling or asleep), and how many of them are asleep.
    idle: usize,
    asleep: usize,
}

struct Pool {
    /// The process whose helpers these are: a forked child has none of them.
    pid: u32,
    state: Mutex<State>,
    wake: Condvar,
    /// `queue.len()`, readable without the lock by polling helpers.
    queued: AtomicUsize,
}

/// This process's pool. A child forked after the pool started gets a new one: the helpers (and
/// the lock, if one of them held it at the fork) stayed with the parent; the old pool is left
/// as it is.
fn pool() -> &'static Pool {
    static POOL: AtomicPtr<Pool> = AtomicPtr::new(std::ptr::null_mut());
    let pid = std::process::id();
    let current = POOL.load(Ordering::Acquire);
    // SAFETY: pools are never freed once published.
    if let Some(pool) = unsafe { current.as_ref() } {
        if pool.pid == pid {
            return pool;
        }
    }
    let fresh = Box::into_raw(Box::new(Pool {
        pid,
        state: Mutex::new(State {
            queue: VecDeque::new(),
            idle: 0,
            asleep: 0,
        }),
        wake: Condvar::new(),
        queued: AtomicUsize::new(0),
    }));
    match POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just published, never freed.
        Ok(_) => unsafe { &*fresh },
        Err(other) => {
            // SAFETY: `fresh` was never shared; `other` is published, never freed.
            drop(unsafe { Box::from_raw(fresh) });
            unsafe { &*other }
        }
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing runs user code under this lock, so a poisoned lock still holds a valid state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `count` tickets for `scope`, starting helpers so that each can be claimed at once.
    fn submit(&'static self, scope: &Scope, count: usize) {
        let mut state = self.lock();
        state.queue.extend((0..count).map(|_| Ticket(scope)));
        self.queued.store(state.queue.len(), Ordering::Release);
        let missing = state.queue.len().saturating_sub(state.idle);
        for _ in 0..missing {
            let spawned = std::thread::Builder::new()
                .name("datafold-helper".into())
                .spawn(move || self.helper());
            // Without a new helper the caller does the work itself (`run` takes the ticket back).
            if spawned.is_ok() {
                state.idle += 1;
            }
        }
        for _ in 0..count.min(state.asleep) {
            self.wake.notify_one();
        }
    }

    /// Takes back the tickets of `scope` that no helper has claimed.
    fn revoke(&self, scope: &Scope) {
        let mut state = self.lock();
        state.queue.retain(|t| !std::ptr::eq(t.0, scope));
        self.queued.store(state.queue.len(), Ordering::Release);
    }

    fn helper(&'static self) {
        loop {
            let ticket = self.next_ticket();
            // SAFETY: a claimed ticket's scope stays alive until `running` drops to zero.
            let scope = unsafe { &*ticket.0 };
            // SAFETY: as above; the task lives in the same frame as the scope.
            let task = unsafe { &*scope.task };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(task)) {
                let mut slot = scope.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(panic);
            }
            self.idle_again();
            // The scope may be gone once `running` is zero: take what is needed first.
            let caller = scope.caller.clone();
            scope.running.fetch_sub(1, Ordering::Release);
            caller.unpark();
        }
    }

    /// Waits for a ticket (polling for `SPIN`, then asleep) and claims it.
    fn next_ticket(&self) -> Ticket {
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.queued.load(Ordering::Acquire) > 0 {
                if let Some(ticket) = self.claim(&mut self.lock()) {
                    return ticket;
                }
            }
            polls = polls.wrapping_add(1);
            if polls % 64 != 0 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::yield_now();
            if started.elapsed() >= SPIN {
                break;
            }
        }
        let mut state = self.lock();
        loop {
            if let Some(ticket) = self.claim(&mut state) {
                return ticket;
            }
            state.asleep += 1;
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.asleep -= 1;
        }
    }

    fn claim(&self, state: &mut State) -> Option<Ticket> {
        let ticket = state.queue.pop_front()?;
        self.queued.store(state.queue.len(), Ordering::Release);
        state.idle -= 1;
        // SAFETY: the ticket was in the queue, so its scope's caller has not returned yet (it
        // takes back its tickets under this lock first).
        unsafe { &*ticket.0 }
            .running
            .fetch_add(1, Ordering::Relaxed);
        Some(ticket)
    }

    /// Marks the calling helper idle again (under the lock, so `submit` counts it).
    fn idle_again(&self) {
        self.lock().idle += 1;
    }
}

/// Runs `task` on up to `helpers` helper threads while the calling thread runs `own`; returns
/// once `own` is done and so is every helper that started `task`. A helper that does not start
/// it in time (all busy) never will. Panics in `own` or in a helper reach the caller.
pub fn run(helpers: usize, task: &(dyn Fn() + Sync), own: impl FnOnce()) {
    if helpers == 0 {
        own();
        return;
    }
    // SAFETY: the lifetime is erased only for the tickets; `Finish` below makes sure no helper
    // uses them after this frame.
    let task: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(task) };
    let scope = Scope {
        task,
        running: AtomicUsize::new(0),
        caller: std::thread::current(),
        panic: Mutex::new(None),
    };
    let pool = pool();
    /// Takes back unclaimed tickets and waits for the claimed ones, however `run` is left.
    struct Finish<'a>(&'static Pool, &'a Scope);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.revoke(self.1);
            let started = Instant::now();
            while self.1.running.load(Ordering::Acquire) != 0 {
                if started.elapsed() < SPIN {
                    std::thread::yield_now();
                } else {
                    std::thread::park_timeout(Duration::from_millis(1));
                }
            }
        }
    }
    {
        let _finish = Finish(pool, &scope);
        pool.submit(&scope, helpers);
        own();
    }
    let panic = scope.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(panic) = panic {
        resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn helpers_and_caller_all_run_and_the_pool_serves_many_callers() {
        let callers: Vec<_> = (0..6)
            .map(|_| {
                std::thread::spawn(|| {
                    for helpers in [1usize, 2, 3].into_iter().cycle().take(150) {
                        let ran = AtomicUsize::new(0);
                        let own = AtomicUsize::new(0);
                        run(
                            helpers,
                            &|| {
                                ran.fetch_add(1, Ordering::Relaxed);
                            },
                            || {
                                own.fetch_add(1, Ordering::Relaxed);
                            },
                        );
                        assert_eq!(own.load(Ordering::Relaxed), 1);
                        assert!(ran.load(Ordering::Relaxed) <= helpers);
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    #[test]
    fn a_helper_given_time_runs_the_task() {
        let ran = AtomicUsize::new(0);
        run(
            1,
            &|| {
                ran.fetch_add(1, Ordering::SeqCst);
            },
            || {
                let started = Instant::now();
                while ran.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(10)
                {
                    std::thread::yield_now();
                }
            },
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_helper_hands_its_panic_to_the_caller_and_the_pool_goes_on() {
        let started = AtomicBool::new(false);
        let r = catch_unwind(AssertUnwindSafe(|| {
            run(
                1,
                &|| {
                    started.store(true, Ordering::SeqCst);
                    panic!("helper failed");
                },
                || {
                    while !started.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                },
            )
        }));
        let panic = r.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"helper failed"));
        let ran = AtomicUsize::new(0);
        run(
            2,
            &|| {
                ran.fetch_add(1, Ordering::SeqCst);
            },
            || {},
        );
        assert!(ran.load(Ordering::SeqCst) <= 2);
    }

    /// However the caller's own work ends, a helper that started the task has finished it
    /// before `run` returns: the task may borrow the caller's stack.
    #[test]
    fn the_caller_waits_for_started_helpers_even_when_its_own_work_panics() {
        for _ in 0..20 {
            let (started, finished) = (AtomicBool::new(false), AtomicBool::new(false));
            let r = catch_unwind(AssertUnwindSafe(|| {
                run(
                    1,
                    &|| {
                        started.store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        finished.store(true, Ordering::SeqCst);
                    },
                    || {
                        while !started.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                        panic!("own work failed");
                    },
                )
            }));
            assert!(r.is_err());
            assert!(finished.load(Ordering::SeqCst));
        }
    }
}
