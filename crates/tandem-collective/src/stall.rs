//! Who a stalled operation is really waiting for.
//!
//! The rank whose operation times out first is rarely the culprit: in a ring every rank waits on its
//! left neighbour, so a rank cut off from the network makes its right neighbour wait, which makes
//! the next one wait, and the first timer to fire belongs to whichever rank started first. So a
//! timeout is not reported at once. The rank asks every other rank, through the rendezvous, what it
//! is doing ([`Progress`], kept up to date by each operation and answered by a watcher task even
//! while the rank is busy in its own code), waits a short grace for the answers, and
//! [`diagnose`]s: a rank that does not answer (killed, stopped, partitioned) is the culprit; else
//! a rank that has not started the operation (busy elsewhere: a straggler, or stuck in user code);
//! else the end of the chain of ranks waiting on each other, or the cycle they form (two ranks each
//! blocked receiving from the other).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::backend::ops::Waiting;

/// [`Waiting`] shared between the thread running an operation and the watcher answering for it.
#[derive(Debug)]
pub struct WaitCell(AtomicU64);

/// The rank waits on no one.
const NOTHING: u64 = 0;
/// The rank waits for a peer's header (the peer in the low bits).
const HEADER: u64 = 1 << 62;
/// The rank waits for a peer's data (the peer in the low bits).
const DATA: u64 = 2 << 62;
/// The bits holding the peer.
const PEER: u64 = (1 << 62) - 1;

impl WaitCell {
    /// Waiting for nothing.
    pub fn new() -> Self {
        WaitCell(AtomicU64::new(NOTHING))
    }

    /// What the operation waits for now.
    pub fn get(&self) -> Waiting {
        let v = self.0.load(Ordering::Relaxed);
        let peer = (v & PEER) as usize;
        match v & !PEER {
            HEADER => Waiting::Header(peer),
            DATA => Waiting::Data(peer),
            _ => Waiting::Nothing,
        }
    }

    /// Records what the operation waits for next.
    pub fn set(&self, w: Waiting) {
        let v = match w {
            Waiting::Header(p) => HEADER | (p as u64 & PEER),
            Waiting::Data(p) => DATA | (p as u64 & PEER),
            Waiting::Nothing => NOTHING,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

impl Default for WaitCell {
    fn default() -> Self {
        Self::new()
    }
}

/// What a rank is doing, readable from any thread.
#[derive(Debug)]
pub struct Progress {
    /// Collectives started (the current one included).
    started: AtomicU64,
    /// Whether the rank is inside an operation.
    in_op: AtomicBool,
    /// What the current operation waits for.
    pub waiting: WaitCell,
    /// When the rank entered its current state (in an operation, or out of one).
    since_ms: AtomicU64,
    /// When the record began: its times are milliseconds since.
    epoch: Instant,
}

impl Progress {
    /// A rank that has done nothing yet.
    pub fn new() -> Self {
        Progress {
            started: AtomicU64::new(0),
            in_op: AtomicBool::new(false),
            waiting: WaitCell::new(),
            since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the progress record began.
    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Milliseconds from the record's beginning to `t`.
    fn ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// An operation starts; `collectives` is how many collectives have started with it.
    pub fn begin(&self, collectives: u64) {
        self.begin_at(collectives, Instant::now());
    }

    /// [`Progress::begin`] at `t`, the clock already read.
    pub fn begin_at(&self, collectives: u64, t: Instant) {
        self.waiting.set(Waiting::Nothing);
        self.started.store(collectives, Ordering::Relaxed);
        self.since_ms.store(self.ms_at(t), Ordering::Relaxed);
        self.in_op.store(true, Ordering::Release);
    }

    /// The operation ended.
    pub fn end(&self) {
        self.end_at(Instant::now());
    }

    /// [`Progress::end`] at `t`, the clock already read.
    pub fn end_at(&self, t: Instant) {
        self.waiting.set(Waiting::Nothing);
        self.since_ms.store(self.ms_at(t), Ordering::Relaxed);
        self.in_op.store(false, Ordering::Release);
    }

    /// The state now.
    pub fn state(&self) -> RankState {
        let in_op = self.in_op.load(Ordering::Acquire);
        RankState {
            started: self.started.load(Ordering::Relaxed),
            in_op,
            waiting: self.waiting.get(),
            ms: self
                .now_ms()
                .saturating_sub(self.since_ms.load(Ordering::Relaxed)),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// One rank's answer to a stall inquiry (its wire form: [`crate::messages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankState {
    /// Collectives started (the current one included).
    pub started: u64,
    /// Inside an operation (a collective or a send/recv).
    pub in_op: bool,
    /// What that operation waits for.
    pub waiting: Waiting,
    /// Milliseconds in this state.
    pub ms: u64,
}

impl RankState {
    /// The peer the rank waits on inside an operation, if any.
    fn peer(&self) -> Option<usize> {
        match self.waiting {
            Waiting::Header(p) | Waiting::Data(p) if self.in_op => Some(p),
            _ => None,
        }
    }
}

/// The rank a stall comes down to, and the sentence that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The ranks at fault (one, or those of a cycle), lowest first.
    pub culprits: Vec<usize>,
    /// What to print after "timed out after T waiting for ".
    pub what: String,
}

/// Names the culprit of a stall seen by rank `me` in operation `op` (its description, such as
/// "op #89 allreduce(f32 x 4194304, sum)"), from every rank's answer (`None`: no answer within
/// `grace`; `states[me]` is this rank's own). `addrs[r]` is rank r's address, when known.
///
/// ```
/// use tandem_collective::backend::ops::Waiting;
/// use tandem_collective::stall::{RankState, diagnose};
/// let waiting_on = |p| Some(RankState { started: 90, in_op: true, waiting: Waiting::Data(p), ms: 10_000 });
/// // A ring of 4 where rank 2 went silent: 3 waits on 2, 0 on 3, 1 on 0.
/// let states = [waiting_on(3), waiting_on(0), None, waiting_on(2)];
/// let d = diagnose(1, "op #89 allreduce", &states, &[], "2s");
/// assert_eq!(d.culprits, vec![2]);
/// assert!(d.what.starts_with("rank 2, which stopped answering during op #89 allreduce"));
/// ```
pub fn diagnose(
    me: usize,
    op: &str,
    states: &[Option<RankState>],
    addrs: &[String],
    grace: &str,
) -> Diagnosis {
    let name = |r: usize| match addrs.get(r).filter(|a| !a.is_empty()) {
        Some(a) => format!("rank {r} ({a})"),
        None => format!("rank {r}"),
    };
    // Who ends up waiting on `culprits`, following each rank's chain; said after the verdict.
    let waiting_tail = |culprits: &[usize]| -> String {
        let waiting: Vec<usize> = (0..states.len())
            .filter(|r| !culprits.contains(r) && states[*r].is_some())
            .filter(|&r| end_of_chain(r, states).is_some_and(|c| culprits.contains(&c)))
            .collect();
        if waiting.is_empty() {
            String::new()
        } else {
            format!("; {} {} waiting on it", list(&waiting), were(&waiting))
        }
    };
    let silent: Vec<usize> = (0..states.len())
        .filter(|&r| r != me && states[r].is_none())
        .collect();
    if !silent.is_empty() {
        let named: Vec<String> = silent.iter().map(|&r| name(r)).collect();
        return Diagnosis {
            what: format!(
                "{}, which stopped answering during {op} (no answer to the stall inquiry within {grace}: killed, stopped, or its host cut off){}",
                named.join(", "),
                waiting_tail(&silent)
            ),
            culprits: silent,
        };
    }
    match walk(me, states) {
        Walk::End(c) => Diagnosis {
            what: format!(
                "{} during {op}, {}{}",
                name(c),
                why_stopped(states[c]),
                waiting_tail(&[c])
            ),
            culprits: vec![c],
        },
        Walk::Cycle(mut cycle) => {
            cycle.sort_unstable();
            Diagnosis {
                what: format!(
                    "{} during {op}: they wait on each other (each blocked receiving from the next: a send is missing, or the calls are in a different order)",
                    list(&cycle)
                ),
                culprits: cycle,
            }
        }
    }
}

/// Why the rank at the end of the chain holds the others: what it says it is doing.
fn why_stopped(state: Option<RankState>) -> String {
    let s = state.unwrap_or(RankState {
        started: 0,
        in_op: false,
        waiting: Waiting::Nothing,
        ms: 0,
    });
    if s.in_op {
        format!(
            "which is in an operation waiting on no other rank for {} ms",
            s.ms
        )
    } else {
        format!(
            "which has not started it: it is outside collectives ({} started), for {} ms (busy in its own code, or stuck there)",
            s.started, s.ms
        )
    }
}

/// `rank 3`, `ranks 1 and 2`, `ranks 1, 2 and 5`.
fn list(rs: &[usize]) -> String {
    let v: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    match v.len() {
        0 => String::new(),
        1 => format!("rank {}", v[0]),
        _ => format!(
            "ranks {} and {}",
            v[..v.len() - 1].join(", "),
            v[v.len() - 1]
        ),
    }
}

/// "was" or "were" for these ranks.
fn were(rs: &[usize]) -> &'static str {
    if rs.len() == 1 { "was" } else { "were" }
}

/// Where following the waits ends: a rank waiting on no one, or a cycle of ranks.
enum Walk {
    /// The chain ends at this rank, which waits on no one.
    End(usize),
    /// These ranks wait on each other.
    Cycle(Vec<usize>),
}

/// Follows the waits from `from` until a rank that waits on no one, or a cycle.
fn walk(from: usize, states: &[Option<RankState>]) -> Walk {
    let mut path = vec![from];
    let mut cur = from;
    loop {
        let next = states
            .get(cur)
            .copied()
            .flatten()
            .and_then(|s| s.peer())
            .filter(|p| *p < states.len() && *p != cur);
        let Some(next) = next else {
            return Walk::End(cur);
        };
        if let Some(i) = path.iter().position(|r| *r == next) {
            return Walk::Cycle(path[i..].to_vec());
        }
        if states[next].is_none() {
            return Walk::End(next);
        }
        path.push(next);
        cur = next;
    }
}

/// The rank that `from`'s chain of waits ends at; `None` for a cycle.
fn end_of_chain(from: usize, states: &[Option<RankState>]) -> Option<usize> {
    match walk(from, states) {
        Walk::End(c) => Some(c),
        Walk::Cycle(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(started: u64, w: Waiting) -> Option<RankState> {
        Some(RankState {
            started,
            in_op: true,
            waiting: w,
            ms: 9000,
        })
    }

    fn idle(started: u64) -> Option<RankState> {
        Some(RankState {
            started,
            in_op: false,
            waiting: Waiting::Nothing,
            ms: 12_000,
        })
    }

    #[test]
    fn states_survive_the_wire_and_garbage_is_refused() {
        for s in [
            on(90, Waiting::Data(3)).unwrap(),
            on(1, Waiting::Header(0)).unwrap(),
            idle(0).unwrap(),
        ] {
            assert_eq!(RankState::decode(&s.encode()).ok(), Some(s));
        }
        for bad in [
            "",
            "1 1 data 3 4",
            r#"{"started":1,"in_op":true,"waiting":{"data":3}}"#,
            r#"{"started":1,"in_op":2,"waiting":{"data":3},"ms":4}"#,
            r#"{"started":"x","in_op":true,"waiting":{"data":3},"ms":4}"#,
            r#"{"started":1,"in_op":true,"waiting":{"sideways":3},"ms":4}"#,
            r#"{"started":1,"in_op":true,"waiting":{"data":-3},"ms":4}"#,
        ] {
            assert!(RankState::decode(bad).is_err(), "{bad:?}");
        }
        let good = r#"{"started":1,"in_op":true,"waiting":{"data":3},"ms":4}"#;
        assert_eq!(
            RankState::decode(good).ok(),
            Some(RankState {
                started: 1,
                in_op: true,
                waiting: Waiting::Data(3),
                ms: 4
            })
        );
    }

    #[test]
    fn wait_cells_and_progress_report_what_the_operation_does() {
        let c = WaitCell::new();
        for w in [
            Waiting::Header(7),
            Waiting::Data(0),
            Waiting::Nothing,
            Waiting::Data(1 << 20),
        ] {
            c.set(w);
            assert_eq!(c.get(), w);
        }
        let p = Progress::new();
        assert!(!p.state().in_op);
        p.begin(5);
        p.waiting.set(Waiting::Header(2));
        let s = p.state();
        assert_eq!(
            (s.started, s.in_op, s.waiting),
            (5, true, Waiting::Header(2))
        );
        p.end();
        let s = p.state();
        assert_eq!(
            (s.started, s.in_op, s.waiting),
            (5, false, Waiting::Nothing)
        );
    }

    #[test]
    fn a_silent_rank_is_the_culprit_whoever_timed_out_first() {
        // Ring of 4, rank 2 cut off: 3 waits on 2, 0 on 3, 1 on 0; rank 1 timed out first.
        let states = [
            on(90, Waiting::Data(3)),
            on(90, Waiting::Header(0)),
            None,
            on(90, Waiting::Data(2)),
        ];
        let addrs: Vec<String> = (0..4).map(|i| format!("10.77.0.{}:29500", i + 1)).collect();
        for me in [0, 1, 3] {
            let d = diagnose(
                me,
                "op #89 allreduce(f32 x 4, sum)",
                &states,
                &addrs,
                "1.5s",
            );
            assert_eq!(d.culprits, vec![2]);
            assert_eq!(
                d.what,
                "rank 2 (10.77.0.3:29500), which stopped answering during op #89 allreduce(f32 x 4, sum) (no answer to the stall inquiry within 1.5s: killed, stopped, or its host cut off); ranks 0, 1 and 3 were waiting on it"
            );
        }
        let two_silent = [on(3, Waiting::Data(1)), None, None];
        assert_eq!(
            diagnose(0, "op", &two_silent, &[], "1s").culprits,
            vec![1, 2]
        );
    }

    #[test]
    fn a_rank_outside_collectives_is_named_not_its_neighbours() {
        // Rank 2 is busy in its own code (a straggler past the deadline, or stuck).
        let states = [
            on(90, Waiting::Data(3)),
            on(90, Waiting::Data(0)),
            idle(89),
            on(90, Waiting::Header(2)),
        ];
        for me in [0, 1, 3] {
            let d = diagnose(me, "op #89 allreduce", &states, &[], "1s");
            assert_eq!(d.culprits, vec![2], "seen by {me}");
            assert!(d.what.starts_with("rank 2 during op #89 allreduce, which has not started it: it is outside collectives (89 started), for 12000 ms"), "{}", d.what);
            assert!(
                d.what.ends_with("; ranks 0, 1 and 3 were waiting on it"),
                "{}",
                d.what
            );
        }
        // Busy inside an operation but waiting on no one.
        let states = [on(4, Waiting::Data(1)), on(4, Waiting::Nothing)];
        let d = diagnose(0, "op #3", &states, &[], "1s");
        assert_eq!(d.culprits, vec![1]);
        assert!(d.what.contains("waiting on no other rank"), "{}", d.what);
        assert!(d.what.ends_with("; rank 0 was waiting on it"), "{}", d.what);
    }

    #[test]
    fn two_ranks_receiving_from_each_other_are_a_cycle() {
        let states = [
            on(0, Waiting::Header(1)),
            on(0, Waiting::Header(0)),
            on(0, Waiting::Data(0)),
        ];
        for me in [0, 1, 2] {
            let d = diagnose(me, "recv", &states, &[], "1s");
            assert_eq!(d.culprits, vec![0, 1], "seen by {me}");
            assert!(
                d.what
                    .starts_with("ranks 0 and 1 during recv: they wait on each other"),
                "{}",
                d.what
            );
        }
    }

    #[test]
    fn waits_on_oneself_or_out_of_range_end_the_chain() {
        let states = [on(1, Waiting::Data(0)), on(1, Waiting::Data(9))];
        assert_eq!(diagnose(0, "op", &states, &[], "1s").culprits, vec![0]);
        assert_eq!(diagnose(1, "op", &states, &[], "1s").culprits, vec![1]);
    }
}
