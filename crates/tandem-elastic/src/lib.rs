//! Keep training when a process is lost: the group has an epoch; when a member is lost the
//! survivors agree through the rendezvous on the next epoch's members (at least `min`), restore
//! the last commit of their [`State`], re-form the group and call the training function again.
//! Newcomers wait in the next epoch's round and are let in at the members' next commit.
//!
//! The rendezvous must outlive every process (a launcher hosts it: `TANDEM_RENDEZVOUS_EXTERNAL=1`).
//! A process keeps one id across epochs (`TANDEM_ELASTIC_ID`, default its first rank); its rank
//! in an epoch is its place in that epoch's member list (previous members first).
//!
//! ```no_run
//! use tandem_elastic::{Elastic, ElasticConfig, State};
//! let mut elastic = Elastic::from_env(ElasticConfig::from_env()?)?;
//! let mut state = State::new().with_array("w", vec![0.0; 1024]).with_scalar("step", 0.0);
//! elastic.run(&mut state, |ctx| println!("now rank {} of {}", ctx.rank(), ctx.world_size()), |ctx, s| {
//!     while s.scalar("step").unwrap_or(0.0) < 100.0 {
//!         let mut g = vec![1.0f32; 1024];
//!         ctx.group().allreduce(&mut g, tandem_core::ReduceOp::Avg)?;
//!         for (w, g) in s.array_mut("w").unwrap().iter_mut().zip(&g) { *w -= 0.1 * g; }
//!         let step = s.scalar("step").unwrap_or(0.0) + 1.0;
//!         s.set_scalar("step", step);
//!         ctx.commit(s)?;
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), tandem_core::Error>(())
//! ```

pub mod checks;
pub mod membership;
mod state;

use std::time::Duration;
use tandem_core::settings;

use tandem_collective::{GroupConfig, ProcessGroup};
use tandem_core::cluster::{ClusterSpec, ProcessEnv, Vars};
use tandem_core::{Error, ReduceOp, Result};
use tandem_rendezvous::{BlockingClient, JobToken};

pub use checks::Checks;
pub use membership::{Membership, Rules};
pub use state::State;

/// `MIN[:MAX]` members of an elastic job.
pub const BOUNDS_VAR: &str = settings::ELASTIC.name;
/// This process's id across epochs.
pub const ID_VAR: &str = settings::ELASTIC_ID.name;
/// Seconds survivors wait for the previous epoch's members before going on without them.
pub const SETTLE_VAR: &str = settings::ELASTIC_SETTLE.name;
/// Seconds to wait for at least MIN members before giving up with an error.
pub const WAIT_VAR: &str = settings::ELASTIC_WAIT.name;

/// How an elastic job behaves.
#[derive(Debug, Clone)]
pub struct ElasticConfig {
    /// Membership rules (min, max, waits).
    pub rules: Rules,
    /// Each epoch's group configuration (its name gets the epoch).
    pub group: GroupConfig,
    /// Most membership changes a run goes through before it gives up.
    pub max_resets: usize,
}

impl ElasticConfig {
    /// From `TANDEM_ELASTIC` (`MIN[:MAX]`, default `1:1024`), `TANDEM_ELASTIC_SETTLE` (seconds,
    /// default 2) and the group's variables.
    pub fn from_env() -> Result<ElasticConfig> {
        Self::from_vars(&ProcessEnv)
    }

    /// [`ElasticConfig::from_env`] over any source of variables.
    pub fn from_vars(vars: &(impl Vars + ?Sized)) -> Result<ElasticConfig> {
        let (min, max) = match settings::ELASTIC.bounds(vars)? {
            None => (1, 1024),
            Some((min, max)) => bounds(min, max)?,
        };
        let secs = |s: &settings::Setting, default: f64| -> Result<Duration> {
            Ok(s.seconds(vars)?.unwrap_or(Duration::from_secs_f64(default)))
        };
        let settle = secs(&settings::ELASTIC_SETTLE, 2.0)?;
        let quorum_wait = secs(&settings::ELASTIC_WAIT, 120.0)?;
        let mut group = GroupConfig::from_vars(vars)?;
        // A lost member must not hold the others at the meeting for long.
        group.connect_timeout = group.connect_timeout.min(Duration::from_secs(20));
        Ok(ElasticConfig {
            rules: Rules {
                min,
                max,
                settle,
                quorum_wait,
                lost_grace: membership::LOST_GRACE.min(settle),
            },
            group,
            max_resets: 1000,
        })
    }
}

/// `MIN[:MAX]` with 1 <= MIN <= MAX (MAX defaults to 1024, or MIN when that is larger).
pub fn parse_bounds(v: &str) -> Result<(usize, usize)> {
    match settings::ELASTIC.parse(v)? {
        settings::Value::Bounds(min, max) => bounds(min, max),
        _ => Err(settings::ELASTIC.invalid(v)),
    }
}

fn bounds(min: u64, max: Option<u64>) -> Result<(usize, usize)> {
    let max = max.unwrap_or(1024.max(min));
    let fit =
        |n: u64| usize::try_from(n).map_err(|_| settings::ELASTIC.invalid(&format!("{min}:{max}")));
    Ok((fit(min)?, fit(max)?))
}

/// Whether an error means the group lost a member (or is changing), so the run goes on with a
/// new epoch, rather than a mistake in the program.
pub fn membership_error(e: &Error) -> bool {
    matches!(
        e,
        Error::PeerLost { .. }
            | Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Unusable { .. }
            | Error::Io { .. }
    )
}

/// The member (id) an operation of `membership`'s group failed on, when the error names one.
fn lost_member(e: &Error, membership: Option<&Membership>) -> Vec<u64> {
    match (e, membership) {
        (Error::PeerLost { rank, .. }, Some(m)) => {
            m.members.get(*rank).copied().into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// One process of an elastic job.
#[derive(Debug)]
pub struct Elastic {
    client: BlockingClient,
    rendezvous: String,
    token: JobToken,
    id: u64,
    initial: usize,
    prefix: String,
    config: ElasticConfig,
    membership: Option<Membership>,
    /// The last [`Elastic::form`] failed for want of members (not worth another round).
    short: bool,
    /// Members the last failed operation was lost on (reported to the next round).
    lost: Vec<u64>,
    /// At which commits to look for processes waiting to join.
    checks: std::sync::Mutex<Checks>,
}

/// What the training function sees of its epoch.
#[derive(Debug)]
pub struct Context<'a> {
    group: &'a ProcessGroup,
    elastic: &'a Elastic,
    epoch: u64,
}

impl Context<'_> {
    /// This epoch's group.
    pub fn group(&self) -> &ProcessGroup {
        self.group
    }

    /// This process's rank in the epoch.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The epoch's number of members.
    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch's members' ids, in rank order.
    pub fn members(&self) -> &[u64] {
        self.elastic
            .membership
            .as_ref()
            .map_or(&[][..], |m| m.members.as_slice())
    }

    /// Commits `state` (see [`State::commit`]) and lets waiting processes in: when any member sees
    /// one waiting, every member returns the same membership error here, and the run re-forms the
    /// group with them from this commit. Members look for waiting processes about every 100 ms
    /// ([`checks`]), at commits they agreed on, so a commit between two looks is a copy in memory.
    pub fn commit(&self, state: &mut State) -> Result<()> {
        state.commit();
        let commits = state.commits();
        let mut checks = self
            .elastic
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !checks.due(commits) {
            return Ok(());
        }
        let waiting = membership::pending(&self.elastic.client, &self.elastic.prefix, self.epoch)?;
        let proposal = checks.propose(commits).min(i32::MAX as u64) as i32;
        let mut any = [i32::from(waiting), proposal];
        self.group.allreduce(&mut any, ReduceOp::Max)?;
        checks.agreed(commits, any[1].max(1) as u64);
        if any[0] > 0 {
            return Err(Error::Unusable {
                what: "elastic group".into(),
                reason: format!(
                    "processes wait to join after epoch {}; re-forming at commit {}",
                    self.epoch,
                    state.commits()
                ),
            });
        }
        Ok(())
    }
}

impl Elastic {
    /// This process's part of the elastic job its environment describes: the rendezvous
    /// (which must be hosted outside the job's processes: `TANDEM_RENDEZVOUS_EXTERNAL=1`), the job
    /// token, its id (`TANDEM_ELASTIC_ID`, default its rank).
    pub fn from_env(config: ElasticConfig) -> Result<Elastic> {
        let spec = ClusterSpec::from_env()?;
        if std::env::var(tandem_rendezvous::EXTERNAL_VAR).as_deref() != Ok("1") {
            return Err(Error::config(
                tandem_rendezvous::EXTERNAL_VAR,
                "is not 1: an elastic job needs a rendezvous that outlives any of its processes \
                 (`tandem launch --elastic` hosts one; elsewhere run `tandem rendezvous` and set \
                 TANDEM_RENDEZVOUS_EXTERNAL=1)",
            ));
        }
        let token = JobToken::from_env()?.ok_or_else(|| {
            Error::config(
                tandem_rendezvous::TOKEN_VAR,
                "is not set; an elastic job needs one",
            )
        })?;
        let id = settings::ELASTIC_ID
            .integer(&ProcessEnv)?
            .unwrap_or(spec.rank() as u64);
        let rendezvous = spec.require_rendezvous()?.to_string();
        let client = BlockingClient::connect(&rendezvous, &token, config.group.connect_timeout)?;
        Ok(Elastic {
            client,
            rendezvous,
            token,
            id,
            initial: spec.world_size(),
            prefix: format!("tandem/elastic/{}", config.group.name),
            config,
            membership: None,
            short: false,
            lost: Vec::new(),
            checks: std::sync::Mutex::default(),
        })
    }

    /// After a (re-)formation at `commits` commits (equal on every member once synced): the next
    /// commit looks for waiting processes, and later ones as agreed then.
    pub fn reset_checks(&self, commits: u64) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reset(commits);
    }

    /// For bindings that run the commit themselves: whether the commit that made `commits`
    /// commits must look for waiting processes and, if so, this member's proposal of commits until
    /// the next look (see [`checks`]).
    pub fn check_due(&self, commits: u64) -> Option<u64> {
        let mut c = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        c.due(commits).then(|| c.propose(commits))
    }

    /// For bindings: every member agreed at `commits` to look again `k` commits later.
    pub fn check_agreed(&self, commits: u64, k: u64) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .agreed(commits, k);
    }

    /// This process's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The membership of the current (or last) epoch.
    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    /// Whether processes wait to join after the current epoch (see [`Context::commit`], which
    /// agrees on it across the members).
    pub fn pending(&self) -> Result<bool> {
        let epoch = self.membership.as_ref().map_or(0, |m| m.epoch);
        membership::pending(&self.client, &self.prefix, epoch)
    }

    /// Whether the last [`Elastic::form`] failed because fewer than `min` members came within
    /// the wait (then running again will not help).
    pub fn short(&self) -> bool {
        self.short
    }

    /// After an operation of the current epoch's group failed with `e`: when it names the rank
    /// it lost, the next [`Elastic::form`] reports that member to the round, so the survivors do
    /// not wait the settle time for it. ([`Elastic::run`] does this itself.)
    pub fn failed_on(&mut self, e: &Error) {
        self.lost = lost_member(e, self.membership.as_ref());
    }

    /// Joins the next epoch (rounds until this process is a member) and forms its group.
    pub fn form(&mut self) -> Result<ProcessGroup> {
        self.short = false;
        let decided = membership::decided(&self.client, &self.prefix)?;
        let mine = self.membership.as_ref().map_or(0, |m| m.epoch);
        let first = decided.max(mine) + 1;
        // Coming from an epoch: wait for its members. A newcomer waits for the latest epoch's
        // members (they come at their next commit); the first epoch waits for the initial world.
        let mut previous = match &self.membership {
            Some(m) if m.epoch == decided.max(mine) => m.members.clone(),
            _ => self.members_of(decided)?,
        };
        for epoch in first..first + 1000 {
            let mut rules = self.config.rules.clone();
            if previous.is_empty() {
                // The first epoch: decide once the initial world is in.
                rules.max = rules.max.min(self.initial.max(rules.min));
            }
            let lost = std::mem::take(&mut self.lost);
            let m = membership::round(
                &self.client,
                &self.prefix,
                epoch,
                self.id,
                &previous,
                &lost,
                &rules,
            )
            .inspect_err(|_| self.short = true)?;
            if let Some(rank) = m.rank_of(self.id) {
                let spec = ClusterSpec::builder()
                    .rank(rank)
                    .world_size(m.members.len())
                    .rendezvous(self.rendezvous.clone())
                    .build()?;
                let mut config = self.config.group.clone();
                config.name = format!("{}-epoch-{epoch}", self.config.group.name);
                tracing::info!(
                    epoch,
                    rank,
                    world = m.members.len(),
                    "joining the elastic group"
                );
                self.membership = Some(m);
                return ProcessGroup::init(&spec, Some(&self.token), config);
            }
            tracing::info!(
                epoch,
                id = self.id,
                "not in this epoch; waiting for the next"
            );
            previous = m.members;
        }
        Err(Error::Unusable {
            what: "elastic group".into(),
            reason: "no epoch admitted this process after 1000 rounds".into(),
        })
    }

    fn members_of(&self, epoch: u64) -> Result<Vec<u64>> {
        if epoch == 0 {
            return Ok(Vec::new());
        }
        let m = self
            .client
            .get(&format!("{}/{epoch}/members", self.prefix))?;
        Ok(m.map(|b| {
            String::from_utf8_lossy(&b)
                .split(',')
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default())
    }

    /// Runs `train` until it returns: forms the group, brings every member to the most advanced
    /// commit of `state`, calls `reset` (rescale the learning rate, reshard data) and `train`.
    /// When `train` fails because the group lost or gains a member ([`membership_error`]), the
    /// state returns to its last commit and all of it starts again with the next epoch; any
    /// other error is returned as it is, and so is a round that found fewer than `min` members
    /// within the wait (`TANDEM_ELASTIC_WAIT`).
    pub fn run<R>(
        &mut self,
        state: &mut State,
        mut reset: impl FnMut(&Context<'_>),
        mut train: impl FnMut(&Context<'_>, &mut State) -> Result<R>,
    ) -> Result<R> {
        let mut resets = 0usize;
        loop {
            let attempt = self.form().and_then(|group| {
                let epoch = self.membership.as_ref().map_or(0, |m| m.epoch);
                let ctx = Context {
                    group: &group,
                    elastic: self,
                    epoch,
                };
                state.sync(&group)?;
                self.reset_checks(state.commits());
                reset(&ctx);
                let out = train(&ctx, state);
                if out.is_ok() {
                    let _ = group.shutdown();
                }
                out
            });
            match attempt {
                Ok(r) => return Ok(r),
                Err(e)
                    if membership_error(&e) && !self.short && resets < self.config.max_resets =>
                {
                    resets += 1;
                    self.failed_on(&e);
                    tracing::warn!(error = %e, "the group changed; restoring the last commit and re-forming");
                    state.restore();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_on_each_side_of_their_limits() {
        assert_eq!(parse_bounds("2").unwrap(), (2, 1024));
        assert_eq!(parse_bounds("2:4").unwrap(), (2, 4));
        assert_eq!(parse_bounds("1:1").unwrap(), (1, 1));
        for bad in ["0", "0:3", "3:2", "x", "2:y", ""] {
            assert!(parse_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_member_a_failed_operation_names_is_reported_lost() {
        let m = Membership {
            epoch: 3,
            members: vec![7, 2, 9],
        };
        let lost = |rank| Error::PeerLost {
            rank,
            context: "op #4".into(),
        };
        assert_eq!(lost_member(&lost(2), Some(&m)), vec![9]);
        assert_eq!(lost_member(&lost(0), Some(&m)), vec![7]);
        assert!(lost_member(&lost(3), Some(&m)).is_empty(), "no such rank");
        assert!(lost_member(&lost(1), None).is_empty(), "no epoch yet");
        assert!(lost_member(&Error::timeout("x", Duration::from_secs(1)), Some(&m)).is_empty());
    }

    #[test]
    fn only_group_failures_restart_the_run() {
        assert!(membership_error(&Error::Unusable {
            what: "g".into(),
            reason: "r".into()
        }));
        assert!(membership_error(&Error::timeout(
            "x",
            Duration::from_secs(1)
        )));
        assert!(!membership_error(&Error::invalid("x", "y")));
        assert!(!membership_error(&Error::config("X", "y")));
    }
}
