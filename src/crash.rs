//! Crash points, for the end-to-end tests: a node started with the
//! environment variable `TANDEM_CRASH_AT=<point>` (or `<point>:<n>`, for the
//! n-th time it gets there) sends itself SIGKILL when it reaches that point.
//! Tests use them to kill a real process between two steps that no signal
//! from outside could separate reliably: after a local write is durable and
//! before its reply leaves, or after a peer acknowledged an event and before
//! the outbox forgets it. The node dies exactly as it would under `kill -9`.
//!
//! Unset (always, outside tests), a point costs one read of a value set once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const CRASH_AT_ENV: &str = "TANDEM_CRASH_AT";

/// The points the binaries have, named in `TANDEM_CRASH_AT`.
pub const POINTS: &[&str] = &[
    // participant: a saga step's write is durable, its answer not sent.
    "saga-step-written",
    // participant: a peer acknowledged an outbox event, not yet forgotten.
    "relay-delivered",
    // participant: a commit's write is durable, its acknowledgement not sent.
    "commit-applied",
    // participant: a one-phase commit's write is durable, its answer not sent.
    "one-phase-applied",
];

struct Armed {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(CRASH_AT_ENV).ok()?;
            let (point, nth) = match value.split_once(':') {
                Some((point, nth)) => {
                    let nth = nth.parse().unwrap_or_else(|_| panic!("{CRASH_AT_ENV}={value}: {nth:?} is not a count"));
                    (point.to_string(), nth)
                }
                None => (value, 1),
            };
            assert!(
                POINTS.contains(&point.as_str()),
                "{CRASH_AT_ENV}={point}: no such crash point (known: {POINTS:?})"
            );
            tracing::warn!(%point, nth, "crash point armed: this node will SIGKILL itself there");
            Some(Armed { point, nth, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Kills this process with SIGKILL if `point` is the armed crash point and
/// this is the time it was armed for.
pub fn point(point: &str) {
    debug_assert!(POINTS.contains(&point), "undeclared crash point {point}");
    let Some(armed) = armed() else { return };
    if armed.point == point && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth {
        tracing::warn!(%point, "crash point reached: SIGKILL");
        // SAFETY: kill(2) on our own pid with a signal that cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
