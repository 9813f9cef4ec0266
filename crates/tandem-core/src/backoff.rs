//! Retry delays with a deadline: every loop in Tandem that retries a connection or a call (the ring
//! mesh, the rendezvous client, the parameter-server client) takes its delays from one
//! [`Backoff`], so they all double the same way, cap the same way, and never sleep past their
//! deadline. Pure: it computes delays and the caller sleeps (in tokio or not).

use std::time::{Duration, Instant};

/// Delays between attempts: `first`, doubling up to `max`, while an attempt after the delay would
/// still start before `deadline`.
///
/// ```
/// use std::time::{Duration, Instant};
/// use tandem_core::Backoff;
/// let start = Instant::now();
/// let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(25), start + Duration::from_secs(1));
/// assert_eq!(b.next_delay_at(start), Some(Duration::from_millis(10)));
/// assert_eq!(b.next_delay_at(start), Some(Duration::from_millis(20)));
/// assert_eq!(b.next_delay_at(start), Some(Duration::from_millis(25)));
/// // Too close to the deadline for another attempt: give up.
/// assert_eq!(b.next_delay_at(start + Duration::from_millis(990)), None);
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Instant,
}

impl Backoff {
    /// Delays from `first` doubling up to `max`, until `deadline`.
    pub fn new(first: Duration, max: Duration, deadline: Instant) -> Self {
        Backoff {
            next: first.min(max),
            max,
            deadline,
        }
    }

    /// The delay before the next attempt, or `None` when the attempt would start at or after the
    /// deadline (then the caller reports its timeout).
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.next_delay_at(Instant::now())
    }

    /// [`Backoff::next_delay`] as seen at `now`.
    pub fn next_delay_at(&mut self, now: Instant) -> Option<Duration> {
        if now + self.next >= self.deadline {
            return None;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_and_stop_before_the_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(40), t0 + ms(100));
        let got: Vec<Option<Duration>> = (0..4).map(|_| b.next_delay_at(t0)).collect();
        assert_eq!(
            got,
            vec![Some(ms(10)), Some(ms(20)), Some(ms(40)), Some(ms(40))]
        );
        // An attempt exactly at the deadline is not made; one just before it is.
        let mut b = Backoff::new(ms(10), ms(40), t0 + ms(100));
        assert_eq!(b.next_delay_at(t0 + ms(90)), None);
        assert_eq!(b.next_delay_at(t0 + ms(89)), Some(ms(10)));
        // A first delay above the cap is capped.
        let mut b = Backoff::new(ms(500), ms(40), t0 + ms(100));
        assert_eq!(b.next_delay_at(t0), Some(ms(40)));
        // A deadline already passed gives up at once.
        let mut b = Backoff::new(ms(1), ms(1), t0);
        assert_eq!(b.next_delay_at(t0), None);
    }

    #[test]
    fn the_wall_clock_forms_agree_with_the_explicit_ones() {
        let ms = Duration::from_millis;
        let later = Instant::now() + Duration::from_secs(3600);
        let mut b = Backoff::new(ms(7), ms(9), later);
        assert_eq!(b.next_delay(), Some(ms(7)));
        assert_eq!(b.next_delay(), Some(ms(9)));
        assert!(b.remaining() > Duration::from_secs(3500));
        assert_eq!(b.deadline(), later);
        let mut gone = Backoff::new(ms(7), ms(9), Instant::now());
        assert_eq!(gone.next_delay(), None);
        assert_eq!(gone.remaining(), Duration::ZERO);
    }
}
