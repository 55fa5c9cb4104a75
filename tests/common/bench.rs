//! What the benchmarks (benches/) share: knobs from the environment, medians,
//! flushing the disks before a timed pull.

use std::process::Command;
use std::time::Duration;

/// `name` from the environment as a number, or `default` when unset.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
        Err(_) => default,
    }
}

/// The median in seconds (the mean of the middle two for an even count).
pub fn median(times: &[Duration]) -> f64 {
    median_f64(times.iter().map(Duration::as_secs_f64).collect())
}

pub fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Flushes dirty pages (the previous pull's blobs and files) before a timed pull.
pub fn sync_disks() {
    super::must(super::run(&mut Command::new("sync")));
}
