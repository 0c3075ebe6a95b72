//! The wall clock a node reads: the machine's, or one a simulation sets
//! (and jumps). Timeouts never use it (they use the monotonic clock, which
//! tokio gives and a simulation controls); a participant reads it once at
//! start, to stamp its records with times that still mean something after
//! a restart.

use std::fmt;
use std::sync::Arc;

/// Milliseconds since the Unix epoch, as some clock says.
pub type UnixMsFn = dyn Fn() -> u64 + Send + Sync;

#[derive(Clone, Default)]
pub enum WallClock {
    /// The machine's clock.
    #[default]
    System,
    /// A clock someone else keeps (a simulation's, which can jump).
    Set(Arc<UnixMsFn>),
}

impl WallClock {
    pub fn unix_ms(&self) -> u64 {
        match self {
            WallClock::System => {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
            }
            WallClock::Set(now) => now(),
        }
    }
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WallClock::System => f.write_str("System"),
            WallClock::Set(_) => f.write_str("Set"),
        }
    }
}
