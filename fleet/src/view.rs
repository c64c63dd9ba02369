//! The fleet view: per store and deployment, the desired revision (with its commit's subject
//! and age, and the fleet-repository commit it came from) against the applied one, the
//! phase, drift, presence with "last heard", and gaps in the store's `roostseq`.
//!
//! One rule decides what a reader may believe, and every fleet view uses it (`roost status`,
//! the dashboard, the HTTP API, `/metrics`): a store that is offline, has been silent for
//! longer than its heartbeat allows, or whose desired state is not confirmed fresh is
//! **stale**, and a stale store is never shown as `Converged` — its cells show `Stale` (the
//! last reported phase stays available as `phase`). Rancher Fleet shows disconnected clusters
//! as Ready (fleet#594) and Argo CD apps stay green while their cluster is unreachable
//! (argo-cd#8860); this view does not. Each cell carries the convergence judgement of
//! [`crate::judge`] against its desired revision, the one the wave engine and `roost rollout
//! --wait` use: a cell shows `Stale` when that verdict is, and "converged" in the view's
//! comparison is that verdict.
//!
//! [`build`] is pure (inputs and "now" in, view out); [`load`] reads the inputs from the
//! fleet database, [`from_retained`] from retained messages read off a broker.

use roost_schemas::ShortRev;
use std::collections::{BTreeMap, HashMap};

use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{Origin, Phase, Presence, PresenceState, StatusDoc, Topics};
use serde::Serialize;

use crate::db::audit::AuditRecord;
use crate::db::{DbError, FleetDb, Gap};
use crate::judge::{self, Report, Verdict, Wanted};

/// The heartbeat assumed for a status document that does not state one (seconds).
pub const DEFAULT_HEARTBEAT_S: u64 = 60;

pub use crate::judge::allowed_silence_s;

/// A retained document as the view reads it: the JSON and, when it came from the fleet
/// database, when the fleet service received it (the cloud's clock, not the store's).
#[derive(Debug, Clone)]
pub struct Doc {
    /// Store.
    pub store: String,
    /// The document.
    pub json: String,
    /// Received at (RFC 3339), if known.
    pub received_at: Option<String>,
}

/// Everything the view is built from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Status documents.
    pub status: Vec<Doc>,
    /// Presence documents.
    pub presence: Vec<Doc>,
    /// Gaps in each store's `roostseq` (only the fleet database knows them).
    pub gaps: Vec<Gap>,
    /// Known commits: revision -> (subject, committed_at).
    pub revisions: HashMap<String, (String, String)>,
    /// The inventory's stores and their labels: each is a row even before it reports (a
    /// store the inventory expects and never heard from is stale, never fine).
    pub labels: BTreeMap<String, roost_schemas::Labels>,
    /// The last audit of the cloud broker's retained desired state (only the fleet
    /// database knows it).
    pub audit: Option<AuditRecord>,
    /// The notifications' deliveries (only the fleet database knows them).
    pub notifications: Option<crate::db::notify::Notifications>,
}

/// Reads the inputs from the fleet database.
pub fn load(db: &FleetDb) -> Result<Inputs, DbError> {
    let (status, presence) = db.with_conn(|c| {
        let read = |table: &str| -> Result<Vec<Doc>, DbError> {
            c.query(
                &format!("SELECT store, json, received_at FROM {table} ORDER BY store"),
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(Doc {
                    store: r.get(0)?,
                    json: r.get(1)?,
                    received_at: r.get(2)?,
                })
            })
            .collect()
        };
        Ok((read("status")?, read("presence")?))
    })?;
    Ok(Inputs {
        status,
        presence,
        gaps: db.gaps()?,
        revisions: db.revisions()?,
        labels: db.with_conn(crate::db::inventory::labels)?,
        audit: db.last_audit()?,
        notifications: db.with_conn(crate::db::notify::overview)?,
    })
}

/// The inputs from retained messages read off a broker (no receive times, no gaps).
pub fn from_retained(topics: &Topics, msgs: &[(String, Vec<u8>)]) -> Inputs {
    let mut inputs = Inputs::default();
    for (t, p) in msgs {
        let Ok(json) = std::str::from_utf8(p) else {
            continue;
        };
        let doc = |store: String| Doc {
            store,
            json: json.to_owned(),
            received_at: None,
        };
        match topics.parse_store_topic(t) {
            Some((s, StoreTopicKind::Status)) => inputs.status.push(doc(s)),
            Some((s, StoreTopicKind::Presence)) => inputs.presence.push(doc(s)),
            _ => {}
        }
    }
    // A store's labels from its retained profile, read (not verified: only shown) off the
    // broker. A profile without labels is a store outside the inventory.
    for (t, p) in msgs {
        let Some(store) = topics.parse_profile_topic(t) else {
            continue;
        };
        let profile = roost_schemas::envelope_payload(p)
            .and_then(|b| serde_json::from_slice::<roost_schemas::Profile>(&b).ok());
        if let Some(profile) = profile.filter(|p| p.store == store && !p.labels.is_empty()) {
            inputs.labels.insert(store, profile.labels);
        }
    }
    inputs
}

/// The whole view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetView {
    /// When it was built (RFC 3339).
    pub generated_at: String,
    /// Counts over every store (before any filter).
    pub summary: Summary,
    /// One row per store, by name.
    pub stores: Vec<StoreRow>,
    /// The last audit of the cloud broker's retained desired state against the record:
    /// when, what started it, what the broker held and what it republished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_audit: Option<AuditRecord>,
    /// Notification deliveries: counts and the newest failing ones (absent when none was
    /// ever queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifications: Option<crate::db::notify::Notifications>,
}

/// Counts for the fleet at a glance.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Summary {
    /// Stores known.
    pub stores: usize,
    /// Online (presence online, or no presence but not silent).
    pub online: usize,
    /// Offline by presence.
    pub offline: usize,
    /// Stale for any reason (offline included).
    pub stale: usize,
    /// Stores with at least one drifted deployment.
    pub drifted: usize,
    /// Stores with gaps in their event sequence.
    pub with_gaps: usize,
    /// Store × deployment cells by shown phase (`Stale` for stale stores).
    pub by_phase: BTreeMap<String, usize>,
    /// Per deployment.
    pub deployments: BTreeMap<String, DeploymentSummary>,
}

/// One deployment across the fleet.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct DeploymentSummary {
    /// Stores that report it.
    pub stores: usize,
    /// Cells by shown phase.
    pub by_phase: BTreeMap<String, usize>,
    /// Applied revisions and how many (fresh) stores run each.
    pub applied: BTreeMap<String, usize>,
    /// Desired revisions and how many stores want each.
    pub desired: BTreeMap<String, usize>,
}

/// Why a store's report cannot be believed as it stands.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Staleness {
    /// The bridge's presence says offline (its last will, or a clean stop).
    Offline {
        /// Since when.
        since: String,
    },
    /// Nothing heard for longer than the store's heartbeat allows.
    Silent {
        /// Seconds since the store was last heard.
        silent_s: u64,
        /// Seconds its heartbeat allows.
        allowed_s: u64,
    },
    /// The agent says its desired state is not confirmed fresh (the signed fleet snapshot
    /// lists newer desired state, or the snapshot expired).
    DesiredNotFresh {
        /// The agent's `desired_freshness`.
        freshness: String,
    },
    /// Presence known, but no status document yet.
    NoStatus,
}

impl Staleness {
    /// A short text for tables.
    pub fn text(&self) -> String {
        match self {
            Staleness::Offline { since } => format!("offline since {since}"),
            Staleness::Silent {
                silent_s,
                allowed_s,
            } => format!("silent {} (allowed {})", age(*silent_s), age(*allowed_s)),
            Staleness::DesiredNotFresh { freshness } => format!("desired state {freshness}"),
            Staleness::NoStatus => "no status yet".into(),
        }
    }
}

/// The bridge's presence as the view shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PresenceInfo {
    /// `online`, `offline` or `unknown` (no presence document: a store without a bridge).
    pub state: String,
    /// Since when.
    pub since: Option<String>,
}

/// One store.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoreRow {
    /// Store.
    pub store: String,
    /// Groups in precedence order.
    pub groups: Vec<String>,
    /// Labels from the fleet repository's inventory (empty outside it).
    pub labels: roost_schemas::Labels,
    /// Presence.
    pub presence: PresenceInfo,
    /// When the store was last heard (RFC 3339).
    pub last_heard: Option<String>,
    /// Seconds since then.
    pub last_heard_age_s: Option<u64>,
    /// Set when the store's report cannot be believed as it stands.
    pub stale: Option<Staleness>,
    /// Missing `roostseq` ranges, `[from, to]`.
    pub gaps: Vec<[u64; 2]>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Events waiting in the agent's outbox.
    pub outbox_backlog: Option<u64>,
    /// Per deployment, by name.
    pub deployments: Vec<Cell>,
}

/// `=` (applied is the desired revision), `>` (the desired revision is ahead of the applied
/// one), or nothing (no desired state).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum Marker {
    /// Applied = desired.
    #[serde(rename = "=")]
    Same,
    /// Desired is ahead.
    #[serde(rename = ">")]
    Ahead,
    /// Nothing desired.
    #[serde(rename = "")]
    None,
}

impl Marker {
    /// As printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Marker::Same => "=",
            Marker::Ahead => ">",
            Marker::None => "",
        }
    }
}

/// A commit as the view shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Revision {
    /// Full commit id.
    pub revision: String,
    /// First 12 characters.
    pub short: String,
    /// Commit subject, when the controller described it.
    pub subject: Option<String>,
    /// Commit time (RFC 3339), when known.
    pub committed_at: Option<String>,
    /// Seconds since the commit.
    pub age_s: Option<u64>,
}

/// The desired state of a deployment on a store.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Desired {
    /// The commit.
    #[serde(flatten)]
    pub commit: Revision,
    /// Sequence of the winning rollout.
    pub sequence: u64,
    /// Its scope (`fleet`, `group:NAME`, `store:NAME`).
    pub scope: String,
    /// The fleet-repository commit it came from.
    pub origin: Option<Origin>,
}

/// One deployment on one store.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cell {
    /// Deployment.
    pub deployment: String,
    /// Desired state.
    pub desired: Option<Desired>,
    /// Applied revision.
    pub applied: Option<Revision>,
    /// `=`, `>` or nothing.
    pub marker: Marker,
    /// The phase the store last reported.
    pub phase: String,
    /// What a reader may believe: `Stale` for a stale store, else the phase.
    pub shown: String,
    /// Live state differs from what was applied.
    pub drift: bool,
    /// Reason code of the last problem.
    pub reason: Option<String>,
    /// Detail.
    pub message: String,
    /// While `Waiting` for a window: when it opens (RFC 3339, the store's offset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_window: Option<String>,
    /// While `Waiting` for dependencies: those not converged on the store yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// While `RolledBack`: the revision that failed (`applied` is the restored one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// The convergence judgement ([`crate::judge`]) against the desired revision; `Stale`
    /// for a stale store.
    #[serde(skip)]
    pub verdict: Verdict,
}

/// Builds the view at `now_ms` (Unix milliseconds). Pure.
pub fn build(inputs: &Inputs, now_ms: u64) -> FleetView {
    let now_s = now_ms / 1000;
    let secs = |t: &str| roost_schemas::parse_rfc3339(t).map(|t| t.unix_timestamp().max(0) as u64);
    let mut status: BTreeMap<&str, (&Doc, Option<StatusDoc>, serde_json::Value)> = BTreeMap::new();
    for d in &inputs.status {
        let raw: serde_json::Value = serde_json::from_str(&d.json).unwrap_or_default();
        status.insert(&d.store, (d, serde_json::from_str(&d.json).ok(), raw));
    }
    let mut presence: BTreeMap<&str, (&Doc, Option<Presence>)> = BTreeMap::new();
    for d in &inputs.presence {
        presence.insert(&d.store, (d, serde_json::from_str(&d.json).ok()));
    }
    let mut gaps: BTreeMap<&str, Vec<[u64; 2]>> = BTreeMap::new();
    for g in &inputs.gaps {
        gaps.entry(&g.store).or_default().push([g.from, g.to]);
    }
    let mut names: Vec<&str> = status
        .keys()
        .chain(presence.keys())
        .copied()
        .chain(inputs.labels.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let revision = |rev: &str| {
        let known = inputs.revisions.get(rev);
        let committed_at = known.map(|(_, at)| at.clone()).filter(|a| !a.is_empty());
        Revision {
            revision: rev.to_owned(),
            short: ShortRev::of(rev).to_string(),
            subject: known.map(|(s, _)| s.clone()),
            age_s: committed_at
                .as_deref()
                .and_then(secs)
                .map(|t| now_s.saturating_sub(t)),
            committed_at,
        }
    };
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let st = status.get(name);
        let pr = presence.get(name);
        let doc = st.and_then(|(_, d, _)| d.as_ref());
        // Last heard: the cloud's receive time when known, else the documents' own times.
        let heard = [
            st.map(|(d, s, _)| {
                d.received_at
                    .clone()
                    .or_else(|| s.as_ref().map(|s| s.updated_at.clone()))
            }),
            pr.map(|(d, p)| {
                d.received_at
                    .clone()
                    .or_else(|| p.as_ref().map(|p| p.since.clone()))
            }),
        ];
        let last_heard: Option<(u64, String)> = heard
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t: String| secs(&t).map(|s| (s, t)))
            .max();
        let heartbeat_s = doc
            .and_then(|d| d.heartbeat_s)
            .unwrap_or(DEFAULT_HEARTBEAT_S);
        let reported = match pr.and_then(|(_, p)| p.as_ref()) {
            Some(p) => PresenceInfo {
                state: match p.state {
                    PresenceState::Online => "online".into(),
                    PresenceState::Offline => "offline".into(),
                },
                since: Some(p.since.clone()),
            },
            None => PresenceInfo {
                state: "unknown".into(),
                since: None,
            },
        };
        let freshness = st
            .and_then(|(_, _, raw)| raw.get("desired_freshness"))
            .and_then(|f| f.as_str())
            .map(str::to_owned);
        let stale = staleness(
            &reported,
            doc.is_some(),
            last_heard.as_ref().map(|(s, _)| *s),
            heartbeat_s,
            freshness.as_deref(),
            now_s,
        );
        // The one presence rule ([`judge::online`]): a retained "online" from a store not
        // heard within its heartbeat allowance (its broker node died and took its will with
        // it) shows offline, since it was last heard.
        let presence_info = if reported.state == "online"
            && !judge::online(
                Some(PresenceState::Online),
                last_heard.as_ref().map(|(s, _)| *s),
                heartbeat_s,
                now_s,
            ) {
            PresenceInfo {
                state: "offline".into(),
                since: last_heard.as_ref().map(|(_, t)| t.clone()),
            }
        } else {
            reported
        };
        let deployments = doc
            .map(|d| {
                d.deployments
                    .iter()
                    .map(|(dep, s)| {
                        let desired = s.desired.as_ref().map(|x| Desired {
                            commit: revision(&x.revision),
                            sequence: x.sequence,
                            scope: x.scope.clone(),
                            origin: x.origin.clone(),
                        });
                        let marker = match (&s.desired, &s.applied_revision) {
                            (None, _) => Marker::None,
                            (Some(d), Some(a)) if d.revision == *a => Marker::Same,
                            (Some(_), _) => Marker::Ahead,
                        };
                        let report = Report {
                            status: Some(s),
                            stale: stale.is_some(),
                        };
                        let wanted = s.desired.as_ref().map(|d| d.revision.as_str());
                        let verdict =
                            judge::verdict(&report, &Wanted::revision(wanted.unwrap_or_default()));
                        Cell {
                            deployment: dep.clone(),
                            desired,
                            applied: s.applied_revision.as_deref().map(revision),
                            marker,
                            phase: s.phase.as_str().to_owned(),
                            shown: shown(s.phase, &verdict),
                            drift: s.drift,
                            reason: s.reason.clone(),
                            message: s.message.clone(),
                            next_window: s.next_window.clone(),
                            waiting_for: s.waiting_for.clone(),
                            failed_revision: s.failed_revision.clone(),
                            verdict,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.push(StoreRow {
            store: name.to_owned(),
            groups: doc.map(|d| d.groups.clone()).unwrap_or_default(),
            labels: inputs.labels.get(name).cloned().unwrap_or_default(),
            presence: presence_info,
            last_heard_age_s: last_heard.as_ref().map(|(s, _)| now_s.saturating_sub(*s)),
            last_heard: last_heard.map(|(_, t)| t),
            stale,
            gaps: gaps.remove(name).unwrap_or_default(),
            agent_version: doc.map(|d| d.agent_version.clone()),
            outbox_backlog: doc.map(|d| d.outbox_backlog),
            deployments,
        });
    }
    FleetView {
        generated_at: rfc3339_ms(now_ms),
        summary: summarize(&rows),
        stores: rows,
        broker_audit: inputs.audit.clone(),
        notifications: inputs.notifications.clone(),
    }
}

/// The stale rule. Pure.
pub fn staleness(
    presence: &PresenceInfo,
    has_status: bool,
    last_heard_s: Option<u64>,
    heartbeat_s: u64,
    freshness: Option<&str>,
    now_s: u64,
) -> Option<Staleness> {
    if presence.state == "offline" {
        return Some(Staleness::Offline {
            since: presence.since.clone().unwrap_or_default(),
        });
    }
    let allowed_s = allowed_silence_s(heartbeat_s);
    let silent_s = last_heard_s.map(|t| now_s.saturating_sub(t));
    match silent_s {
        Some(s) if s > allowed_s => {
            return Some(Staleness::Silent {
                silent_s: s,
                allowed_s,
            })
        }
        None => {
            return Some(Staleness::Silent {
                silent_s: u64::MAX,
                allowed_s,
            })
        }
        _ => {}
    }
    if !has_status {
        return Some(Staleness::NoStatus);
    }
    match freshness {
        Some(f @ ("stale" | "expired")) => Some(Staleness::DesiredNotFresh {
            freshness: f.to_owned(),
        }),
        _ => None,
    }
}

/// What a cell shows: `Stale` when the judgement is (a stale store is never shown
/// converged), else the phase.
fn shown(phase: Phase, verdict: &Verdict) -> String {
    if verdict.is_stale() {
        "Stale".into()
    } else {
        phase.as_str().into()
    }
}

/// Counts over `rows`.
pub fn summarize(rows: &[StoreRow]) -> Summary {
    let mut s = Summary {
        stores: rows.len(),
        ..Summary::default()
    };
    for r in rows {
        match (&r.stale, r.presence.state.as_str()) {
            (_, "offline") => s.offline += 1,
            (Some(Staleness::Silent { .. }), "unknown") => {}
            _ => s.online += 1,
        }
        if r.stale.is_some() {
            s.stale += 1;
        }
        if r.deployments.iter().any(|c| c.drift) {
            s.drifted += 1;
        }
        if !r.gaps.is_empty() {
            s.with_gaps += 1;
        }
        for c in &r.deployments {
            *s.by_phase.entry(c.shown.clone()).or_default() += 1;
            let d = s.deployments.entry(c.deployment.clone()).or_default();
            d.stores += 1;
            *d.by_phase.entry(c.shown.clone()).or_default() += 1;
            if let (Some(a), None) = (&c.applied, &r.stale) {
                *d.applied.entry(a.revision.clone()).or_default() += 1;
            }
            if let Some(x) = &c.desired {
                *d.desired.entry(x.commit.revision.clone()).or_default() += 1;
            }
        }
    }
    s
}

/// What to show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Stores in this group.
    pub group: Option<String>,
    /// Cells in this shown phase (case-insensitive; `stale` matches stale stores).
    pub phase: Option<String>,
    /// Only stale stores.
    pub stale: bool,
    /// Only this deployment.
    pub deployment: Option<String>,
    /// Stores whose name contains this.
    pub store: Option<String>,
    /// Stores whose inventory labels match (Kubernetes label selector syntax).
    pub selector: Option<roost_schemas::Selector>,
}

impl Filter {
    /// Whether anything is filtered.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// The rows `f` selects (cells filtered too; a store left without cells by a deployment or
/// phase filter is dropped). The summary stays the whole fleet's.
pub fn filter(view: &FleetView, f: &Filter) -> Vec<StoreRow> {
    view.stores
        .iter()
        .filter(|r| f.group.as_ref().is_none_or(|g| r.groups.contains(g)))
        .filter(|r| f.selector.as_ref().is_none_or(|s| s.matches(&r.labels)))
        .filter(|r| !f.stale || r.stale.is_some())
        .filter(|r| {
            f.store
                .as_ref()
                .is_none_or(|s| r.store.contains(s.as_str()))
        })
        .filter_map(|r| {
            if f.deployment.is_none() && f.phase.is_none() {
                return Some(r.clone());
            }
            let cells: Vec<Cell> = r
                .deployments
                .iter()
                .filter(|c| f.deployment.as_ref().is_none_or(|d| c.deployment == *d))
                .filter(|c| {
                    f.phase
                        .as_ref()
                        .is_none_or(|p| c.shown.eq_ignore_ascii_case(p))
                })
                .cloned()
                .collect();
            (!cells.is_empty()).then(|| StoreRow {
                deployments: cells,
                ..r.clone()
            })
        })
        .collect()
}

/// A set of stores to compare: `fleet`, `group:NAME` or `store:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every store.
    Fleet,
    /// A group's stores.
    Group(String),
    /// One store.
    Store(String),
}

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Selector, String> {
        match s.split_once(':') {
            None if s == "fleet" => Ok(Selector::Fleet),
            Some(("group", g)) if !g.is_empty() => Ok(Selector::Group(g.to_owned())),
            Some(("store", n)) if !n.is_empty() => Ok(Selector::Store(n.to_owned())),
            _ => Err(format!("{s:?}: expected fleet, group:NAME or store:NAME")),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Fleet => write!(f, "fleet"),
            Selector::Group(g) => write!(f, "group:{g}"),
            Selector::Store(s) => write!(f, "store:{s}"),
        }
    }
}

impl Selector {
    fn selects(&self, r: &StoreRow) -> bool {
        match self {
            Selector::Fleet => true,
            Selector::Group(g) => r.groups.contains(g),
            Selector::Store(s) => r.store == *s,
        }
    }
}

/// What a set of stores runs of one deployment.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Runs {
    /// The revision most of its fresh stores converged on.
    pub revision: Option<Revision>,
    /// Stores in the set that report the deployment.
    pub stores: usize,
    /// Of those, fresh and converged on `revision`.
    pub converged: usize,
    /// Stale ones.
    pub stale: usize,
    /// More than one applied revision among the fresh stores.
    pub mixed: bool,
}

/// One deployment compared between two sets of stores (Weave Cloud's table).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Comparison {
    /// Deployment.
    pub deployment: String,
    /// The source set.
    pub source: Runs,
    /// The target set.
    pub target: Runs,
    /// `=` same revision; `>` the source runs a newer commit; `<` an older one; `!=`
    /// different, order unknown.
    pub marker: String,
    /// The target can be updated to what the source runs: every source store reporting it is
    /// fresh and converged on one revision, and not every target store runs it.
    pub updatable: bool,
}

/// Compares what `source` runs with what `target` runs, per deployment. Pure.
pub fn compare(view: &FleetView, source: &Selector, target: &Selector) -> Vec<Comparison> {
    let runs = |sel: &Selector, dep: &str| {
        let mut counts: BTreeMap<&str, (usize, Option<&Revision>)> = BTreeMap::new();
        let (mut stores, mut stale) = (0, 0);
        for r in view.stores.iter().filter(|r| sel.selects(r)) {
            let Some(c) = r.deployments.iter().find(|c| c.deployment == dep) else {
                continue;
            };
            stores += 1;
            if r.stale.is_some() {
                stale += 1;
                continue;
            }
            if let (Some(a), Verdict::Converged) = (&c.applied, &c.verdict) {
                let e = counts.entry(&a.revision).or_insert((0, Some(a)));
                e.0 += 1;
            }
        }
        let top = counts
            .values()
            .max_by_key(|(n, r)| (*n, r.map(|r| r.revision.clone())))
            .copied();
        Runs {
            revision: top.and_then(|(_, r)| r.cloned()),
            stores,
            converged: top.map(|(n, _)| n).unwrap_or(0),
            stale,
            mixed: counts.len() > 1,
        }
    };
    let deployments: std::collections::BTreeSet<&str> = view
        .stores
        .iter()
        .flat_map(|r| r.deployments.iter().map(|c| c.deployment.as_str()))
        .collect();
    deployments
        .into_iter()
        .map(|dep| {
            let (s, t) = (runs(source, dep), runs(target, dep));
            let marker = match (&s.revision, &t.revision) {
                (Some(a), Some(b)) if a.revision == b.revision => "=",
                (Some(a), Some(b)) => match (&a.committed_at, &b.committed_at) {
                    (Some(x), Some(y)) if x > y => ">",
                    (Some(x), Some(y)) if x < y => "<",
                    _ => "!=",
                },
                (Some(_), None) => ">",
                (None, Some(_)) => "<",
                (None, None) => "",
            }
            .to_owned();
            let updatable = s.revision.is_some()
                && s.stores > 0
                && s.converged == s.stores
                && !(marker == "=" && t.converged == t.stores && !t.mixed && t.stale == 0);
            Comparison {
                deployment: dep.to_owned(),
                source: s,
                target: t,
                marker,
                updatable,
            }
        })
        .collect()
}

/// "12s", "5m", "3h", "2d".
pub fn age(s: u64) -> String {
    match s {
        u64::MAX => "never".into(),
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, v) in r.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let line = |vals: &[String]| {
        vals.iter()
            .enumerate()
            .map(|(i, v)| {
                let pad = widths[i].saturating_sub(v.chars().count());
                format!("{v}{}", " ".repeat(pad))
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// The note of a waiting or rolled-back cell: why and until when, or what was restored.
pub fn cell_note(c: &Cell) -> Option<String> {
    match c.phase.as_str() {
        "Waiting" => Some(match (&c.next_window, c.waiting_for.is_empty()) {
            (Some(t), _) => format!("window: waits until {t}"),
            (None, false) => format!("dependency: waits for {}", c.waiting_for.join(", ")),
            (None, true) => format!(
                "{}: no window opens within a year",
                c.reason.as_deref().unwrap_or("window")
            ),
        }),
        "RolledBack" => Some(format!(
            "rolled back from {} ({}); {} restored",
            c.failed_revision
                .as_deref()
                .map(|r| ShortRev::of(r).to_string())
                .unwrap_or_else(|| "?".into()),
            c.reason.as_deref().unwrap_or("failed"),
            c.applied
                .as_ref()
                .map(|a| ShortRev::of(&a.revision).to_string())
                .unwrap_or_else(|| "?".into())
        )),
        _ => None,
    }
}

/// The source-vs-target table: one line per store and deployment; with `show_labels`, a
/// LABELS column after the store (its inventory labels, `k=v,k2=v2`).
pub fn render(rows: &[StoreRow], show_labels: bool) -> String {
    let mut header = vec![
        "STORE",
        "DEPLOYMENT",
        "DESIRED",
        "",
        "APPLIED",
        "PHASE",
        "DRIFT",
        "PRESENCE",
        "HEARD",
        "GAPS",
        "FROM",
        "NOTE",
    ];
    if show_labels {
        header.insert(1, "LABELS");
    }
    let mut lines: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let labels = labels_cell(&r.labels);
        let mut push = |mut line: Vec<String>| {
            if show_labels {
                line.insert(1, labels.clone());
            }
            lines.push(line);
        };
        let presence = r.presence.state.clone();
        let heard = r
            .last_heard_age_s
            .map(|a| format!("{} ago", age(a)))
            .unwrap_or_else(|| "-".into());
        let gaps = if r.gaps.is_empty() {
            "-".to_owned()
        } else {
            r.gaps
                .iter()
                .map(|[a, b]| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}..{b}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let note = |c: Option<&Cell>| {
            let mut n = r.stale.as_ref().map(|s| s.text()).unwrap_or_default();
            if let Some(c) = c {
                if r.stale.is_some() {
                    n = format!("{n}; last reported {}", c.phase);
                } else if let Some(w) = cell_note(c) {
                    n = w;
                } else if let Some(reason) = &c.reason {
                    n = format!("{reason}: {}", truncate(&c.message, 60));
                }
            }
            n
        };
        if r.deployments.is_empty() {
            push(vec![
                r.store.clone(),
                "-".into(),
                "-".into(),
                "".into(),
                "-".into(),
                if r.stale.is_some() {
                    "Stale".into()
                } else {
                    "-".into()
                },
                "-".into(),
                presence,
                heard,
                gaps,
                "-".into(),
                note(None),
            ]);
            continue;
        }
        for c in &r.deployments {
            let desired = c
                .desired
                .as_ref()
                .map(|d| {
                    let mut s = d.commit.short.clone();
                    if let Some(subj) = &d.commit.subject {
                        s.push_str(&format!(" {}", truncate(subj, 28)));
                    }
                    if let Some(a) = d.commit.age_s {
                        s.push_str(&format!(" ({})", age(a)));
                    }
                    s
                })
                .unwrap_or_else(|| "-".into());
            let from = c
                .desired
                .as_ref()
                .and_then(|d| d.origin.as_ref())
                .map(|o| o.commit.chars().take(12).collect())
                .unwrap_or_else(|| "-".into());
            push(vec![
                r.store.clone(),
                c.deployment.clone(),
                desired,
                c.marker.as_str().into(),
                c.applied
                    .as_ref()
                    .map(|a| a.short.clone())
                    .unwrap_or_else(|| "-".into()),
                c.shown.clone(),
                if c.drift { "yes".into() } else { "no".into() },
                presence.clone(),
                heard.clone(),
                gaps.clone(),
                from,
                note(Some(c)),
            ]);
        }
    }
    table(&header, &lines)
}

/// A store's labels as one cell: `k=v,k2=v2`, `-` for none.
fn labels_cell(labels: &roost_schemas::Labels) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The summary line above the table.
pub fn render_summary(s: &Summary) -> String {
    let phases = s
        .by_phase
        .iter()
        .map(|(p, n)| format!("{p} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{} stores: {} online, {} offline, {} stale, {} drifted, {} with event gaps; {}\n",
        s.stores,
        s.online,
        s.offline,
        s.stale,
        s.drifted,
        s.with_gaps,
        if phases.is_empty() {
            "no deployments".into()
        } else {
            phases
        }
    )
}

/// The line about the last broker audit (empty before the first, or from a broker's retained
/// messages, which know nothing of audits).
pub fn render_audit(a: Option<&AuditRecord>) -> String {
    let Some(a) = a else {
        return String::new();
    };
    let repaired = if a.repaired.is_empty() {
        "nothing to repair".to_owned()
    } else {
        format!("republished {}", a.repaired.join(", "))
    };
    format!(
        "broker audit {} ({}): the broker held {} desired-state topics, {repaired}; {} audits, {} topics republished in all\n",
        a.at, a.trigger, a.held, a.audits, a.repaired_total
    )
}

/// The comparison table (Weave Cloud's "source vs target").
pub fn render_compare(source: &Selector, target: &Selector, rows: &[Comparison]) -> String {
    let runs = |r: &Runs| {
        let rev = r
            .revision
            .as_ref()
            .map(|x| {
                let mut s = x.short.clone();
                if let Some(subj) = &x.subject {
                    s.push_str(&format!(" {}", truncate(subj, 28)));
                }
                s
            })
            .unwrap_or_else(|| "-".into());
        let mut s = format!("{rev} ({}/{}", r.converged, r.stores);
        if r.stale > 0 {
            s.push_str(&format!(", {} stale", r.stale));
        }
        if r.mixed {
            s.push_str(", mixed");
        }
        s.push(')');
        s
    };
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.deployment.clone(),
                runs(&c.source),
                c.marker.clone(),
                runs(&c.target),
                if c.updatable {
                    format!(
                        "Updatable: roost promote {} --from {source} --to {target}",
                        c.deployment
                    )
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let (s, t) = (
        source.to_string().to_uppercase(),
        target.to_string().to_uppercase(),
    );
    table(&["DEPLOYMENT", &s, "", &t, "ACTION"], &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn at(secs_ago: u64) -> String {
        rfc3339_ms(NOW_MS - secs_ago * 1000)
    }

    fn status(store: &str, groups: &[&str], deps: &[(&str, &str, Option<&str>, &str)]) -> String {
        let deployments: serde_json::Map<String, serde_json::Value> = deps
            .iter()
            .map(|(d, desired, applied, phase)| {
                let mut v = serde_json::json!({
                    "desired": {"revision": desired, "sequence": 7, "scope": "fleet",
                        "origin": {"repo": "git://fleet", "commit": "f".repeat(40), "path": "roost.yaml"}},
                    "phase": phase,
                });
                if let Some(a) = applied {
                    v["applied_revision"] = serde_json::json!(a);
                }
                ((*d).to_owned(), v)
            })
            .collect();
        serde_json::json!({
            "store": store, "groups": groups, "agent_version": "0.1.0",
            "updated_at": at(1), "roostseq": 3, "outbox_backlog": 0,
            "deployments": deployments, "heartbeat_s": 10,
        })
        .to_string()
    }

    fn doc(store: &str, json: String, received_secs_ago: Option<u64>) -> Doc {
        Doc {
            store: store.into(),
            json,
            received_at: received_secs_ago.map(at),
        }
    }

    fn presence(state: &str) -> String {
        serde_json::json!({"state": state, "since": at(100)}).to_string()
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn fleet() -> Inputs {
        let mut revisions = HashMap::new();
        revisions.insert(A.to_owned(), ("old menu".to_owned(), at(7200)));
        revisions.insert(B.to_owned(), ("new menu".to_owned(), at(60)));
        Inputs {
            status: vec![
                // Converged on B, heard 5 s ago.
                doc(
                    "s1",
                    status("s1", &["canary"], &[("menu", B, Some(B), "Converged")]),
                    Some(5),
                ),
                // Converged on A but offline: stale.
                doc(
                    "s2",
                    status("s2", &[], &[("menu", A, Some(A), "Converged")]),
                    Some(5),
                ),
                // Converged on A, but silent for 60 s with a 10 s heartbeat: stale.
                doc(
                    "s3",
                    status("s3", &[], &[("menu", A, Some(A), "Converged")]),
                    Some(60),
                ),
                // Wants B, still on A.
                doc(
                    "s4",
                    status("s4", &[], &[("menu", B, Some(A), "Applying")]),
                    Some(2),
                ),
            ],
            presence: vec![
                doc("s1", presence("online"), Some(100)),
                doc("s2", presence("offline"), Some(30)),
                doc("s3", presence("online"), Some(100)),
                doc("s4", presence("online"), Some(100)),
                // Presence only: no status yet.
                doc("s5", presence("online"), Some(3)),
            ],
            gaps: vec![Gap {
                store: "s4".into(),
                from: 2,
                to: 2,
            }],
            revisions,
            labels: BTreeMap::new(),
            audit: None,
            notifications: None,
        }
    }

    #[test]
    fn inventory_labels_show_filter_and_a_store_never_heard_is_stale() {
        let mut inputs = fleet();
        let labels = |region: &str| -> roost_schemas::Labels {
            [("region".to_owned(), region.to_owned())].into()
        };
        inputs.labels.insert("s1".into(), labels("us-east"));
        inputs.labels.insert("s4".into(), labels("us-south"));
        // In the inventory, never reported anything.
        inputs.labels.insert("s9".into(), labels("us-south"));
        let v = build(&inputs, NOW_MS);
        let s9 = v
            .stores
            .iter()
            .find(|r| r.store == "s9")
            .expect("s9 is a row");
        assert!(s9.stale.is_some(), "a store never heard from is stale");
        assert_eq!(s9.labels["region"], "us-south");
        assert_eq!(v.summary.stores, 6);
        let names = |sel: &str| -> Vec<String> {
            filter(
                &v,
                &Filter {
                    selector: Some(sel.parse().expect("selector")),
                    ..Default::default()
                },
            )
            .into_iter()
            .map(|r| r.store)
            .collect()
        };
        assert_eq!(names("region=us-south"), ["s4", "s9"]);
        assert_eq!(names("region in (us-east, us-west)"), ["s1"]);
        assert_eq!(names("!region"), ["s2", "s3", "s5"]);
    }

    #[test]
    fn a_stale_store_is_never_shown_converged() {
        let v = build(&fleet(), NOW_MS);
        let shown: Vec<(&str, &str, bool)> = v
            .stores
            .iter()
            .flat_map(|r| {
                r.deployments
                    .iter()
                    .map(move |c| (r.store.as_str(), c.shown.as_str(), r.stale.is_some()))
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("s1", "Converged", false),
                ("s2", "Stale", true),
                ("s3", "Stale", true),
                ("s4", "Applying", false),
            ]
        );
        let s2 = &v.stores[1];
        assert!(matches!(s2.stale, Some(Staleness::Offline { .. })));
        assert_eq!(
            s2.deployments[0].phase, "Converged",
            "the last report stays visible"
        );
        assert_eq!(
            v.stores[2].stale,
            Some(Staleness::Silent {
                silent_s: 60,
                allowed_s: 30
            })
        );
        assert_eq!(v.stores[4].stale, Some(Staleness::NoStatus));
        assert_eq!(v.summary.stale, 3);
        // s3's retained presence says online, but it has been silent past its heartbeat: its
        // node may have died without its will; it shows offline, since it was last heard.
        assert_eq!(v.stores[2].presence.state, "offline");
        assert_eq!(v.stores[2].presence.since.as_deref(), Some(at(60).as_str()));
        assert_eq!(v.summary.offline, 2);
        assert_eq!(v.summary.by_phase.get("Converged"), Some(&1));
        assert_eq!(v.summary.by_phase.get("Stale"), Some(&2));
        assert_eq!(v.summary.with_gaps, 1);
    }

    #[test]
    fn cells_carry_full_revisions_subjects_ages_markers_and_origins() {
        let v = build(&fleet(), NOW_MS);
        let s4 = &v.stores[3].deployments[0];
        let d = s4.desired.as_ref().expect("desired");
        assert_eq!(d.commit.revision, B);
        assert_eq!(d.commit.short, &B[..12]);
        assert_eq!(d.commit.subject.as_deref(), Some("new menu"));
        assert_eq!(d.commit.age_s, Some(60));
        assert_eq!(d.origin.as_ref().map(|o| o.commit.len()), Some(40));
        assert_eq!(s4.marker, Marker::Ahead);
        assert_eq!(v.stores[0].deployments[0].marker, Marker::Same);
        assert_eq!(v.stores[3].gaps, vec![[2, 2]]);
        assert_eq!(v.stores[3].last_heard_age_s, Some(2));
        let text = render(&v.stores, false);
        assert!(
            text.contains("bbbbbbbbbbbb new menu (60s)  >  aaaaaaaaaaaa"),
            "{text}"
        );
        assert!(text.contains("offline since"), "{text}");
    }

    #[test]
    fn the_stale_rule() {
        let online = PresenceInfo {
            state: "online".into(),
            since: None,
        };
        let unknown = PresenceInfo {
            state: "unknown".into(),
            since: None,
        };
        let offline = PresenceInfo {
            state: "offline".into(),
            since: Some("t".into()),
        };
        let now = 1000;
        type Case<'a> = (
            &'a PresenceInfo,
            bool,
            Option<u64>,
            u64,
            Option<&'a str>,
            bool,
        );
        let cases: &[Case] = &[
            // presence, status, last heard, heartbeat, freshness -> stale?
            (&online, true, Some(990), 60, None, false),
            (&online, true, Some(1000 - 155), 60, None, false),
            (&online, true, Some(1000 - 156), 60, None, true),
            (&unknown, true, Some(990), 10, None, false),
            (&unknown, true, Some(960), 10, None, true),
            (&offline, true, Some(999), 60, None, true),
            (&online, true, None, 60, None, true),
            (&online, false, Some(999), 60, None, true),
            (&online, true, Some(999), 60, Some("fresh"), false),
            (&online, true, Some(999), 60, Some("stale"), true),
            (&online, true, Some(999), 60, Some("expired"), true),
            (&online, true, Some(999), 60, Some("unknown"), false),
        ];
        for (p, st, heard, hb, fresh, want) in cases {
            assert_eq!(
                staleness(p, *st, *heard, *hb, *fresh, now).is_some(),
                *want,
                "{p:?} status={st} heard={heard:?} hb={hb} fresh={fresh:?}"
            );
        }
    }

    #[test]
    fn filters() {
        let v = build(&fleet(), NOW_MS);
        let names =
            |f: Filter| -> Vec<String> { filter(&v, &f).into_iter().map(|r| r.store).collect() };
        assert_eq!(
            names(Filter {
                stale: true,
                ..Default::default()
            }),
            ["s2", "s3", "s5"]
        );
        assert_eq!(
            names(Filter {
                group: Some("canary".into()),
                ..Default::default()
            }),
            ["s1"]
        );
        assert_eq!(
            names(Filter {
                phase: Some("applying".into()),
                ..Default::default()
            }),
            ["s4"]
        );
        assert_eq!(
            names(Filter {
                phase: Some("Stale".into()),
                ..Default::default()
            }),
            ["s2", "s3"]
        );
        assert_eq!(
            names(Filter {
                deployment: Some("menu".into()),
                ..Default::default()
            }),
            ["s1", "s2", "s3", "s4"]
        );
        assert!(names(Filter {
            deployment: Some("other".into()),
            ..Default::default()
        })
        .is_empty());
        assert_eq!(
            names(Filter {
                store: Some("4".into()),
                ..Default::default()
            }),
            ["s4"]
        );
    }

    #[test]
    fn compare_canary_with_the_fleet() {
        let v = build(&fleet(), NOW_MS);
        let c = compare(&v, &Selector::Group("canary".into()), &Selector::Fleet);
        assert_eq!(c.len(), 1);
        let menu = &c[0];
        assert_eq!(
            menu.source.revision.as_ref().map(|r| r.revision.as_str()),
            Some(B)
        );
        assert_eq!((menu.source.converged, menu.source.stores), (1, 1));
        // The fleet: s1 on B, s2/s3 stale, s4 applying: B is what most fresh stores run.
        assert_eq!((menu.target.stores, menu.target.stale), (4, 2));
        assert_eq!(menu.marker, "=");
        assert!(menu.updatable, "not every fleet store runs B");
        let text = render_compare(&Selector::Group("canary".into()), &Selector::Fleet, &c);
        assert!(
            text.contains("Updatable: roost promote menu --from group:canary --to fleet"),
            "{text}"
        );
        // A store that runs the old revision, compared with the canary.
        let c = compare(
            &v,
            &Selector::Store("s1".into()),
            &Selector::Store("s2".into()),
        );
        assert_eq!(
            c[0].marker, ">",
            "s2 is stale: nothing fresh to compare with"
        );
        assert!(c[0].updatable);
        assert!("group:".parse::<Selector>().is_err());
        assert_eq!(
            "store:s1".parse::<Selector>(),
            Ok(Selector::Store("s1".into()))
        );
    }

    #[test]
    fn retained_inputs_use_the_documents_own_times() {
        let topics = Topics::default();
        let msgs = vec![
            (
                topics.status("s1"),
                status("s1", &[], &[("menu", A, Some(A), "Converged")]).into_bytes(),
            ),
            (topics.presence("s1"), presence("online").into_bytes()),
        ];
        let v = build(&from_retained(&topics, &msgs), NOW_MS);
        assert_eq!(v.stores.len(), 1);
        assert_eq!(
            v.stores[0].last_heard_age_s,
            Some(1),
            "updated_at, the newer of the two"
        );
        assert_eq!(v.stores[0].stale, None);
    }
}
