//! How long to wait before trying again: a task after a transient error (exponential
//! backoff with jitter computed by `backon`, unless the provider said when), and the engine's
//! own loops after a database error.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// Delay before attempt `attempt + 1`, after `attempt` attempts failed (attempt ≥ 1). A
/// `Retry-After` from the provider wins, capped at `max_ms`.
pub fn delay(config: &RetryConfig, attempt: i32, retry_after: Option<Duration>) -> Duration {
    let max = Duration::from_millis(config.max_ms);
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let mut builder = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(config.base_ms))
        .with_max_delay(max)
        .with_factor(config.factor)
        .without_max_times();
    if config.jitter {
        builder = builder.with_jitter();
    }
    let n = attempt.max(1) as usize - 1;
    let d = builder.build().nth(n).unwrap_or(max).min(max * 2);
    // Whole milliseconds: the float arithmetic inside gives 200.000003 ms for 200 ms.
    Duration::from_millis(d.as_millis() as u64)
}

/// Pause of the engine's own loops (claim, write, scheduler pass, LISTEN) after
/// `failures_in_a_row` database errors: 100 ms doubling to 5 s, ±20%.
pub fn pause_after_db_errors(failures_in_a_row: u32) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << failures_in_a_row.min(6));
    jittered(Duration::from_millis(ms.min(5_000)))
}

/// ±20%, so that a fleet started together does not poll in lockstep.
pub fn jittered(d: Duration) -> Duration {
    let f: f64 = rand::random_range(0.8..1.2);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(jitter: bool) -> RetryConfig {
        RetryConfig {
            base_ms: 100,
            max_ms: 10_000,
            factor: 2.0,
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let c = cfg(false);
        assert_eq!(delay(&c, 1, None), Duration::from_millis(100));
        assert_eq!(delay(&c, 2, None), Duration::from_millis(200));
        assert_eq!(delay(&c, 4, None), Duration::from_millis(800));
        assert_eq!(delay(&c, 30, None), Duration::from_millis(10_000));
    }

    #[test]
    fn jitter_stays_within_one_extra_step() {
        let c = cfg(true);
        for _ in 0..100 {
            let d = delay(&c, 2, None);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_wins() {
        let c = cfg(false);
        assert_eq!(
            delay(&c, 1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            delay(&c, 1, Some(Duration::from_secs(300))),
            Duration::from_secs(10)
        );
    }
}
