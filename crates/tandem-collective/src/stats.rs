//! Straggler detection: which peer starts each collective last, and how late, seen from this rank.
//!
//! Each rank starts an operation by sending its header and reading its peers' (the left neighbour's
//! on the ring; every peer's for one-hop operations). The time between this rank's start and the last
//! header's arrival is how much later that peer arrived. A peer that is late in most of a window of
//! operations is named in a log line.

use std::time::Duration;

/// Lateness below this is noise.
pub const LATE_THRESHOLD: Duration = Duration::from_millis(2);

/// A finding: `rank` started `late` of the last `window` operations after us, by `median` (median).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Straggler {
    /// The late rank.
    pub rank: usize,
    /// How many operations of the window it was late for.
    pub late: usize,
    /// The window size.
    pub window: usize,
    /// Median lateness over the late operations.
    pub median: Duration,
}

/// Collects the left neighbour's lateness over windows of operations.
#[derive(Debug, Clone)]
pub struct Stragglers {
    /// Operations per window.
    window: usize,
    /// The window's samples: who was late, and by how much.
    samples: Vec<(usize, Duration)>,
}

impl Stragglers {
    /// A tracker that reports once per `window` operations.
    pub fn new(window: usize) -> Self {
        Stragglers {
            window: window.max(1),
            samples: Vec::new(),
        }
    }

    /// Records one operation (the last peer and its lateness); at the end of a window returns a
    /// finding if one peer was late in more than half of it.
    pub fn record(&mut self, peer: usize, lateness: Duration) -> Option<Straggler> {
        self.samples.push((peer, lateness));
        if self.samples.len() < self.window {
            return None;
        }
        let late: Vec<(usize, Duration)> = self
            .samples
            .drain(..)
            .filter(|(_, d)| *d >= LATE_THRESHOLD)
            .collect();
        let mut counts: std::collections::BTreeMap<usize, Vec<Duration>> =
            std::collections::BTreeMap::new();
        for (p, d) in late {
            counts.entry(p).or_default().push(d);
        }
        let (rank, mut times) = counts.into_iter().max_by_key(|(_, v)| v.len())?;
        if times.len() * 2 <= self.window {
            return None;
        }
        times.sort();
        Some(Straggler {
            rank,
            late: times.len(),
            window: self.window,
            median: times[times.len() / 2],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_neighbour_late_in_most_operations() {
        let mut s = Stragglers::new(4);
        let ms = Duration::from_millis;
        assert_eq!(s.record(2, ms(50)), None);
        assert_eq!(s.record(2, ms(0)), None);
        assert_eq!(s.record(2, ms(30)), None);
        let f = s.record(2, ms(40)).expect("late in 3 of 4");
        assert_eq!((f.rank, f.late, f.window, f.median), (2, 3, 4, ms(40)));
        for _ in 0..3 {
            assert_eq!(s.record(2, ms(0)), None);
        }
        assert_eq!(
            s.record(2, ms(90)),
            None,
            "late once in 4 is not a straggler"
        );
    }
}
