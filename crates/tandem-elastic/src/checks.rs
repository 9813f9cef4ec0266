//! When a commit looks for processes waiting to join. Looking costs a rendezvous round trip and an
//! allreduce; on every commit of a fast loop that is most of a step. So members look about every
//! [`PERIOD`], at commit numbers they agreed on when they last looked: each proposes how many
//! commits make a period at the rate it measured, and the allreduce that shares "someone waits"
//! also takes the largest proposal. Every member thus looks at the same commits, and a joiner waits
//! about a period more, at most.

use std::time::{Duration, Instant};

/// How often members look for waiting processes.
pub const PERIOD: Duration = Duration::from_millis(100);

/// Most commits between two looks (a very fast loop still lets joiners in).
pub const MAX_COMMITS: u64 = 1000;

/// The agreed commits at which to look, and when the last look happened.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    next: u64,
    last: Option<(Instant, u64)>,
}

impl Checks {
    /// After a (re-)formation, at `commits` commits (the same on every member after the sync):
    /// look at the next commit.
    pub fn reset(&mut self, commits: u64) {
        self.next = commits + 1;
        self.last = None;
    }

    /// Whether the commit that made `commits` commits must look.
    pub fn due(&self, commits: u64) -> bool {
        commits >= self.next
    }

    /// This member's proposal at a look at `commits`: how many commits make a [`PERIOD`] at the
    /// rate measured since the last look (1 at the first look), between 1 and [`MAX_COMMITS`].
    pub fn propose(&mut self, commits: u64) -> u64 {
        let now = Instant::now();
        let k = match self.last {
            Some((then, at)) if commits > at => {
                let per = now.duration_since(then).as_secs_f64() / (commits - at) as f64;
                if per > 0.0 {
                    (PERIOD.as_secs_f64() / per) as u64
                } else {
                    MAX_COMMITS
                }
            }
            _ => 1,
        };
        self.last = Some((now, commits));
        k.clamp(1, MAX_COMMITS)
    }

    /// Every member agreed at `commits` to look again `k` commits later.
    pub fn agreed(&mut self, commits: u64, k: u64) {
        self.next = commits + k.clamp(1, MAX_COMMITS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_commit_after_a_formation_looks_then_the_agreed_one() {
        let mut c = Checks::default();
        c.reset(7);
        assert!(!c.due(7));
        assert!(c.due(8));
        assert_eq!(c.propose(8), 1, "no rate measured yet");
        c.agreed(8, 5);
        assert!(!c.due(12));
        assert!(c.due(13));
        c.agreed(13, 0);
        assert!(c.due(14), "at least the next commit");
        c.agreed(14, u64::MAX);
        assert!(!c.due(14 + MAX_COMMITS - 1));
        assert!(c.due(14 + MAX_COMMITS));
    }

    #[test]
    fn a_proposal_is_a_period_at_the_measured_rate_within_bounds() {
        let mut c = Checks::default();
        c.reset(0);
        assert_eq!(c.propose(1), 1);
        std::thread::sleep(Duration::from_millis(20));
        // 10 commits in >= 20 ms: >= 2 ms each, so a period is at most 50 commits.
        let k = c.propose(11);
        assert!((1..=50).contains(&k), "{k}");
        // No commit since the last look: nothing measured.
        assert_eq!(c.propose(11), 1);
        // Commits far faster than a period: capped.
        let k = c.propose(11 + 10 * MAX_COMMITS);
        assert_eq!(k, MAX_COMMITS);
    }
}
