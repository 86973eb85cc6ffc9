//! Ctrl-C (SIGINT) and SIGTERM during training: the first asks the loop to finish its step and
//! checkpoint; a second exits at once (files are written atomically, so none is torn).
//!
//! "A second" means one that comes at least `SAME_MOMENT_NS` after the first: `timeout -s INT`
//! and a terminal's Ctrl-C under some shells signal the process and its group at once, so one
//! request can arrive as two signals within microseconds, and it must still checkpoint.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// CLOCK_MONOTONIC of the first signal, in nanoseconds.
static FIRST_NS: AtomicI64 = AtomicI64::new(0);
/// Signals closer than this to the first are the same request (half a second: faster than a
/// person presses Ctrl-C twice on purpose, far slower than one kill fanned out to a group).
pub const SAME_MOMENT_NS: i64 = 500_000_000;

/// CLOCK_MONOTONIC in nanoseconds; clock_gettime is async-signal-safe (POSIX.1-2008).
// time_t and c_long are i64 here but narrower on some targets, so the casts stay.
#[allow(clippy::unnecessary_cast)]
fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
}

/// Whether a signal at `now` is a second request, given the first at `first` (both ns).
fn is_second(first: i64, now: i64) -> bool {
    now - first >= SAME_MOMENT_NS
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe work here: atomics, clock_gettime, and _exit on a second request.
    let now = now_ns();
    if REQUESTED.swap(true, Ordering::SeqCst) {
        if is_second(FIRST_NS.load(Ordering::SeqCst), now) {
            // SAFETY: _exit is async-signal-safe and ends the process without unwinding.
            unsafe { libc::_exit(130) };
        }
    } else {
        FIRST_NS.store(now, Ordering::SeqCst);
    }
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    #[cfg(unix)]
    // SAFETY: `on_signal` is an `extern "C" fn(c_int)` doing only async-signal-safe work.
    unsafe {
        let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_at_one_moment_are_one_request() {
        assert!(!is_second(1_000, 1_000));
        assert!(!is_second(1_000, 1_000 + SAME_MOMENT_NS - 1));
        assert!(is_second(1_000, 1_000 + SAME_MOMENT_NS));
        let (a, b) = (now_ns(), now_ns());
        assert!(b >= a && !is_second(a, b), "{a} {b}");
    }
}
