//! Exact counts from a counter's raw samples, and quantiles from summed histogram buckets.
//!
//! Prometheus's `increase()` extrapolates to the window's edges: right for a rate, off by a
//! fraction of a request for a count. The table counts requests, so it adds up the samples'
//! own steps instead, taking a drop as a restart (the counter began again at zero).

/// A counter's value, and the start time of the process that counted it when it is known
/// (`process_start_time_seconds`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub value: f64,
    pub started: Option<f64>,
}

/// What a counter added over a window: `before` is its last point before the window (None: the
/// series began inside it, from zero), `inside` its points inside the window, oldest first.
///
/// A new process is a restart even when its counter has already climbed past the old one's
/// last value by its first scrape; without start times, only a drop shows a restart.
pub fn increase(before: Option<Point>, inside: &[Point]) -> f64 {
    let mut total = 0.0;
    let mut last = before.unwrap_or(Point {
        value: 0.0,
        started: None,
    });
    for &p in inside {
        let restarted = matches!((last.started, p.started), (Some(a), Some(b)) if a != b);
        // After a restart everything the counter holds is new.
        total += if restarted || p.value < last.value {
            p.value
        } else {
            p.value - last.value
        };
        last = p;
    }
    total
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count), sorted by bound
/// and ending with +Inf, interpolated as Prometheus's `histogram_quantile` does: linearly
/// inside the bucket that holds the rank, from 0 for the first bucket; a rank in +Inf gives the
/// highest finite bound. None without observations.
pub fn quantile(q: f64, cumulative: &[(f64, f64)]) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (i, &(le, count)) in cumulative.iter().enumerate() {
        if count >= rank {
            if le.is_infinite() {
                return Some(if i == 0 { 0.0 } else { cumulative[i - 1].0 });
            }
            let (start, below) = lower;
            let inside = count - below;
            if inside <= 0.0 {
                return Some(le);
            }
            return Some(start + (le - start) * (rank - below) / inside);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[f64]) -> Vec<Point> {
        values
            .iter()
            .map(|&value| Point {
                value,
                started: None,
            })
            .collect()
    }

    #[test]
    fn a_counter_that_began_inside_the_window_counts_from_zero() {
        assert_eq!(increase(None, &points(&[3.0, 5.0, 5.0, 9.0])), 9.0);
    }

    #[test]
    fn a_counter_that_ran_before_counts_from_its_last_value() {
        let before = Some(points(&[100.0])[0]);
        assert_eq!(increase(before, &points(&[100.0, 104.0, 110.0])), 10.0);
        assert_eq!(increase(before, &[]), 0.0);
    }

    #[test]
    fn a_restart_neither_goes_back_nor_jumps() {
        // 100 → 110 (10), restart, 4 → 7 (4 + 3).
        let before = Some(points(&[100.0])[0]);
        assert_eq!(increase(before, &points(&[110.0, 4.0, 7.0])), 17.0);
        // Restarted between the value before the window and the first inside it.
        assert_eq!(
            increase(Some(points(&[50.0])[0]), &points(&[2.0, 6.0])),
            6.0
        );
    }

    #[test]
    fn a_restart_that_counted_past_the_old_value_is_told_by_the_start_time() {
        let at = |value, started| Point {
            value,
            started: Some(started),
        };
        // The first process counted 6 and stopped; the second counted 6 before its first scrape.
        assert_eq!(
            increase(None, &[at(6.0, 10.0), at(6.0, 10.0), at(6.0, 50.0)]),
            12.0
        );
        assert_eq!(
            increase(None, &[at(6.0, 10.0), at(9.0, 50.0), at(11.0, 50.0)]),
            17.0
        );
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket_as_prometheus_does() {
        let h = [
            (0.1, 50.0),
            (0.5, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        // Rank 50 is the top of the first bucket, 0 to 0.1.
        assert!((quantile(0.5, &h).unwrap() - 0.1).abs() < 1e-12);
        // Rank 25: halfway into the first bucket.
        assert!((quantile(0.25, &h).unwrap() - 0.05).abs() < 1e-12);
        // Rank 99: 9 of the 10 in (0.5, 1].
        assert!((quantile(0.99, &h).unwrap() - 0.95).abs() < 1e-12);
        let tail = [(0.1, 10.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(0.99, &tail), Some(0.1));
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
    }
}
