//! Spreading independent segment jobs over threads. Segments of a Tink stream seal and open
//! independently, so a batch of them is cut into one contiguous run per thread; the caller
//! keeps the order because every job writes to its own, pre-assigned output slice.

use crate::error::Result;

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
    let threads = threads.max(1).min(jobs.len());
    if threads <= 1 || bytes < MIN_PARALLEL_BYTES {
        return jobs.into_iter().try_for_each(&f);
    }
    let per_thread = jobs.len().div_ceil(threads);
    let mut groups: Vec<Vec<J>> = Vec::with_capacity(threads);
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        groups.push(jobs.by_ref().take(per_thread).collect());
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut groups = groups.into_iter();
        let first = groups.next().unwrap_or_default();
        let handles: Vec<_> = groups
            .map(|group| scope.spawn(move || group.into_iter().try_for_each(f)))
            .collect();
        let mut result = first.into_iter().try_for_each(f);
        for h in handles {
            let r = h.join().expect("segment worker panicked");
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// `run`, with `side` (the digest of plaintext, say) running meanwhile on a thread of its own
/// when the batch is large enough to spread: the jobs then get `threads - 1` threads, so with
/// two cores one digests while the other seals or opens. Small batches or one thread: `side`
/// first, then the jobs, on the calling thread.
pub fn run_beside<J: Send>(
    jobs: Vec<J>,
    bytes: usize,
    threads: usize,
    side: impl FnOnce() + Send,
    f: impl Fn(J) -> Result<()> + Sync,
) -> Result<()> {
    if threads <= 1 || bytes < MIN_PARALLEL_BYTES {
        side();
        return run(jobs, bytes, threads, f);
    }
    std::thread::scope(|scope| {
        let side = scope.spawn(side);
        let result = run(jobs, bytes, threads - 1, f);
        side.join().expect("digest worker panicked");
        result
    })
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

    #[test]
    fn run_beside_runs_the_side_job_once_whatever_the_size() {
        for (bytes, threads) in [(0, 1), (0, 4), (1 << 30, 1), (1 << 30, 2), (1 << 30, 3)] {
            let (count, side) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let jobs: Vec<usize> = (0..7).collect();
            run_beside(
                jobs,
                bytes,
                threads,
                || {
                    side.fetch_add(1, Ordering::Relaxed);
                },
                |_| {
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(count.load(Ordering::Relaxed), 7);
            assert_eq!(side.load(Ordering::Relaxed), 1);
        }
    }
}
