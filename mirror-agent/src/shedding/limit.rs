//! One limit on a signal that mirroring raises (the live service's CPU pressure, the agent's
//! backlog): the share of new connections the kernel mirrors falls while the signal is above
//! its threshold and rises while it is below half of it.
//!
//! Why it does not oscillate: a cut scales the share by `0.8 × threshold / signal` (between a
//! quarter and 0.8), which brings a signal that grows with the share back under the threshold in
//! one or two steps; a rise multiplies the share by 1.25 at most, and only from under half the
//! threshold, so that it cannot by itself lift the signal above 0.625 of it. Between half and
//! the whole threshold the share holds. After a cut it holds `HOLD_AFTER_CUT` seconds, the time
//! shedding whole new connections takes to show.

use crate::cpu_budget::{keep_admitted, Rates, MIN_PPM};

/// Every connection (the kernel's `SAMPLE_ALL`).
const ALL: u32 = 1_000_000;
/// Seconds after a cut during which the share does not rise.
const HOLD_AFTER_CUT: u32 = 3;
/// Under this share of the threshold, the share rises.
const RISE_BELOW: f64 = 0.5;
/// A rise: by a quarter, and by one percentage point at least, so that the floor recovers.
const RISE: f64 = 1.25;
const RISE_AT_LEAST_PPM: f64 = 10_000.0;

#[derive(Debug)]
pub struct Limit {
    threshold: f64,
    max_ppm: u32,
    ppm: u32,
    hold: u32,
    /// Seconds over the threshold in a row.
    over: u32,
    keep_admitted: u32,
}

impl Limit {
    /// A limit at `threshold` (same unit as the signal, above 0) under the `--sample` share
    /// `max_ppm`.
    pub fn new(threshold: f64, max_ppm: u32) -> Limit {
        Limit {
            threshold,
            max_ppm,
            ppm: max_ppm,
            hold: 0,
            over: 0,
            keep_admitted: ALL,
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The rates this limit allows now.
    pub fn rates(&self) -> Rates {
        Rates {
            new: self.ppm,
            keep_admitted: self.keep_admitted,
        }
    }

    /// Takes one second's signal. `admitted_carry_load`: most of the second's mirrored
    /// segments were of long-lived connections, which shedding new ones does not relieve; after
    /// `MUST_DROP_AFTER` seconds over in a row those the current share would not admit are
    /// dropped too, each for the rest of its life.
    pub fn observe(&mut self, signal: f64, admitted_carry_load: bool) -> Rates {
        let floor = MIN_PPM.min(self.max_ppm);
        // At the floor already, shedding new connections has done all it can: what still
        // keeps the signal over is admitted load, whatever its connections' measured age (a
        // starved reader that loses records sees its connections restart all the time).
        let carried = admitted_carry_load || self.ppm == floor;
        if signal > self.threshold {
            let factor = (0.8 * self.threshold / signal).clamp(0.25, 0.8);
            self.ppm = ((f64::from(self.ppm) * factor) as u32).max(floor);
            self.hold = HOLD_AFTER_CUT;
            self.over += 1;
        } else {
            self.over = 0;
            self.hold = self.hold.saturating_sub(1);
            if signal < RISE_BELOW * self.threshold && self.hold == 0 {
                let ppm = f64::from(self.ppm);
                let up = (ppm * RISE).max(ppm + RISE_AT_LEAST_PPM);
                self.ppm = (up as u32).min(self.max_ppm);
            }
        }
        self.keep_admitted = keep_admitted(self.over, carried, self.ppm, self.keep_admitted);
        self.rates()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_budget::MUST_DROP_AFTER;

    const T: f64 = 0.1;

    /// A live service whose CPU pressure is `base` plus what mirroring adds in proportion to
    /// the share mirrored (`full` at every connection), taking effect a second late (new
    /// connections replace old ones), plus noise of ±`noise` from a fixed sequence.
    struct Plant {
        base: f64,
        full: f64,
        noise: f64,
        seen_share: f64,
        seed: u64,
    }

    impl Plant {
        fn new(base: f64, full: f64, noise: f64) -> Plant {
            Plant {
                base,
                full,
                noise,
                seen_share: 1.0,
                seed: 7,
            }
        }

        fn pressure(&mut self, share_now: f64) -> f64 {
            self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let unit = (self.seed >> 33) as f64 / (1u64 << 31) as f64;
            let p = self.base + self.full * self.seen_share + self.noise * (2.0 * unit - 1.0);
            self.seen_share = share_now;
            p.max(0.0)
        }
    }

    /// Runs `seconds` of the loop; returns the share after each.
    fn run(limit: &mut Limit, plant: &mut Plant, seconds: usize) -> Vec<f64> {
        (0..seconds)
            .map(|_| {
                let share = f64::from(limit.rates().new) / 1e6;
                let p = plant.pressure(share);
                f64::from(limit.observe(p, false).new) / 1e6
            })
            .collect()
    }

    #[test]
    fn an_idle_or_merely_busy_service_is_never_shed() {
        let mut limit = Limit::new(T, ALL);
        // Pressure that stays under the threshold, mirroring's part included.
        let shares = run(&mut limit, &mut Plant::new(0.02, 0.05, 0.02), 300);
        assert!(shares.iter().all(|s| *s == 1.0), "{shares:?}");
        assert_eq!(limit.rates().keep_admitted, ALL);
    }

    #[test]
    fn pressure_that_mirroring_raises_settles_under_the_threshold_without_oscillating() {
        for (base, full) in [(0.0, 0.3), (0.03, 0.5), (0.06, 1.0), (0.0, 5.0)] {
            let mut limit = Limit::new(T, ALL);
            let mut plant = Plant::new(base, full, 0.01);
            let settle = run(&mut limit, &mut plant, 60);
            let steady = run(&mut limit, &mut plant, 240);
            let cuts = steady.windows(2).filter(|w| w[1] < w[0]).count();
            let (lo, hi) = steady
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
            let pressure_at_hi = base + full * hi;
            assert!(
                cuts <= 2 && hi / lo <= 1.6 && pressure_at_hi <= T * 1.25,
                "base {base} full {full}: {cuts} cuts in steady state, share {lo}..{hi}; \
                 settling {settle:?}, steady {steady:?}"
            );
            // It keeps what the spare CPU allows, not the floor.
            assert!(
                pressure_at_hi >= T * 0.35,
                "base {base} full {full}: share {hi}"
            );
        }
    }

    #[test]
    fn pressure_that_is_not_mirrorings_keeps_the_floor_and_recovery_is_full() {
        let mut limit = Limit::new(T, ALL);
        // A hog in the live service: pressure far above the threshold whatever is mirrored.
        let mut plant = Plant::new(0.6, 0.03, 0.01);
        let hog = run(&mut limit, &mut plant, 20);
        assert_eq!(limit.rates().new, MIN_PPM, "{hog:?}");
        // The hog stops: the share comes back whole, within half a minute.
        plant.base = 0.0;
        let after = run(&mut limit, &mut plant, 30);
        let back = after.iter().position(|s| *s == 1.0);
        assert!(back.is_some_and(|s| s < 30), "{after:?}");
    }

    #[test]
    fn long_lived_connections_are_dropped_only_after_sustained_pressure() {
        let mut limit = Limit::new(T, ALL);
        for second in 1..=MUST_DROP_AFTER + 1 {
            let r = limit.observe(0.5, true);
            if second < MUST_DROP_AFTER {
                assert_eq!(r.keep_admitted, ALL, "second {second}");
            } else {
                assert_eq!(r.keep_admitted, r.new, "second {second}");
            }
        }
        // Short connections carry the load: admitted ones stay while the share can still fall,
        // and go once it is at the floor and the signal still over.
        let mut short = Limit::new(T, ALL);
        let mut seconds = 0;
        while short.rates().new > MIN_PPM {
            assert_eq!(short.observe(0.5, false).keep_admitted, ALL);
            seconds += 1;
        }
        assert!(seconds >= MUST_DROP_AFTER, "{seconds}");
        assert_eq!(short.observe(0.5, false).keep_admitted, MIN_PPM);
        // Once under the threshold, admitted connections are kept again.
        assert_eq!(limit.observe(0.0, true).keep_admitted, ALL);
    }

    #[test]
    fn the_sample_share_is_the_ceiling() {
        let mut limit = Limit::new(T, 200_000);
        for _ in 0..50 {
            limit.observe(0.0, false);
        }
        assert_eq!(limit.rates().new, 200_000);
        limit.observe(10.0, false);
        assert_eq!(limit.rates().new, 50_000);
    }
}
