//! The wave engine, pure: a deployment's [`Plan`] (the release it rolls out, its waves, where
//! it is) and [`step`], which from the fleet's view (stores, their groups, presence and
//! status) decides what to publish, tombstone or restore, when a wave's gate is met, and when
//! the plan aborts. No I/O: the controller persists the plan and executes the actions.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use roost_schemas::fleet::{Abort, Wave, WaveTarget};
use roost_schemas::{DeploymentStatus, Policy, Scope};
use serde::{Deserialize, Serialize};

use crate::judge::{self, Report, Reported, Wanted};

/// What a plan rolls out: one deployment's source and policy at one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Repository URL.
    pub url: String,
    /// Commit.
    pub revision: String,
    /// Path in the repository.
    pub path: String,
    /// Policy.
    pub policy: Policy,
    /// Staged activation.
    #[serde(default)]
    pub not_before: Option<String>,
    /// Windows, blackouts, urgency, dependencies (v1.2; `defaults:` filled in).
    #[serde(default)]
    pub schedule: roost_schemas::Schedule,
}

/// A plan's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanStatus {
    /// Waves in progress.
    Running,
    /// An operator paused it.
    Paused,
    /// It stopped by itself (or was aborted), with why; the previous release was restored.
    Aborted(String),
    /// Every wave done.
    Done,
}

/// One store's outcome in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOutcome {
    /// Not there yet.
    Pending,
    /// Converged on the release.
    Converged,
    /// Failed or degraded on the release.
    Failed,
    /// Offline when its wave was judged: it converges from the retained message later.
    Deferred,
    /// Deferred by the store itself (v1.2): fetched and built, waiting for its operating
    /// window or its dependencies. Neither failed nor blocking the gate.
    Waiting,
}

impl StoreOutcome {
    /// Every outcome.
    pub const ALL: [StoreOutcome; 5] = [
        StoreOutcome::Converged,
        StoreOutcome::Failed,
        StoreOutcome::Pending,
        StoreOutcome::Deferred,
        StoreOutcome::Waiting,
    ];

    /// Lowercase, as counted and labelled.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOutcome::Pending => "pending",
            StoreOutcome::Converged => "converged",
            StoreOutcome::Failed => "failed",
            StoreOutcome::Deferred => "deferred",
            StoreOutcome::Waiting => "waiting",
        }
    }
}

/// A deployment's rollout plan (persisted by the controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Deployment.
    pub deployment: String,
    /// What it rolls out.
    pub release: Release,
    /// What ran before (published again to every scope the plan changed on abort).
    pub previous: Option<Release>,
    /// The fleet-repository commit that caused it.
    pub origin: String,
    /// Waves.
    pub waves: Vec<Wave>,
    /// Abort rules.
    pub abort: Abort,
    /// Current wave (index).
    pub wave: usize,
    /// When the current wave was published (ms since the epoch; 0: not yet).
    pub wave_started_ms: u64,
    /// The current wave's messages are published.
    pub wave_published: bool,
    /// When the current wave's converged share was first met (soak start).
    pub gate_met_ms: Option<u64>,
    /// Stores targeted per wave, as chosen when each wave was published.
    pub wave_stores: Vec<Vec<String>>,
    /// Scopes the plan published to (for abort and finish).
    pub scopes: Vec<Scope>,
    /// Status.
    pub status: PlanStatus,
    /// Per-store outcome.
    pub outcomes: BTreeMap<String, StoreOutcome>,
    /// What it waits for, for humans.
    pub waiting: String,
    /// Created (ms).
    pub created_ms: u64,
    /// The deployment's `targets:` selector: only stores whose inventory labels match get
    /// it, each by its own store-scoped message (group and fleet waves included), and that
    /// membership follows their labels, also once the plan is done ([`follow_targets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<roost_schemas::Selector>,
    /// Scopes an earlier plan of the deployment published that this one replaces by other
    /// scopes (a fleet or group message when targets were added; store messages when they
    /// were dropped): a store's own is tombstoned once this plan reaches the store by
    /// another scope, the rest when the plan is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retire: Vec<Scope>,
    /// Time of the current wave during which every remaining store waited for its window
    /// (ms): the wave timeout does not run down then.
    #[serde(default)]
    pub wave_waited_ms: u64,
    /// When the plan was last stepped (ms; 0: not yet), to add up `wave_waited_ms`.
    #[serde(default)]
    pub last_step_ms: u64,
    /// Why each waiting store of the plan waits (`window until …`, `dependency on …`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub waits: BTreeMap<String, String>,
}

/// One store as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreView {
    /// Store id.
    pub store: String,
    /// Its groups, in precedence order (from its status document).
    pub groups: Vec<String>,
    /// Its labels from the fleet repository's inventory (empty outside it).
    pub labels: roost_schemas::Labels,
    /// Online (presence).
    pub online: bool,
    /// Its status for the plan's deployment.
    pub status: Option<DeploymentStatus>,
}

/// What the controller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish `release` on `scope`.
    Publish {
        /// Scope.
        scope: Scope,
        /// Release.
        release: Release,
    },
    /// Tombstone `scope`.
    Tombstone {
        /// Scope.
        scope: Scope,
    },
}

impl Plan {
    /// A new plan for `release`, starting at the first wave.
    pub fn new(
        deployment: &str,
        release: Release,
        previous: Option<Release>,
        origin: &str,
        waves: Vec<Wave>,
        abort: Abort,
        now_ms: u64,
    ) -> Plan {
        Plan {
            deployment: deployment.to_owned(),
            release,
            previous,
            origin: origin.to_owned(),
            waves,
            abort,
            wave: 0,
            wave_started_ms: 0,
            wave_published: false,
            gate_met_ms: None,
            wave_stores: Vec::new(),
            scopes: Vec::new(),
            status: PlanStatus::Running,
            outcomes: BTreeMap::new(),
            waiting: String::new(),
            created_ms: now_ms,
            targets: None,
            retire: Vec::new(),
            wave_waited_ms: 0,
            last_step_ms: 0,
            waits: BTreeMap::new(),
        }
    }

    /// Whether `v` is among the deployment's targets (every store without `targets:`).
    fn targets(&self, v: &StoreView) -> bool {
        self.targets.as_ref().is_none_or(|t| t.matches(&v.labels))
    }

    /// Stores targeted by the waves published so far.
    pub fn targeted(&self) -> BTreeSet<String> {
        self.wave_stores.iter().flatten().cloned().collect()
    }

    /// Counts per outcome over the targeted stores (`pending`, `converged`, `failed`,
    /// `deferred`, `waiting`).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c = BTreeMap::new();
        for s in self.targeted() {
            let k = self
                .outcomes
                .get(&s)
                .copied()
                .unwrap_or(StoreOutcome::Pending)
                .as_str();
            *c.entry(k).or_insert(0) += 1;
        }
        c
    }
}

/// Stable rank of a store for percentage waves: the same subset every time, different per
/// deployment (so one unlucky store is not first for everything).
pub fn rank(deployment: &str, store: &str) -> u64 {
    use sha2::{Digest as _, Sha256};
    let h = Sha256::digest(format!("{deployment}/{store}").as_bytes());
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// A store's outcome for `release`, by the one convergence judgement ([`crate::judge`]). The
/// controller knows only the store's presence: an offline store is stale. A plan asks what a
/// store made of the release, so a stale store counts with what it last reported (the gate
/// counts online stores only); one that has not finished is deferred.
fn outcome_of(v: &StoreView, release: &Release) -> (StoreOutcome, Option<judge::Wait>) {
    let report = Report {
        status: v.status.as_ref(),
        stale: !v.online,
    };
    let verdict = judge::verdict(&report, &Wanted::revision(&release.revision));
    match verdict.reported() {
        Reported::Converged => (StoreOutcome::Converged, None),
        Reported::Failed { .. } => (StoreOutcome::Failed, None),
        Reported::Waiting(_) | Reported::Pending if verdict.is_stale() => {
            (StoreOutcome::Deferred, None)
        }
        Reported::Waiting(w) => (StoreOutcome::Waiting, Some(w)),
        Reported::Pending => (StoreOutcome::Pending, None),
    }
}

/// Which stores and scopes wave `i` targets.
fn wave_targets(
    plan: &Plan,
    i: usize,
    view: &[StoreView],
    pinned: &BTreeSet<String>,
) -> (Vec<String>, Vec<Scope>) {
    let free: Vec<&StoreView> = view
        .iter()
        .filter(|v| !pinned.contains(&v.store) && plan.targets(v))
        .collect();
    let Some(target) = plan.waves[i].target() else {
        return (Vec::new(), Vec::new());
    };
    let (stores, scopes) = wave_members(plan, i, target, &free, pinned);
    if plan.targets.is_none() {
        return (stores, scopes);
    }
    // Limited by `targets:`: a group or fleet message would reach every store of it, so each
    // member gets its own. A named store whose labels are known and do not match is left
    // out; one that has not reported yet is named explicitly and gets it.
    let free_names: HashSet<&str> = free.iter().map(|v| v.store.as_str()).collect();
    let known: HashSet<&str> = view.iter().map(|v| v.store.as_str()).collect();
    let stores: Vec<String> = stores
        .into_iter()
        .filter(|s| free_names.contains(s.as_str()) || !known.contains(s.as_str()))
        .collect();
    // A store an earlier wave reached has its message of this release already.
    let earlier: BTreeSet<&String> = plan.wave_stores[..i.min(plan.wave_stores.len())]
        .iter()
        .flatten()
        .collect();
    let scopes = stores
        .iter()
        .filter(|s| !earlier.contains(s))
        .map(|s| Scope::Store(s.clone()))
        .collect();
    (stores, scopes)
}

/// The members and scopes of wave `i` among `free` (the stores a wave may take).
fn wave_members(
    plan: &Plan,
    i: usize,
    target: WaveTarget,
    free: &[&StoreView],
    pinned: &BTreeSet<String>,
) -> (Vec<String>, Vec<Scope>) {
    match target {
        WaveTarget::Group(g) => (
            free.iter()
                .filter(|v| v.groups.contains(&g))
                .map(|v| v.store.clone())
                .collect(),
            vec![Scope::Group(g)],
        ),
        WaveTarget::Fleet => (
            free.iter().map(|v| v.store.clone()).collect(),
            vec![Scope::Fleet],
        ),
        WaveTarget::Selector(sel) => {
            let stores: Vec<String> = free
                .iter()
                .filter(|v| sel.matches(&v.labels))
                .map(|v| v.store.clone())
                .collect();
            let scopes = stores.iter().map(|s| Scope::Store(s.clone())).collect();
            (stores, scopes)
        }
        WaveTarget::Stores(list) => {
            let stores: Vec<String> = list
                .iter()
                .filter(|s| !pinned.contains(*s))
                .cloned()
                .collect();
            let scopes = stores.iter().map(|s| Scope::Store(s.clone())).collect();
            (stores, scopes)
        }
        WaveTarget::Percent(p) => {
            // Earlier waves' stores count towards the share.
            let before: BTreeSet<String> =
                plan.wave_stores[..i].iter().flatten().cloned().collect();
            let want = (free.len() * p as usize).div_ceil(100);
            let mut ranked: Vec<&str> = free.iter().map(|v| v.store.as_str()).collect();
            ranked.sort_by_key(|s| (rank(&plan.deployment, s), s.to_string()));
            let mut chosen = before.len().min(want);
            let mut new = Vec::new();
            for s in ranked {
                if chosen >= want {
                    break;
                }
                if !before.contains(s) {
                    new.push(s.to_owned());
                    chosen += 1;
                }
            }
            let scopes = new.iter().map(|s| Scope::Store(s.clone())).collect();
            (new, scopes)
        }
    }
}

fn pct(n: usize, of: usize) -> u64 {
    if of == 0 {
        100
    } else {
        (n as u64 * 100) / of as u64
    }
}

/// Advances a plan one step; returns what to publish. `pinned` are stores with a pin for the
/// deployment (they are outside waves).
pub fn step(
    plan: &mut Plan,
    view: &[StoreView],
    pinned: &BTreeSet<String>,
    now_ms: u64,
) -> Vec<Action> {
    if plan.status != PlanStatus::Running || plan.waves.is_empty() {
        return Vec::new();
    }
    if plan.wave_stores.len() < plan.waves.len() {
        plan.wave_stores.resize(plan.waves.len(), Vec::new());
    }
    let i = plan.wave.min(plan.waves.len() - 1);
    if !plan.wave_published {
        let (stores, scopes) = wave_targets(plan, i, view, pinned);
        plan.wave_stores[i] = stores;
        plan.wave_published = true;
        plan.wave_started_ms = now_ms;
        plan.wave_waited_ms = 0;
        plan.last_step_ms = now_ms;
        plan.gate_met_ms = None;
        let shared = scopes.iter().any(|s| !matches!(s, Scope::Store(_)));
        add_scopes(plan, &scopes);
        // A store's own message replaces a retired one on the same topic.
        let published: HashSet<&Scope> = scopes.iter().collect();
        plan.retire.retain(|r| !published.contains(r));
        let mut actions: Vec<Action> = scopes
            .into_iter()
            .map(|scope| Action::Publish {
                scope,
                release: plan.release.clone(),
            })
            .collect();
        if shared {
            let members = plan.wave_stores[i].clone();
            actions.extend(retire_shadows(plan, &members));
        }
        plan.waiting = format!("wave {} published", plan.waves[i].name);
        return actions;
    }
    // Group and fleet waves reach every member, including stores that reported (or joined
    // the group) after the wave was published: their membership follows the view. (Under
    // `targets:` each member has its own message: [`follow_targets`] publishes them.)
    let mut actions = Vec::new();
    if plan.targets.is_none()
        && matches!(
            plan.waves[i].target(),
            Some(WaveTarget::Group(_)) | Some(WaveTarget::Fleet)
        )
    {
        let (now_members, _) = wave_targets(plan, i, view, pinned);
        let had: HashSet<&String> = plan.wave_stores[i].iter().collect();
        let new: Vec<String> = now_members
            .into_iter()
            .filter(|s| !had.contains(s))
            .collect();
        plan.wave_stores[i].extend(new.iter().cloned());
        actions = retire_shadows(plan, &new);
    }
    if !actions.is_empty() {
        return actions;
    }
    // Knowing no store at all (a fresh fleet database) is not "every store is done".
    if view.is_empty() {
        plan.waiting = format!(
            "wave {}: no store has reported its status yet",
            plan.waves[i].name
        );
        return Vec::new();
    }
    // Outcomes of every store targeted so far.
    let by_store: BTreeMap<&str, &StoreView> = view.iter().map(|v| (v.store.as_str(), v)).collect();
    for s in plan.targeted() {
        let (o, wait) = match by_store.get(s.as_str()) {
            Some(v) => outcome_of(v, &plan.release),
            None => (StoreOutcome::Deferred, None),
        };
        match wait {
            Some(w) => plan.waits.insert(s.clone(), w.describe()),
            None => plan.waits.remove(&s),
        };
        plan.outcomes.insert(s, o);
    }
    // While every store of the wave that is online and not finished waits for its window
    // (or its dependencies), the wave's time does not count against its timeout.
    let remaining: Vec<StoreOutcome> = plan.wave_stores[i]
        .iter()
        .filter(|s| by_store.get(s.as_str()).is_some_and(|v| v.online))
        .filter_map(|s| plan.outcomes.get(s.as_str()).copied())
        .filter(|o| matches!(o, StoreOutcome::Pending | StoreOutcome::Waiting))
        .collect();
    let all_wait = !remaining.is_empty() && remaining.iter().all(|o| *o == StoreOutcome::Waiting);
    if all_wait && plan.last_step_ms > 0 {
        plan.wave_waited_ms += now_ms.saturating_sub(plan.last_step_ms);
    }
    plan.last_step_ms = now_ms;
    // Abort on the failure share (once enough stores finished) or a wave timeout.
    let failed: Vec<&String> = plan
        .outcomes
        .iter()
        .filter(|(_, o)| **o == StoreOutcome::Failed)
        .map(|(s, _)| s)
        .collect();
    let converged = plan
        .outcomes
        .values()
        .filter(|o| **o == StoreOutcome::Converged)
        .count();
    let finished = failed.len() + converged;
    let abort_reason = if finished >= plan.abort.min_finished as usize
        && failed.len() as u64 * 100 > plan.abort.failed_pct as u64 * finished as u64
    {
        Some(format!(
            "{} of {finished} finished stores failed (more than {}%): {}",
            failed.len(),
            plan.abort.failed_pct,
            failed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    } else if now_ms
        .saturating_sub(plan.wave_started_ms)
        .saturating_sub(plan.wave_waited_ms)
        > plan.abort.wave_timeout_s * 1000
    {
        Some(format!(
            "wave {} did not finish within {} s",
            plan.waves[i].name, plan.abort.wave_timeout_s
        ))
    } else {
        None
    };
    if let Some(reason) = abort_reason {
        return abort(plan, reason);
    }
    // The gate: the converged share of the wave's online stores, then the soak time. Stores
    // waiting for their window are deferred like offline ones; while every remaining one
    // waits, the wave waits with them.
    let wave = &plan.waves[i];
    let online: Vec<&String> = plan.wave_stores[i]
        .iter()
        .filter(|s| by_store.get(s.as_str()).is_some_and(|v| v.online))
        .filter(|s| plan.outcomes.get(s.as_str()) != Some(&StoreOutcome::Waiting))
        .collect();
    let waiting_here: Vec<String> = plan.wave_stores[i]
        .iter()
        .filter(|s| plan.outcomes.get(s.as_str()) == Some(&StoreOutcome::Waiting))
        .map(|s| match plan.waits.get(s) {
            Some(w) => format!("{s}: {w}"),
            None => s.clone(),
        })
        .collect();
    if online.is_empty() && !waiting_here.is_empty() {
        // Only waiting stores are online: nothing to judge the gate on yet.
        plan.gate_met_ms = None;
        plan.waiting = format!(
            "wave {}: {} store(s) waiting ({}){}",
            wave.name,
            waiting_here.len(),
            waiting_here.join("; "),
            if all_wait {
                "; the wave timeout is held"
            } else {
                ""
            }
        );
        return Vec::new();
    }
    let done = online
        .iter()
        .filter(|s| plan.outcomes.get(s.as_str()) == Some(&StoreOutcome::Converged))
        .count();
    if pct(done, online.len()) < wave.converged_pct() as u64 {
        plan.gate_met_ms = None;
        plan.waiting = format!(
            "wave {}: {done}/{} online stores converged, needs {}%",
            wave.name,
            online.len(),
            wave.converged_pct()
        );
        return Vec::new();
    }
    let met = *plan.gate_met_ms.get_or_insert(now_ms);
    let soak_until = met + wave.soak_s() * 1000;
    if now_ms < soak_until {
        plan.waiting = format!(
            "wave {}: soaking until {}",
            wave.name,
            roost_schemas::format_rfc3339(
                time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(soak_until as i64)
            )
        );
        return Vec::new();
    }
    if i + 1 < plan.waves.len() {
        plan.wave = i + 1;
        plan.wave_published = false;
        plan.gate_met_ms = None;
        return step(plan, view, pinned, now_ms);
    }
    finish(plan)
}

/// Tombstones the retired store messages of `stores`, which a group or fleet message of
/// this plan reaches now: a store's own message takes precedence and would hide it.
fn retire_shadows(plan: &mut Plan, stores: &[String]) -> Vec<Action> {
    if plan.retire.is_empty() {
        return Vec::new();
    }
    let reached: HashSet<&str> = stores.iter().map(String::as_str).collect();
    let (shadowed, kept): (Vec<Scope>, Vec<Scope>) = std::mem::take(&mut plan.retire)
        .into_iter()
        .partition(|r| matches!(r, Scope::Store(s) if reached.contains(s.as_str())));
    plan.retire = kept;
    shadowed
        .into_iter()
        .map(|scope| Action::Tombstone { scope })
        .collect()
}

/// Adds `scopes` to the plan's published scopes, each once.
fn add_scopes(plan: &mut Plan, scopes: &[Scope]) {
    let mut have: HashSet<Scope> = plan.scopes.iter().cloned().collect();
    for s in scopes {
        if have.insert(s.clone()) {
            plan.scopes.push(s.clone());
        }
    }
}

/// Every wave done: the wave-scoped messages (group, percentage, named stores) are
/// tombstoned when the last wave was the fleet's, so the fleet message stands alone (under
/// `targets:` there is no fleet message: every store keeps its own); what the plan retires
/// is tombstoned.
fn finish(plan: &mut Plan) -> Vec<Action> {
    plan.status = PlanStatus::Done;
    plan.waiting = String::new();
    let mut actions: Vec<Action> = std::mem::take(&mut plan.retire)
        .into_iter()
        .map(|scope| Action::Tombstone { scope })
        .collect();
    let last_is_fleet = plan
        .waves
        .last()
        .is_some_and(|w| w.target() == Some(WaveTarget::Fleet));
    if !last_is_fleet || plan.targets.is_some() {
        return actions;
    }
    actions.extend(
        plan.scopes
            .iter()
            .filter(|s| **s != Scope::Fleet)
            .map(|s| Action::Tombstone { scope: s.clone() }),
    );
    plan.scopes.retain(|s| *s == Scope::Fleet);
    actions
}

/// Under `targets:`, membership follows the stores' inventory labels while the plan runs
/// (once its current wave is published) and after it is done: a store whose labels now
/// match and that a published group, fleet or selector wave takes gets its own message of
/// the release; a store whose labels no longer match has its message tombstoned (it removes
/// the deployment). Stores not in the view (not reported yet) are left as they are.
pub fn follow_targets(
    plan: &mut Plan,
    view: &[StoreView],
    pinned: &BTreeSet<String>,
) -> Vec<Action> {
    if plan.targets.is_none() || plan.waves.is_empty() {
        return Vec::new();
    }
    let last = match plan.status {
        PlanStatus::Done => plan.waves.len() - 1,
        PlanStatus::Running if plan.wave_published => plan.wave.min(plan.waves.len() - 1),
        _ => return Vec::new(),
    };
    if plan.wave_stores.len() < plan.waves.len() {
        plan.wave_stores.resize(plan.waves.len(), Vec::new());
    }
    let mut actions = Vec::new();
    let scoped: HashSet<&str> = plan
        .scopes
        .iter()
        .filter_map(|s| match s {
            Scope::Store(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    let leavers: BTreeSet<String> = view
        .iter()
        .filter(|v| !plan.targets(v) && scoped.contains(v.store.as_str()))
        .map(|v| v.store.clone())
        .collect();
    if !leavers.is_empty() {
        plan.scopes
            .retain(|s| !matches!(s, Scope::Store(s) if leavers.contains(s)));
        for w in &mut plan.wave_stores {
            w.retain(|s| !leavers.contains(s));
        }
        for store in leavers {
            plan.outcomes.remove(&store);
            actions.push(Action::Tombstone {
                scope: Scope::Store(store),
            });
        }
    }
    let mut reached: HashSet<String> = plan.wave_stores.iter().flatten().cloned().collect();
    for w in 0..=last {
        if !matches!(
            plan.waves[w].target(),
            Some(WaveTarget::Group(_) | WaveTarget::Fleet | WaveTarget::Selector(_))
        ) {
            continue;
        }
        let (members, _) = wave_targets(plan, w, view, pinned);
        let new: Vec<String> = members
            .into_iter()
            .filter(|m| reached.insert(m.clone()))
            .collect();
        let scopes: Vec<Scope> = new.iter().map(|m| Scope::Store(m.clone())).collect();
        plan.wave_stores[w].extend(new);
        add_scopes(plan, &scopes);
        actions.extend(scopes.into_iter().map(|scope| Action::Publish {
            scope,
            release: plan.release.clone(),
        }));
    }
    actions
}

/// Stops the plan: the previous release goes back to every scope the plan changed (or, for a
/// first release, those scopes are tombstoned).
pub fn abort(plan: &mut Plan, reason: String) -> Vec<Action> {
    plan.status = PlanStatus::Aborted(reason);
    plan.waiting = String::new();
    plan.scopes
        .iter()
        .map(|s| match &plan.previous {
            Some(p) => Action::Publish {
                scope: s.clone(),
                release: p.clone(),
            },
            None => Action::Tombstone { scope: s.clone() },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::Phase;

    fn rel(c: char) -> Release {
        Release {
            schedule: Default::default(),
            url: "git://h/a.git".into(),
            revision: c.to_string().repeat(40),
            path: "apps/web".into(),
            policy: Policy::default(),
            not_before: None,
        }
    }

    fn wave(name: &str, f: impl FnOnce(&mut Wave)) -> Wave {
        let mut w = Wave {
            name: name.into(),
            group: None,
            percent: None,
            stores: None,
            fleet: None,
            selector: None,
            converged_pct: None,
            soak_s: None,
        };
        f(&mut w);
        w
    }

    fn waves() -> Vec<Wave> {
        vec![
            wave("canary", |w| w.group = Some("canary".into())),
            wave("half", |w| w.percent = Some(50)),
            wave("all", |w| w.fleet = Some(true)),
        ]
    }

    fn fleet(n: usize) -> Vec<StoreView> {
        (1..=n)
            .map(|i| StoreView {
                store: format!("s{i:02}"),
                groups: if i == 1 {
                    vec!["canary".into()]
                } else {
                    vec![]
                },
                labels: Default::default(),
                online: true,
                status: None,
            })
            .collect()
    }

    fn set(view: &mut [StoreView], stores: &[String], phase: Phase, rev: &Release) {
        for v in view.iter_mut().filter(|v| stores.contains(&v.store)) {
            v.status = Some(DeploymentStatus {
                applied_revision: Some(rev.revision.clone()),
                last_attempted_revision: Some(rev.revision.clone()),
                phase,
                ..Default::default()
            });
        }
    }

    fn scopes(a: &[Action]) -> Vec<String> {
        a.iter()
            .map(|a| match a {
                Action::Publish { scope, release } => {
                    format!("publish {} {}", scope.key(), &release.revision[..1])
                }
                Action::Tombstone { scope } => format!("tombstone {}", scope.key()),
            })
            .collect()
    }

    /// Stores 1..=n, odd ones labelled `format: drive-thru`; store 1 in group canary.
    fn labelled(n: usize) -> Vec<StoreView> {
        let mut view = fleet(n);
        for (i, v) in view.iter_mut().enumerate() {
            if i % 2 == 0 {
                v.labels.insert("format".into(), "drive-thru".into());
            }
        }
        view
    }

    fn drive_thru() -> Option<roost_schemas::Selector> {
        Some("format=drive-thru".parse().expect("selector"))
    }

    /// Converged on `rel` everywhere it has published, then steps (plan and follow).
    fn advance(p: &mut Plan, view: &mut [StoreView], rev: &Release, now: u64) -> Vec<String> {
        let none = BTreeSet::new();
        let mut a = step(p, view, &none, now);
        a.extend(follow_targets(p, view, &none));
        let reached = p.targeted().into_iter().collect::<Vec<_>>();
        set(view, &reached, Phase::Converged, rev);
        scopes(&a)
    }

    #[test]
    fn targets_reach_only_matching_stores_each_by_its_own_message() {
        let mut view = labelled(6);
        let mut p = Plan::new("kds", rel('b'), None, "o", waves(), Abort::default(), 0);
        p.targets = drive_thru();
        // Canary (s01 matches): its own message, not the group's.
        assert_eq!(
            advance(&mut p, &mut view, &rel('b'), 1),
            ["publish store:s01 b"]
        );
        // 50 % of the 3 matching stores, the canary counts: 1 more.
        let half = advance(&mut p, &mut view, &rel('b'), 2);
        assert_eq!(half.len(), 1, "{half:?}");
        // The fleet wave: the remaining matching store, by its own message; no fleet message.
        let all = advance(&mut p, &mut view, &rel('b'), 3);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].starts_with("publish store:s0"), "{all:?}");
        assert_eq!(
            advance(&mut p, &mut view, &rel('b'), 4),
            Vec::<String>::new()
        );
        assert_eq!(p.status, PlanStatus::Done);
        let mut reached: Vec<String> = p.targeted().into_iter().collect();
        reached.sort();
        assert_eq!(reached, ["s01", "s03", "s05"]);
        assert!(p.scopes.iter().all(|s| matches!(s, Scope::Store(_))));

        // Labels change after it is done: s02 becomes a drive-thru, s03 stops being one.
        view[1].labels.insert("format".into(), "drive-thru".into());
        view[2].labels.clear();
        let none = BTreeSet::new();
        let a = scopes(&follow_targets(&mut p, &view, &none));
        assert_eq!(a, ["tombstone store:s03", "publish store:s02 b"]);
        assert!(follow_targets(&mut p, &view, &none).is_empty(), "once");
    }

    #[test]
    fn adding_targets_retires_the_fleet_message_and_dropping_them_the_store_messages() {
        let mut view = labelled(4);
        let fleet_only = vec![wave("all", |w| w.fleet = Some(true))];
        // Targets added: the old fleet message goes when the plan is done, not before (the
        // stores outside the targets keep the deployment until then).
        let mut p = Plan::new(
            "kds",
            rel('b'),
            Some(rel('a')),
            "o",
            fleet_only.clone(),
            Abort::default(),
            0,
        );
        p.targets = drive_thru();
        p.retire = vec![Scope::Fleet];
        assert_eq!(
            advance(&mut p, &mut view, &rel('b'), 1),
            ["publish store:s01 b", "publish store:s03 b"]
        );
        assert_eq!(
            advance(&mut p, &mut view, &rel('b'), 2),
            ["tombstone fleet"]
        );
        assert_eq!(p.status, PlanStatus::Done);
        // Targets dropped: the fleet message first, then each store's own message that would
        // hide it.
        let mut q = Plan::new(
            "kds",
            rel('c'),
            Some(rel('b')),
            "o",
            fleet_only,
            Abort::default(),
            0,
        );
        q.retire = vec![Scope::Store("s01".into()), Scope::Store("s03".into())];
        assert_eq!(
            advance(&mut q, &mut view, &rel('c'), 3),
            [
                "publish fleet c",
                "tombstone store:s01",
                "tombstone store:s03"
            ]
        );
        assert!(q.retire.is_empty());
    }

    /// Marks `stores` as waiting for their window to apply `rev`.
    fn waiting(view: &mut [StoreView], stores: &[&str], rev: &Release) {
        for v in view
            .iter_mut()
            .filter(|v| stores.contains(&v.store.as_str()))
        {
            v.status = Some(DeploymentStatus {
                desired: Some(roost_schemas::DesiredRef {
                    revision: rev.revision.clone(),
                    sequence: 1,
                    scope: "fleet".into(),
                    origin: None,
                }),
                phase: Phase::Waiting,
                reason: Some("window".into()),
                next_window: Some("2026-12-07T02:00:00-05:00".into()),
                ..Default::default()
            });
        }
    }

    #[test]
    fn waiting_stores_are_deferred_and_hold_the_wave_timeout() {
        let none = BTreeSet::new();
        let abort = Abort {
            failed_pct: 0,
            min_finished: 1,
            wave_timeout_s: 10,
        };
        let two = vec![
            wave("first", |w| {
                w.stores = Some(vec!["s01".into(), "s02".into()])
            }),
            wave("all", |w| w.fleet = Some(true)),
        ];
        // One converges, one waits for its window: the gate completes on the other.
        let mut view = fleet(3);
        let mut p = Plan::new("web", rel('b'), None, "o", two.clone(), abort.clone(), 0);
        step(&mut p, &view, &none, 1_000);
        set(&mut view, &["s01".into()], Phase::Converged, &rel('b'));
        waiting(&mut view, &["s02"], &rel('b'));
        let a = step(&mut p, &view, &none, 2_000);
        assert_eq!(scopes(&a), vec!["publish fleet b"], "{}", p.waiting);
        assert_eq!(p.outcomes["s02"], StoreOutcome::Waiting);
        assert_eq!(p.waits["s02"], "window until 2026-12-07T02:00:00-05:00");
        assert_eq!(p.counts().get("waiting"), Some(&1));
        assert_ne!(p.status, PlanStatus::Aborted(String::new()));

        // Every remaining store waits: the wave waits with them, and its timeout does not
        // run down, however long the window takes.
        let mut view = fleet(3);
        let mut p = Plan::new("web", rel('b'), None, "o", two.clone(), abort.clone(), 0);
        step(&mut p, &view, &none, 1_000);
        waiting(&mut view, &["s01", "s02"], &rel('b'));
        for t in [2_000, 60_000, 3_600_000] {
            assert!(step(&mut p, &view, &none, t).is_empty());
            assert_eq!(p.status, PlanStatus::Running, "{t}: {}", p.waiting);
            assert!(p.waiting.contains("timeout is held"), "{}", p.waiting);
        }
        // The window opens: they converge, the wave completes.
        set(
            &mut view,
            &["s01".into(), "s02".into()],
            Phase::Converged,
            &rel('b'),
        );
        assert_eq!(
            scopes(&step(&mut p, &view, &none, 3_601_000)),
            vec!["publish fleet b"]
        );

        // A store that is merely pending runs the timeout down as before.
        let mut view = fleet(3);
        let mut p = Plan::new("web", rel('b'), None, "o", two, abort, 0);
        step(&mut p, &view, &none, 1_000);
        waiting(&mut view, &["s01"], &rel('b'));
        step(&mut p, &view, &none, 2_000);
        step(&mut p, &view, &none, 20_000);
        assert!(
            matches!(&p.status, PlanStatus::Aborted(r) if r.contains("did not finish")),
            "{:?}",
            p.status
        );
    }

    #[test]
    fn a_rolled_back_store_counts_as_failed_for_abort() {
        let none = BTreeSet::new();
        let mut view = fleet(2);
        let mut p = Plan::new(
            "web",
            rel('b'),
            Some(rel('a')),
            "o",
            vec![wave("all", |w| w.fleet = Some(true))],
            Abort {
                failed_pct: 20,
                min_finished: 1,
                wave_timeout_s: 600,
            },
            0,
        );
        step(&mut p, &view, &none, 1);
        for v in view.iter_mut().filter(|v| v.store == "s01") {
            v.status = Some(DeploymentStatus {
                applied_revision: Some(rel('a').revision),
                last_attempted_revision: Some(rel('b').revision),
                failed_revision: Some(rel('b').revision),
                phase: Phase::RolledBack,
                reason: Some("hook_failed".into()),
                ..Default::default()
            });
        }
        let a = step(&mut p, &view, &none, 2);
        assert_eq!(scopes(&a), vec!["publish fleet a"]);
        assert!(
            matches!(&p.status, PlanStatus::Aborted(r) if r.contains("s01")),
            "{:?}",
            p.status
        );
    }

    #[test]
    fn waves_gate_in_order_and_finish_with_the_fleet_alone() {
        let mut view = fleet(10);
        let none = BTreeSet::new();
        let mut p = Plan::new(
            "web",
            rel('b'),
            Some(rel('a')),
            "o",
            waves(),
            Abort::default(),
            0,
        );
        assert_eq!(
            scopes(&step(&mut p, &view, &none, 1)),
            vec!["publish group:canary b"]
        );
        assert_eq!(p.wave_stores[0], vec!["s01"]);
        // Nothing converged: the canary gate holds; nothing else is published.
        assert!(step(&mut p, &view, &none, 2).is_empty());
        assert!(p.waiting.contains("0/1"), "{}", p.waiting);
        set(&mut view, &["s01".into()], Phase::Converged, &rel('b'));
        let a = step(&mut p, &view, &none, 3);
        // 50 %: 5 stores, the canary counts: 4 more, store-scoped, by a stable hash.
        assert_eq!(a.len(), 4, "{:?}", scopes(&a));
        assert!(scopes(&a).iter().all(|s| s.starts_with("publish store:")));
        let half = p.wave_stores[1].clone();
        assert!(!half.contains(&"s01".to_string()));
        // The same subset every time.
        let mut again = Plan::new("web", rel('b'), None, "o", waves(), Abort::default(), 0);
        again.wave_stores = vec![vec!["s01".into()], vec![], vec![]];
        again.wave = 1;
        step(&mut again, &view, &none, 3);
        assert_eq!(again.wave_stores[1], half);
        set(&mut view, &half, Phase::Converged, &rel('b'));
        let a = step(&mut p, &view, &none, 4);
        assert_eq!(scopes(&a), vec!["publish fleet b"]);
        let all: Vec<String> = view.iter().map(|v| v.store.clone()).collect();
        set(&mut view, &all, Phase::Converged, &rel('b'));
        let a = step(&mut p, &view, &none, 5);
        assert_eq!(p.status, PlanStatus::Done);
        let t = scopes(&a);
        assert_eq!(t.len(), 5, "{t:?}");
        assert!(t.iter().all(|s| s.starts_with("tombstone ")));
        assert!(t.contains(&"tombstone group:canary".to_string()));
        assert_eq!(p.scopes, vec![Scope::Fleet]);
    }

    #[test]
    fn a_selector_wave_targets_the_matching_stores_by_their_own_topics() {
        let mut view = fleet(4);
        for v in &mut view[1..3] {
            v.labels.insert("region".into(), "us-south".into());
        }
        let sel: roost_schemas::Selector =
            serde_json::from_str(r#"{"region": "us-south"}"#).expect("selector");
        let p = Plan::new(
            "web",
            rel('b'),
            None,
            "o",
            vec![wave("texas", |w| w.selector = Some(sel))],
            Abort::default(),
            0,
        );
        let (stores, scopes) = wave_targets(&p, 0, &view, &BTreeSet::new());
        assert_eq!(stores, ["s02", "s03"]);
        assert_eq!(
            scopes,
            [Scope::Store("s02".into()), Scope::Store("s03".into())]
        );
        // A pinned store stays out of the wave.
        let pinned = BTreeSet::from(["s03".to_owned()]);
        assert_eq!(wave_targets(&p, 0, &view, &pinned).0, ["s02"]);
    }

    #[test]
    fn offline_stores_are_deferred_and_never_block() {
        let mut view = fleet(4);
        view[0].groups = vec!["canary".into()];
        view[1].groups = vec!["canary".into()];
        view[1].online = false;
        let none = BTreeSet::new();
        let mut p = Plan::new("web", rel('b'), None, "o", waves(), Abort::default(), 0);
        step(&mut p, &view, &none, 1);
        set(&mut view, &["s01".into()], Phase::Converged, &rel('b'));
        step(&mut p, &view, &none, 2);
        assert!(
            p.wave >= 1,
            "the offline canary store does not block: {}",
            p.waiting
        );
        assert_eq!(p.outcomes["s02"], StoreOutcome::Deferred);
    }

    #[test]
    fn soak_time_holds_the_next_wave() {
        let mut view = fleet(3);
        let mut w = waves();
        w[0].soak_s = Some(60);
        let none = BTreeSet::new();
        let mut p = Plan::new("web", rel('b'), None, "o", w, Abort::default(), 0);
        step(&mut p, &view, &none, 1_000);
        set(&mut view, &["s01".into()], Phase::Converged, &rel('b'));
        assert!(step(&mut p, &view, &none, 2_000).is_empty());
        assert!(p.waiting.contains("soaking"), "{}", p.waiting);
        assert!(step(&mut p, &view, &none, 61_000).is_empty());
        assert!(!step(&mut p, &view, &none, 62_000).is_empty());
    }

    #[test]
    fn failures_abort_and_restore_the_previous_release_everywhere_the_plan_went() {
        let mut view = fleet(10);
        let none = BTreeSet::new();
        let abort = Abort {
            failed_pct: 20,
            min_finished: 2,
            wave_timeout_s: 3600,
        };
        let mut p = Plan::new("web", rel('b'), Some(rel('a')), "o", waves(), abort, 0);
        step(&mut p, &view, &none, 1);
        set(&mut view, &["s01".into()], Phase::Converged, &rel('b'));
        step(&mut p, &view, &none, 2);
        let half = p.wave_stores[1].clone();
        set(&mut view, &half[..1], Phase::Failed, &rel('b'));
        // 1 failed of 2 finished: 50 % > 20 %.
        let a = step(&mut p, &view, &none, 3);
        assert!(
            matches!(&p.status, PlanStatus::Aborted(r) if r.contains(&half[0])),
            "{:?}",
            p.status
        );
        let s = scopes(&a);
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(
            s.iter()
                .all(|x| x.starts_with("publish ") && x.ends_with(" a")),
            "{s:?}"
        );
        assert!(
            step(&mut p, &view, &none, 4).is_empty(),
            "nothing more after an abort"
        );
    }

    #[test]
    fn a_wave_that_takes_too_long_aborts() {
        let view = fleet(3);
        let none = BTreeSet::new();
        let abort = Abort {
            wave_timeout_s: 10,
            ..Abort::default()
        };
        let mut p = Plan::new("web", rel('b'), None, "o", waves(), abort, 0);
        step(&mut p, &view, &none, 1_000);
        assert!(step(&mut p, &view, &none, 5_000).is_empty());
        let a = step(&mut p, &view, &none, 12_000);
        assert!(matches!(&p.status, PlanStatus::Aborted(r) if r.contains("within 10 s")));
        assert_eq!(
            scopes(&a),
            vec!["tombstone group:canary"],
            "a first release is withdrawn"
        );
    }

    #[test]
    fn an_unknown_fleet_holds_the_gate_and_late_members_count() {
        let none = BTreeSet::new();
        let mut p = Plan::new("web", rel('b'), None, "o", waves(), Abort::default(), 0);
        assert_eq!(
            scopes(&step(&mut p, &[], &none, 1)),
            vec!["publish group:canary b"]
        );
        assert!(
            step(&mut p, &[], &none, 2).is_empty(),
            "no store known: wait"
        );
        assert!(p.waiting.contains("no store"), "{}", p.waiting);
        // The canary store reports after the wave went out: it is the wave's member now.
        let view = fleet(4);
        assert!(step(&mut p, &view, &none, 3).is_empty());
        assert_eq!(p.wave_stores[0], vec!["s01"]);
        assert_eq!(p.wave, 0, "waits for the late canary");
    }

    #[test]
    fn pinned_stores_are_outside_waves() {
        let view = fleet(4);
        let pinned: BTreeSet<String> = ["s01".to_string()].into();
        let mut p = Plan::new("web", rel('b'), None, "o", waves(), Abort::default(), 0);
        step(&mut p, &view, &pinned, 1);
        assert!(p.wave_stores[0].is_empty(), "the canary store is pinned");
    }
}
