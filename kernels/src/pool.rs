//! Running a forward pass on rayon's pool with the other workers polling for its work.
//!
//! A forward issues one parallel product per projection (~110 in an 8-node verification of
//! a 28-layer model) with serial work between them: norms, RoPE, the cache, activation
//! quantization. A rayon worker that finds nothing to do spins for a few dozen rounds and
//! then sleeps, and a sleeping worker is woken only when new work is pushed — on a virtual
//! machine a wake-up of tens of microseconds. Per thread on a 2-core Xeon guest (Qwen2.5-1.5B,
//! 8-node verification), the forward's own worker was busy ~98% of the time and the other
//! ~75%.
//!
//! [`polled`] runs a closure on a worker of the global pool (as `rayon::scope` does from
//! outside it) and, until the closure returns, keeps every other worker in a loop that takes
//! any pending job of the pool ([`rayon::yield_now`]) and otherwise yields the OS thread (so a
//! busy machine's other threads still run) — as llama.cpp's threads spin between the graph's
//! operations. Measured on that guest in one process, forwards alternated with polling and
//! 12 jobs per thread in each product ([`crate::qmatmul::matmul_fused`]) against neither and 3 jobs
//! (30 rounds, median of paired ratios, four runs): an 8-node verification 0.93–0.96× the
//! time, a one-node step 0.97–0.99×. Tried apart (a first version, spinning without yielding
//! the thread): polling alone 0.97–1.0×, the finer jobs alone 0.98–0.99×. The other worker
//! was then busy ~90% of the pass rather than ~75% (by `perf`, which competes for the cores
//! itself; a counter in this loop later read 8.3% idle), waiting for the last job of each
//! product, for attention's serial part, and — until products filled their own outputs
//! ([`crate::qmatmul::matmul_fused_new`]) — for the outputs' zeroing.
//!
//! The pollers hold their cores while a forward runs (yielding them to any other runnable
//! thread); on a machine shared with other work, `ARBOR_POLL=off` (read once per process)
//! turns them off and [`polled`] runs the closure as `rayon::scope` does.
//!
//! Any number of callers may run forwards at once: a worker polling for one forward may run
//! another forward's jobs (or its whole closure) meanwhile, and a poller waits only for its
//! own forward's closure to return, which never waits for a poller — so no cycle can form.
//! On a one-thread pool nothing polls; called on a worker, the closure runs inline.
//!
//! ```
//! use rayon::prelude::*;
//! let sum: u64 = arbor_kernels::pool::polled(|| (0..1000u64).into_par_iter().sum());
//! assert_eq!(sum, 499_500);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on a worker of rayon's global pool, every other worker polling for the pool's
/// jobs until `f` returns (or unwinds); inline when already on a worker.
pub fn polled<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    if !polling() {
        return rayon::scope(|_| f());
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let home = rayon::current_thread_index();
        let done = &done;
        s.spawn_broadcast(move |_, ctx| {
            if Some(ctx.index()) != home {
                poll_until(done);
            }
        });
        let _stop = Stop(done);
        f()
    })
}

/// Whether [`polled`] keeps the other workers polling: unless `ARBOR_POLL` says `off` (or
/// `0`, `false`, `no`), read once per process.
fn polling() -> bool {
    static POLL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POLL.get_or_init(|| poll_setting(std::env::var("ARBOR_POLL").ok().as_deref()))
}

/// `ARBOR_POLL`'s value as [`polling`] reads it.
fn poll_setting(value: Option<&str>) -> bool {
    !matches!(
        value.map(str::trim).map(str::to_ascii_lowercase).as_deref(),
        Some("off" | "0" | "false" | "no")
    )
}

/// Sets its flag when dropped: the pollers stop even if the closure unwinds (the scope
/// waits for them before it returns or re-raises the panic).
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Takes the pool's pending jobs until `done`, yielding the OS thread when there are none.
fn poll_until(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// `f` on a plain thread (outside the pool, as the engine calls forwards), failing
    /// rather than hanging if it has not returned within 60 s (a poller left spinning, a
    /// cycle of waits).
    fn within_a_minute<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("returned within a minute")
    }

    #[test]
    fn polling_is_on_unless_the_environment_turns_it_off() {
        for off in ["off", "0", "false", "no", " OFF "] {
            assert!(!poll_setting(Some(off)), "{off:?}");
        }
        for on in [None, Some("on"), Some("1"), Some("")] {
            assert!(poll_setting(on), "{on:?}");
        }
    }

    #[test]
    fn returns_the_closures_value_and_runs_its_parallel_work() {
        let sum = within_a_minute(|| polled(|| (0..10_000u64).into_par_iter().sum::<u64>()));
        assert_eq!(sum, 49_995_000);
    }

    #[test]
    fn a_panicking_closure_stops_the_pollers_and_propagates() {
        let caught = within_a_minute(|| {
            std::panic::catch_unwind(|| polled(|| -> u32 { panic!("inside") })).is_err()
        });
        assert!(caught);
        // The pool is usable afterwards (no worker left polling for the dead closure).
        let n = within_a_minute(|| polled(|| (0..100u32).into_par_iter().count()));
        assert_eq!(n, 100);
    }

    #[test]
    fn concurrent_and_nested_calls_all_finish() {
        let all = within_a_minute(|| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    std::thread::spawn(move || {
                        (0..20u64)
                            .map(|i| {
                                polled(|| {
                                    // Nested: inline on the worker.
                                    let inner = polled(|| (0..100u64).into_par_iter().sum::<u64>());
                                    let outer: u64 =
                                        (0..1000u64).into_par_iter().map(|v| v * t + i).sum();
                                    inner + outer
                                })
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect::<Vec<u64>>()
        });
        for (t, got) in all.into_iter().enumerate() {
            let t = t as u64;
            let want: u64 = (0..20u64).map(|i| 4950 + t * 499_500 + 1000 * i).sum();
            assert_eq!(got, want);
        }
    }
}
