//! Counters declared once. A stage declares its counters with `stage_counters!`: each field
//! with its metric's name, its label when several fields are the parts of one family (drop
//! reasons, error kinds), and its help. From that one declaration come the stats struct the
//! stage counts in, the Prometheus families on `/metrics`, the exit summary, and through the
//! test that compares `/metrics` with it, `deploy/metrics.txt`. Depends on nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One declared counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Declared {
    /// The stats field, as the exit summary names it.
    pub field: &'static str,
    pub metric: &'static str,
    /// The label that tells this part of `metric` apart (`reason`, `kind`), and its value.
    pub label: Option<(&'static str, &'static str)>,
    pub kind: Kind,
    /// The family's help, given on its first part only (empty on the others).
    pub help: &'static str,
}

/// A counter's storage: a plain number where one thread owns the stage, an atomic where
/// several count.
pub trait Read {
    fn read(&self) -> u64;
}

impl Read for u64 {
    fn read(&self) -> u64 {
        *self
    }
}

impl Read for AtomicU64 {
    fn read(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Read for AtomicUsize {
    fn read(&self) -> u64 {
        self.load(Ordering::Relaxed) as u64
    }
}

/// A stage's counters, as `stage_counters!` declares them.
pub trait Counters {
    const DECLARED: &'static [Declared];
    /// The values now, in `DECLARED`'s order.
    fn values(&self) -> Vec<u64>;

    /// `field=value` for each counter, for the exit log.
    fn summary(&self) -> String {
        Self::DECLARED
            .iter()
            .zip(self.values())
            .map(|(d, v)| format!("{}={v}", d.field))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Declares a stage's stats struct and its counters' metrics in one place:
///
/// ```
/// mirror_core::stage_counters! {
///     #[derive(Debug, Default)]
///     pub struct ExampleStats {
///         /// Requests seen.
///         pub requests: u64 => Counter "mirror_example_requests" "Requests seen",
///         pub dropped_gap: u64 => Counter "mirror_example_dropped" [reason = "gap"] "Requests dropped, by reason",
///         pub dropped_memory: u64 => Counter "mirror_example_dropped" [reason = "memory"],
///         pub held: u64 => Gauge "mirror_example_held" "Bytes held now",
///         /// Not exported.
///         scratch: u64,
///     }
/// }
/// use mirror_core::counters::Counters;
/// let s = ExampleStats { requests: 2, ..Default::default() };
/// assert_eq!(s.summary(), "requests=2 dropped_gap=0 dropped_memory=0 held=0");
/// assert_eq!(ExampleStats::DECLARED[1].label, Some(("reason", "gap")));
/// assert_eq!(ExampleStats::DECLARED[2].help, "");
/// ```
#[macro_export]
macro_rules! stage_counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty
                $(=> $kind:ident $metric:literal $([$lk:ident = $lv:literal])? $($help:literal)?)?,
            )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::counters::Counters for $name {
            const DECLARED: &'static [$crate::counters::Declared] = &[
                $($(
                    $crate::counters::Declared {
                        field: stringify!($field),
                        metric: $metric,
                        label: $crate::stage_counters!(@label $($lk $lv)?),
                        kind: $crate::counters::Kind::$kind,
                        help: $crate::stage_counters!(@help $($help)?),
                    },
                )?)*
            ];

            fn values(&self) -> Vec<u64> {
                vec![$($(
                    {
                        let _: &str = $metric;
                        $crate::counters::Read::read(&self.$field)
                    },
                )?)*]
            }
        }
    };
    (@label) => { None };
    (@label $k:ident $v:literal) => { Some((stringify!($k), $v)) };
    (@help) => { "" };
    (@help $h:literal) => { $h };
}

/// Checks a declaration: each family's help given on its first part, and only there.
pub fn check_declared(declared: &[Declared]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for d in declared {
        let first = seen.insert(d.metric);
        if first == d.help.is_empty() {
            return Err(format!(
                "{} ({}): help belongs on the family's first part, and only there",
                d.metric, d.field
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::stage_counters! {
        #[derive(Default)]
        struct Sample {
            a: u64 => Counter "m_a" "A",
            b: AtomicU64 => Counter "m_drop" [reason = "b"] "Dropped",
            c: AtomicUsize => Gauge "m_c" "C",
            hidden: u64,
        }
    }

    #[test]
    fn the_declaration_makes_fields_metrics_and_summary() {
        let s = Sample {
            a: 3,
            hidden: 9,
            ..Default::default()
        };
        s.b.store(4, Ordering::Relaxed);
        s.c.store(5, Ordering::Relaxed);
        assert_eq!(s.values(), [3, 4, 5]);
        assert_eq!(s.summary(), "a=3 b=4 c=5");
        let names: Vec<_> = Sample::DECLARED.iter().map(|d| d.metric).collect();
        assert_eq!(names, ["m_a", "m_drop", "m_c"]);
        assert_eq!(Sample::DECLARED[1].label, Some(("reason", "b")));
        assert_eq!(Sample::DECLARED[2].kind, Kind::Gauge);
        assert_eq!(s.hidden, 9);
    }
}
