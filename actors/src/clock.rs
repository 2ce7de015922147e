//! The one clock of the runtime's control plane and actor shells.
//!
//! Every deadline, timeout and lease of a node is measured with [`now`], which reads tokio's
//! clock: in a normal runtime that is the system's monotonic clock (`std::time::Instant::now`),
//! and in the simulation tier — a current-thread runtime with a paused clock — it is virtual
//! time, so the same node code runs hours of failure detection, leases and retries in
//! milliseconds, deterministically. Reading `std::time::Instant::now()` directly in a shell or
//! a node loop would mix the two clocks (a simulated node would never time anything out).
//!
//! [`unix_us`] gives wall-clock microseconds on the same clock: the Unix time read once per
//! process plus the monotonic time since, so stamps taken in one process never go backwards
//! and, under a paused clock, advance with virtual time.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The current instant on tokio's clock (virtual under a paused runtime; the system's
/// monotonic clock otherwise and outside a runtime).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Microseconds since the Unix epoch on [`now`]'s clock (see the [module docs](self)).
pub fn unix_us() -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, unix_us) = *BASE.get_or_init(|| {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        (std::time::Instant::now(), unix)
    });
    unix_us.saturating_add(u64::try_from(now().saturating_duration_since(at).as_micros()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch on [`now`]'s clock.
pub fn unix_ms() -> u64 {
    unix_us() / 1000
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_paused_runtime_moves_both_clocks_virtually() {
        let (t0, u0) = (now(), unix_us());
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(now().duration_since(t0) >= Duration::from_secs(3600));
        // Within a second: the Unix base is read on the system clock, which may be a few µs
        // ahead of the paused one if this is the process's first reading.
        let moved = unix_us() - u0;
        assert!((3_599_000_000..3_601_000_000).contains(&moved), "{moved} µs");
    }

    #[test]
    fn outside_a_runtime_it_is_the_system_clock() {
        let before = Instant::now();
        let t = now();
        assert!(t >= before && t <= Instant::now());
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        assert!(unix_us().abs_diff(wall) < 2_000_000, "within the clock's drift since the first read");
    }
}
