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

/// A duration as milliseconds, as flags write it: a positive whole number
/// and a unit (ms, s, m, h or d), such as 24h, 90m or 3600s.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 24h, 90m or 3600s"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?} has no unit: write 24h, 90m, 3600s or 500ms")),
    };
    match number.checked_mul(unit_ms) {
        Some(0) => Err("the duration must be positive".into()),
        Some(ms) => Ok(ms),
        None => Err(format!("{text:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations_have_a_unit_and_are_positive() {
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("90m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("3600s"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2d"), Ok(172_800_000));
        for bad in ["", "24", "0h", "h", "1.5h", "-1h", "3x", "99999999999999999999h", "99999999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
