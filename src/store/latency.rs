//! Store latency for `/metrics`: a Prometheus histogram of the time each store operation takes
//! (waiting for a pooled connection included), per kind of operation, and a count of the
//! operations that failed.
//!
//! Lock-free: one atomic add per bucket touched, so timing every query costs next to nothing.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kind of a store operation, a low-cardinality metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A query that only reads.
    Read,
    /// A statement or transaction that writes (accounts, sessions, flows, keys, responses).
    Write,
    /// One batch of the event writer (execution events, decisions, conversations).
    Events,
}

impl Op {
    const ALL: [Op; 3] = [Op::Read, Op::Write, Op::Events];

    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Events => "events",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the histogram buckets, in microseconds (`+Inf` is implied): from an
/// in-process SQLite read to a slow remote write.
const BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
    errors: AtomicU64,
}

/// Latency of every store operation since start.
#[derive(Debug, Default)]
pub struct Latency {
    ops: [Histogram; Op::ALL.len()],
}

impl Latency {
    pub fn observe(&self, op: Op, took: Duration, failed: bool) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let histogram = &self.ops[op.index()];
        let bucket = BOUNDS_US.partition_point(|&bound| bound < us);
        histogram.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        histogram.count.fetch_add(1, Ordering::Relaxed);
        histogram.sum_us.fetch_add(us, Ordering::Relaxed);
        if failed {
            histogram.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends the histogram and the error counts in Prometheus text format.
    pub fn render(&self, engine: &str, out: &mut String) {
        let name = "computetower_store_query_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time of store operations, waiting for a connection included."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for op in Op::ALL {
            let histogram = &self.ops[op.index()];
            let labels = format!("engine=\"{engine}\",op=\"{}\"", op.label());
            let mut cumulative = 0;
            for (i, bucket) in histogram.buckets.iter().enumerate() {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = BOUNDS_US
                    .get(i)
                    .map_or("+Inf".to_owned(), |&us| (us as f64 / 1e6).to_string());
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
        let errors = "computetower_store_errors_total";
        let _ = writeln!(out, "# TYPE {errors} counter");
        for op in Op::ALL {
            let count = self.ops[op.index()].errors.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{errors}{{engine=\"{engine}\",op=\"{}\"}} {count}",
                op.label()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
    }

    #[test]
    fn buckets_are_cumulative_per_kind_and_failures_are_counted() {
        let latency = Latency::default();
        latency.observe(Op::Read, Duration::from_micros(80), false);
        latency.observe(Op::Read, Duration::from_micros(100), false);
        latency.observe(Op::Read, Duration::from_millis(3), true);
        latency.observe(Op::Events, Duration::from_secs(9), false);
        let mut out = String::new();
        latency.render("sqlite", &mut out);
        let read = "computetower_store_query_seconds_bucket{engine=\"sqlite\",op=\"read\"";
        assert!(line(&out, &format!("{read},le=\"0.0001\"}}")).ends_with(" 2"));
        assert!(line(&out, &format!("{read},le=\"0.0025\"}}")).ends_with(" 2"));
        assert!(line(&out, &format!("{read},le=\"0.005\"}}")).ends_with(" 3"));
        assert!(line(&out, &format!("{read},le=\"+Inf\"}}")).ends_with(" 3"));
        assert!(
            line(
                &out,
                "computetower_store_query_seconds_count{engine=\"sqlite\",op=\"read\"}"
            )
            .ends_with(" 3")
        );
        let events = "computetower_store_query_seconds_bucket{engine=\"sqlite\",op=\"events\"";
        assert!(line(&out, &format!("{events},le=\"2.5\"}}")).ends_with(" 0"));
        assert!(line(&out, &format!("{events},le=\"+Inf\"}}")).ends_with(" 1"));
        assert!(
            line(
                &out,
                "computetower_store_query_seconds_sum{engine=\"sqlite\",op=\"events\"}"
            )
            .ends_with(" 9")
        );
        assert!(
            line(
                &out,
                "computetower_store_errors_total{engine=\"sqlite\",op=\"read\"}"
            )
            .ends_with(" 1")
        );
        assert!(
            line(
                &out,
                "computetower_store_errors_total{engine=\"sqlite\",op=\"write\"}"
            )
            .ends_with(" 0")
        );
    }
}
