//! Spreading independent segment jobs over threads. Segments of a Tink stream seal and open
//! independently; every job writes to its own, pre-assigned output slice, so the caller keeps
//! the order whichever thread runs which job. Threads take the next job as they free up, so a
//! thread that first had other work (`run_beside`'s `side` and `own`) does fewer of them.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// Below this many bytes per batch the work stays on the calling thread.
const MIN_PARALLEL_BYTES: usize = 1 << 20;

/// The number of threads to use when the caller says 0 ("all cores").
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `f` on every job, on up to `threads` threads; returns the first error in job order.
pub fn run<J: Send>(
    jobs: Vec<J>,
    bytes: usize,
    threads: usize,
    f: impl Fn(J) -> Result<()> + Sync,
) -> Result<()> {
    let threads = threads.min(jobs.len());
    run_beside(jobs, bytes, threads, || {}, || {}, f)
}

/// `run`, with two more tasks: `side` (the digest of plaintext, say) on a helper thread
/// (src/pool.rs) and `own` (reading the next batch, say: it may take the GIL) on the calling
/// thread, each before that thread turns to the jobs; so with two cores the jobs fill whatever
/// time the other two tasks leave. If no helper is free in time, `side` runs on the calling
/// thread after the jobs. Small batches or one thread: `side`, `own`, then the jobs, on the
/// calling thread.
pub fn run_beside<J: Send>(
    jobs: Vec<J>,
    bytes: usize,
    threads: usize,
    side: impl FnOnce() + Send,
    own: impl FnOnce(),
    f: impl Fn(J) -> Result<()> + Sync,
) -> Result<()> {
    if threads <= 1 || bytes < MIN_PARALLEL_BYTES {
        side();
        own();
        return jobs.into_iter().try_for_each(f);
    }
    // The helpers: one for `side` (then jobs), the others for jobs only; no more than jobs.
    let helpers = (threads - 1).min(jobs.len().max(1));
    let queue = Queue::new(jobs);
    let side = Mutex::new(Some(side));
    let take_side = || side.lock().expect("side task").take();
    let task = || {
        if let Some(side) = take_side() {
            side();
        }
        queue.work(&f);
    };
    crate::pool::run(helpers, &task, || {
        own();
        queue.work(&f);
    });
    // No helper was free to take it: the side task runs here, after the jobs.
    if let Some(side) = take_side() {
        side();
    }
    queue.first_error()
}

/// Jobs handed out in order, with their index, to whichever thread asks next.
struct Queue<J> {
    jobs: Mutex<std::iter::Enumerate<std::vec::IntoIter<J>>>,
    /// The failed job of lowest index so far, and its error.
    error: Mutex<Option<(usize, Error)>>,
}

impl<J> Queue<J> {
    fn new(jobs: Vec<J>) -> Self {
        Queue {
            jobs: Mutex::new(jobs.into_iter().enumerate()),
            error: Mutex::new(None),
        }
    }

    fn work(&self, f: impl Fn(J) -> Result<()>) {
        loop {
            let next = self.jobs.lock().expect("job queue").next();
            let Some((i, job)) = next else {
                return;
            };
            if let Err(e) = f(job) {
                let mut first = self.error.lock().expect("error slot");
                if !matches!(*first, Some((j, _)) if j < i) {
                    *first = Some((i, e));
                }
            }
        }
    }

    fn first_error(&self) -> Result<()> {
        match self.error.lock().expect("error slot").take() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_reports_the_first_error() {
        let count = AtomicUsize::new(0);
        let jobs: Vec<usize> = (0..10).collect();
        run(jobs, 1 << 30, 3, |_| {
            count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 10);
        let r = run((0..10).collect::<Vec<usize>>(), 1 << 30, 4, |j| {
            if j == 3 || j == 8 {
                Err(Error::integrity(format!("job {j}")))
            } else {
                Ok(())
            }
        });
        assert_eq!(r.unwrap_err().to_string(), "job 3");
    }

    /// Threads take jobs as they free up: a busy `side` task leaves the jobs to the other
    /// threads, and a job failing later in time but earlier in order is the error reported.
    #[test]
    fn jobs_go_to_free_threads_and_the_first_error_in_job_order_is_reported() {
        use std::time::Duration;
        let done = AtomicUsize::new(0);
        let side_thread = Mutex::new(None);
        let ran_by: Vec<Mutex<Option<std::thread::ThreadId>>> =
            (0..6).map(|_| Mutex::new(None)).collect();
        let r = run_beside(
            (0..6).collect::<Vec<usize>>(),
            1 << 30,
            3,
            || {
                *side_thread.lock().unwrap() = Some(std::thread::current().id());
                while done.load(Ordering::SeqCst) < 6 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            },
            || {},
            |j| {
                *ran_by[j].lock().unwrap() = Some(std::thread::current().id());
                let r = match j {
                    1 => {
                        std::thread::sleep(Duration::from_millis(50));
                        Err(Error::integrity("job 1"))
                    }
                    4 => Err(Error::integrity("job 4")),
                    _ => Ok(()),
                };
                done.fetch_add(1, Ordering::SeqCst);
                r
            },
        );
        assert_eq!(r.unwrap_err().to_string(), "job 1");
        let side = side_thread.lock().unwrap().expect("side ran");
        assert!(ran_by
            .iter()
            .all(|t| t.lock().unwrap().is_some_and(|t| t != side)));
    }

    #[test]
    fn run_beside_runs_the_side_and_own_tasks_once_whatever_the_size() {
        for (bytes, threads) in [(0, 1), (0, 4), (1 << 30, 1), (1 << 30, 2), (1 << 30, 3)] {
            let (count, side, own) = (
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            );
            let jobs: Vec<usize> = (0..7).collect();
            run_beside(
                jobs,
                bytes,
                threads,
                || {
                    side.fetch_add(1, Ordering::Relaxed);
                },
                || {
                    own.fetch_add(1, Ordering::Relaxed);
                },
                |_| {
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(count.load(Ordering::Relaxed), 7);
            assert_eq!(side.load(Ordering::Relaxed), 1);
            assert_eq!(own.load(Ordering::Relaxed), 1);
        }
    }
}
