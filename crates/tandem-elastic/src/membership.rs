//! Agreeing on who is in the next epoch, through the rendezvous.
//!
//! Epoch `t`'s round: each process that wants in appends its id to `E/t/joined` (a
//! compare-and-set loop, so no append is lost), then waits until every member of the epoch it
//! comes from has joined too, or until the settle time has passed with at least `min` joined (the
//! missing ones are taken as gone; members whose failed operation named the member it lost report
//! it in `E/t/lost`, and once every member of the previous epoch is back or reported, the round
//! waits only [`Rules::lost_grace`] instead of the settle time). The first to decide writes `E/t/members` with a
//! compare-and-set from absent; everyone adopts what is stored there, so all agree even when
//! they decided at different moments. A process not in the list (it joined after the decision) is
//! fenced from epoch `t` and tries `t + 1`; the members of `t` let it in at their next commit
//! ([`pending`]). `E/decided` holds the latest decided epoch, so a newcomer knows which round to
//! join.

use std::time::{Duration, Instant};

use tandem_core::{Error, Result};
use tandem_rendezvous::BlockingClient;

/// The outcome of one round: the epoch and its members (ids, in rank order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The epoch number (1 for the first group).
    pub epoch: u64,
    /// The members' ids; a member's rank is its position.
    pub members: Vec<u64>,
}

impl Membership {
    /// The rank of `id`, if it is a member.
    pub fn rank_of(&self, id: u64) -> Option<usize> {
        self.members.iter().position(|m| *m == id)
    }
}

/// How a round waits.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Fewest members an epoch may have.
    pub min: usize,
    /// Most members an epoch may have (later joiners wait for a seat).
    pub max: usize,
    /// How long after joining a round to wait for the previous epoch's members (the ones that do
    /// not come are taken as gone).
    pub settle: Duration,
    /// How long to wait for `min` members in all.
    pub quorum_wait: Duration,
    /// How long to wait once every previous member is back or reported lost
    /// ([`LOST_GRACE`] by default).
    pub lost_grace: Duration,
}

fn key(prefix: &str, epoch: u64, what: &str) -> String {
    format!("{prefix}/{epoch}/{what}")
}

fn parse_ids(b: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(b)
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn format_ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The latest epoch decided so far (0: none yet).
pub fn decided(client: &BlockingClient, prefix: &str) -> Result<u64> {
    Ok(client
        .get(&format!("{prefix}/decided"))?
        .and_then(|b| String::from_utf8_lossy(&b).parse().ok())
        .unwrap_or(0))
}

/// Whether processes wait to join after `epoch` (members check at each commit).
pub fn pending(client: &BlockingClient, prefix: &str, epoch: u64) -> Result<bool> {
    Ok(client
        .get(&key(prefix, epoch + 1, "joined"))?
        .is_some_and(|b| !parse_ids(&b).is_empty()))
}

/// How long a round waits for the previous epoch's members once every one of them is back or
/// reported lost by a member whose operation failed on it, by default ([`Rules::lost_grace`]): a
/// member reported by mistake (its socket closed because it is re-forming itself) gets this long
/// to come back.
pub const LOST_GRACE: Duration = Duration::from_millis(250);

/// Appends `id` to epoch `epoch`'s joined list (once).
fn enter(client: &BlockingClient, prefix: &str, epoch: u64, id: u64) -> Result<()> {
    append(client, &key(prefix, epoch, "joined"), id, epoch)
}

/// Appends `id` to the id list at `k` (once), by compare-and-set so no append is lost.
fn append(client: &BlockingClient, k: &str, id: u64, epoch: u64) -> Result<()> {
    for _ in 0..10_000 {
        let cur = client.get(k)?;
        let mut ids = cur.as_deref().map(parse_ids).unwrap_or_default();
        if ids.contains(&id) {
            return Ok(());
        }
        ids.push(id);
        if client
            .compare_and_set(k, cur.as_deref(), format_ids(&ids))?
            .swapped
        {
            return Ok(());
        }
    }
    Err(Error::Unusable {
        what: "elastic membership".into(),
        reason: format!("could not enter epoch {epoch}'s round (the rendezvous kept changing)"),
    })
}

/// Runs epoch `epoch`'s round for `id`, coming from the members `previous` (empty for a
/// newcomer) after an operation that failed on the members `lost` (reported to the round, so
/// nobody waits the settle time for them: once every previous member is back or reported lost,
/// the round waits only [`Rules::lost_grace`]). Returns the decided membership, which may not include
/// `id` (then try the next epoch).
pub fn round(
    client: &BlockingClient,
    prefix: &str,
    epoch: u64,
    id: u64,
    previous: &[u64],
    lost: &[u64],
    rules: &Rules,
) -> Result<Membership> {
    let lost_key = key(prefix, epoch, "lost");
    for gone in lost.iter().filter(|g| previous.contains(g)) {
        append(client, &lost_key, *gone, epoch)?;
    }
    enter(client, prefix, epoch, id)?;
    let members_key = key(prefix, epoch, "members");
    let joined_key = key(prefix, epoch, "joined");
    // When every previous member was back or reported lost.
    let mut accounted_at: Option<Instant> = None;
    let start = Instant::now();
    // The settle time runs from when a member of the previous epoch is here (at once for the
    // first epoch): a newcomer alone never decides an epoch while the others train.
    let mut settle_end: Option<Instant> = None;
    let quorum_end = start + rules.quorum_wait.max(rules.settle);
    loop {
        if let Some(b) = client.get(&members_key)? {
            return Ok(Membership {
                epoch,
                members: parse_ids(&b),
            });
        }
        let joined = client
            .get(&joined_key)?
            .map(|b| parse_ids(&b))
            .unwrap_or_default();
        let everyone_back = !previous.is_empty() && previous.iter().all(|p| joined.contains(p));
        let now = Instant::now();
        if accounted_at.is_none() && !everyone_back && !previous.is_empty() {
            let reported = client
                .get(&lost_key)?
                .map(|b| parse_ids(&b))
                .unwrap_or_default();
            if previous
                .iter()
                .all(|p| joined.contains(p) || reported.contains(p))
            {
                accounted_at = Some(now);
            }
        }
        let lost_waited = accounted_at.is_some_and(|t| now >= t + rules.lost_grace);
        if settle_end.is_none()
            && (previous.is_empty() || previous.iter().any(|p| joined.contains(p)))
        {
            settle_end = Some(now + rules.settle);
        }
        let full = joined.len() >= rules.max;
        let decide = settle_end
            .is_some_and(|end| everyone_back || full || lost_waited || now >= end)
            && joined.len() >= rules.min;
        if decide {
            let mut members = joined.clone();
            // Previous members first (their ranks change least), then newcomers by id (so the
            // first epoch's ranks are the ids, the launcher's ranks, whoever arrived first).
            members.sort_by_key(|m| {
                let kept = previous.iter().position(|p| p == m).unwrap_or(usize::MAX);
                (kept, *m)
            });
            members.truncate(rules.max);
            let swap = client.compare_and_set(&members_key, None, format_ids(&members))?;
            let members = match swap.current {
                Some(b) => parse_ids(&b),
                None => members,
            };
            if members.contains(&id) {
                let _ = client.set(&format!("{prefix}/decided"), epoch.to_string());
            }
            tracing::info!(epoch, ?members, "membership decided");
            return Ok(Membership { epoch, members });
        }
        if now >= quorum_end {
            return Err(Error::timeout(
                format!(
                    "{} members for epoch {epoch} (only {} joined: {:?}; at least {} needed)",
                    rules.min,
                    joined.len(),
                    joined,
                    rules.min
                ),
                rules.quorum_wait,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_rendezvous::{Host, JobToken, ServerConfig};

    /// Rounds of epoch 2 for `ids`, coming from epoch 1's `[1, 2, 3]`, each reporting `lost`,
    /// on a rendezvous of their own; the settle and quorum waits are ten minutes, so a round
    /// that waits for them has not answered when `guard` ends (`None`); the lost grace is the
    /// default.
    fn rounds_after_a_loss(ids: &[u64], lost: &[u64], guard: Duration) -> Vec<Option<Membership>> {
        let rules = Rules {
            lost_grace: LOST_GRACE,
            ..rules(8)
        };
        rounds(ids, &[1, 2, 3], lost, &rules, guard)
    }

    /// At least 1 member, at most `max`; ten-minute settle, quorum and lost-grace waits.
    fn rules(max: usize) -> Rules {
        Rules {
            min: 1,
            max,
            settle: Duration::from_secs(600),
            quorum_wait: Duration::from_secs(600),
            lost_grace: Duration::from_secs(600),
        }
    }

    /// Rounds of epoch 2 for `ids` coming from `previous`, reporting `lost`, under `rules`; an
    /// id given as `(id, delay)` through [`rounds_late`] starts its round that much later.
    fn rounds(
        ids: &[u64],
        previous: &[u64],
        lost: &[u64],
        rules: &Rules,
        guard: Duration,
    ) -> Vec<Option<Membership>> {
        let ids: Vec<(u64, Duration)> = ids.iter().map(|i| (*i, Duration::ZERO)).collect();
        rounds_late(&ids, previous, lost, rules, guard)
    }

    fn rounds_late(
        ids: &[(u64, Duration)],
        previous: &[u64],
        lost: &[u64],
        rules: &Rules,
        guard: Duration,
    ) -> Vec<Option<Membership>> {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let token = JobToken::generate();
        let host = rt
            .block_on(Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())))
            .expect("rendezvous");
        let addr = host.addr().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        for &(id, delay) in ids {
            let (tx, addr, token, rules, lost, previous) = (
                tx.clone(),
                addr.clone(),
                token.clone(),
                rules.clone(),
                lost.to_vec(),
                previous.to_vec(),
            );
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let client = BlockingClient::connect(&addr, &token, Duration::from_secs(10))
                    .expect("client");
                let m = round(&client, "E", 2, id, &previous, &lost, &rules);
                let _ = tx.send(m.ok());
            });
        }
        let end = std::time::Instant::now() + guard;
        let got = ids
            .iter()
            .map(|_| {
                let left = end.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(left).ok().flatten()
            })
            .collect();
        drop(host);
        got
    }

    #[test]
    fn survivors_that_report_the_lost_member_decide_without_waiting_the_settle_time() {
        let want = Membership {
            epoch: 2,
            members: vec![1, 2],
        };
        for m in rounds_after_a_loss(&[1, 2], &[3], Duration::from_secs(60)) {
            assert_eq!(m.as_ref(), Some(&want));
        }
    }

    #[test]
    fn a_first_epoch_waits_for_its_whole_world_and_ranks_it_by_id() {
        // Nobody to come back from: one of two initial processes alone does not decide.
        assert_eq!(
            rounds(&[1], &[], &[], &rules(2), Duration::from_secs(3)),
            vec![None]
        );
        // Both there: the epoch is full and decided at once, ranked by id whoever came first.
        let want = Membership {
            epoch: 2,
            members: vec![1, 2],
        };
        let ids = [(2, Duration::ZERO), (1, Duration::from_millis(300))];
        let got = rounds_late(&ids, &[], &[], &rules(2), Duration::from_secs(60));
        assert_eq!(got, vec![Some(want.clone()), Some(want)]);
    }

    #[test]
    fn the_settle_time_ends_the_wait_for_a_member_nobody_reported() {
        let quick = Rules {
            settle: Duration::from_secs(1),
            ..rules(8)
        };
        let want = Membership {
            epoch: 2,
            members: vec![1, 2],
        };
        let got = rounds(&[1, 2], &[1, 2, 3], &[], &quick, Duration::from_secs(60));
        assert_eq!(got, vec![Some(want.clone()), Some(want)]);
    }

    #[test]
    fn a_member_reported_lost_that_comes_back_within_the_grace_is_kept() {
        let graced = Rules {
            lost_grace: Duration::from_secs(20),
            ..rules(8)
        };
        // 3 was reported lost by mistake and joins half a second later: still a member.
        let ids = [
            (1, Duration::ZERO),
            (2, Duration::ZERO),
            (3, Duration::from_millis(500)),
        ];
        let want = Membership {
            epoch: 2,
            members: vec![1, 2, 3],
        };
        for m in rounds_late(&ids, &[1, 2, 3], &[3], &graced, Duration::from_secs(60)) {
            assert_eq!(m.as_ref(), Some(&want));
        }
    }

    #[test]
    fn a_report_naming_no_member_of_the_last_epoch_changes_nothing() {
        // 9 was never a member: the round still waits for 3 (the settle time, ten minutes).
        for m in rounds_after_a_loss(&[1, 2], &[9], Duration::from_secs(3)) {
            assert_eq!(m, None, "decided without waiting for member 3");
        }
    }

    #[test]
    fn ids_round_trip_and_skip_garbage() {
        assert_eq!(parse_ids(b"3,1,,x,7"), vec![3, 1, 7]);
        assert_eq!(format_ids(&[4, 0, 2]), "4,0,2");
        assert!(parse_ids(b"").is_empty());
        let m = Membership {
            epoch: 2,
            members: vec![5, 1],
        };
        assert_eq!(
            (m.rank_of(1), m.rank_of(5), m.rank_of(9)),
            (Some(1), Some(0), None)
        );
    }
}
