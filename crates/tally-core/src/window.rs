//! Event-time windows: tumbling, aligned to the UNIX epoch, `[start, end)`.
//!
//! Decisions written down here:
//! - The window size must be positive and divide 15 minutes (900 000 ms). Every real
//!   time zone's offset is a multiple of 15 minutes, so a window never straddles a
//!   local hour or day boundary and hours, days and months are exact roll-ups of
//!   windows in any time zone.
//! - The window of an event time `t` starts at `floor(t / size) × size` (floor
//!   division, so times before 1970 fall into the window below them, not towards zero).
//! - Times whose window would not be representable in `i64` milliseconds (within one
//!   window of `i64::MIN`/`i64::MAX`) have no window: [`WindowSize::window_of`] returns
//!   `None` and the aggregator rejects such an event instead of panicking or wrapping.

use std::fmt;

/// Fifteen minutes in milliseconds: every window size must divide it.
pub const FIFTEEN_MINUTES_MS: i64 = 15 * 60 * 1000;

/// Why a window size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowSizeError {
    /// The size is zero or negative.
    #[error("window size {size_ms} ms must be positive")]
    NotPositive {
        /// The size given.
        size_ms: i64,
    },
    /// The size does not divide 15 minutes.
    #[error("window size {size_ms} ms does not divide 15 minutes (900000 ms)")]
    DoesNotDivideFifteenMinutes {
        /// The size given.
        size_ms: i64,
    },
}

/// A validated window size: positive and a divisor of 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowSize(i64);

impl WindowSize {
    /// The default window: one minute.
    pub const ONE_MINUTE: WindowSize = WindowSize(60_000);

    /// Validates `size_ms`.
    pub const fn new(size_ms: i64) -> Result<WindowSize, WindowSizeError> {
        if size_ms <= 0 {
            return Err(WindowSizeError::NotPositive { size_ms });
        }
        if FIFTEEN_MINUTES_MS % size_ms != 0 {
            return Err(WindowSizeError::DoesNotDivideFifteenMinutes { size_ms });
        }
        Ok(WindowSize(size_ms))
    }

    /// The size in milliseconds.
    pub const fn as_ms(self) -> i64 {
        self.0
    }

    /// The window containing `t_ms`, or `None` when that window's bounds do not fit in
    /// `i64` milliseconds (only within one window of `i64::MIN` or `i64::MAX`).
    pub fn window_of(self, t_ms: i64) -> Option<Window> {
        let start_ms = t_ms.div_euclid(self.0).checked_mul(self.0)?;
        let end_ms = start_ms.checked_add(self.0)?;
        Some(Window { start_ms, end_ms })
    }

    /// Whether `t_ms` is a window boundary (a multiple of the size).
    pub fn is_aligned(self, t_ms: i64) -> bool {
        t_ms.rem_euclid(self.0) == 0
    }

    /// Index of the window containing `t_ms` (`floor(t_ms / size)`); defined for every
    /// `i64`. Two times lie in the same window exactly when their indices are equal.
    pub fn index_of(self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.0)
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.0)
    }
}

/// One tumbling window, `[start_ms, end_ms)` in UTC milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    /// Inclusive start.
    pub start_ms: i64,
    /// Exclusive end.
    pub end_ms: i64,
}

impl Window {
    /// Whether `t_ms` lies in `[start_ms, end_ms)`.
    pub fn contains(&self, t_ms: i64) -> bool {
        self.start_ms <= t_ms && t_ms < self.end_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_divisors_of_fifteen_minutes() {
        for ok in [1, 1000, 60_000, 300_000, 900_000] {
            assert!(WindowSize::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            WindowSize::new(0),
            Err(WindowSizeError::NotPositive { size_ms: 0 })
        );
        assert!(WindowSize::new(-60_000).is_err());
        assert_eq!(
            WindowSize::new(7_000),
            Err(WindowSizeError::DoesNotDivideFifteenMinutes { size_ms: 7_000 })
        );
        assert!(WindowSize::new(1_800_000).is_err());
    }

    #[test]
    fn windows_of_negative_times_use_floor_division() {
        let size = WindowSize::ONE_MINUTE;
        let window = size.window_of(-1).expect("representable");
        assert_eq!(
            window,
            Window {
                start_ms: -60_000,
                end_ms: 0
            }
        );
        let window = size.window_of(-60_000).expect("representable");
        assert_eq!(
            window,
            Window {
                start_ms: -60_000,
                end_ms: 0
            }
        );
        let window = size.window_of(0).expect("representable");
        assert_eq!(
            window,
            Window {
                start_ms: 0,
                end_ms: 60_000
            }
        );
        let window = size.window_of(59_999).expect("representable");
        assert_eq!(window.start_ms, 0);
    }

    #[test]
    fn extreme_times_have_no_window_instead_of_overflowing() {
        let size = WindowSize::ONE_MINUTE;
        assert_eq!(size.window_of(i64::MAX), None);
        assert_eq!(size.window_of(i64::MIN), None);
        assert!(size.window_of(i64::MAX - 60_000 * 2).is_some());
    }
}
