//! The agent's durable ledger, in the outbox's SQLite database: the accepted rollout of every
//! (scope, deployment) slot (the replay guard and the inputs to precedence), the accepted
//! store profile (its replay guard and the groups in force) and every deployment's [`Record`]. A record is committed in the same transaction as the events that
//! report it, and the retained status document is derived from the records alone. All SQLite
//! work runs on the outbox's writer thread, never on the async runtime.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_runtime::outbox::Payload;
use roost_runtime::{Durability, NewMessage, Outbox, OutboxError};
use roost_schemas::{EventData, Freshness, Profile, Rollout, Scope, Snapshot, StatusDoc};
use rusqlite::params;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::personalize::StoreContext;
use crate::reconcile::machine::Record;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The outbox (its database or writer thread) failed.
    #[error("agent ledger")]
    Outbox(#[from] OutboxError),
    /// SQLite failed.
    #[error("agent ledger database")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row is unreadable.
    #[error("agent ledger holds an unreadable {what}")]
    Json {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The last accepted envelope of one scope slot.
#[derive(Debug, Clone)]
pub struct AcceptedSlot {
    /// The rollout.
    pub rollout: Rollout,
    /// SHA-256 of the payload bytes.
    pub digest: String,
}

/// The last accepted fleet snapshot (the snapshot replay guard) and when the desired state
/// was last confirmed fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// SHA-256 of its payload bytes.
    pub digest: String,
    /// When the agent last found everything it lists for this store held (RFC 3339).
    pub confirmed_at: Option<String>,
}

/// The last accepted store profile (the profile replay guard and the store context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProfile {
    /// The profile.
    pub profile: Profile,
    /// SHA-256 of its payload bytes.
    pub digest: String,
}

#[derive(Default)]
struct Mem {
    records: BTreeMap<String, Record>,
    accepted: HashMap<(String, String), AcceptedSlot>,
    snapshot: Option<StoredSnapshot>,
    profile: Option<StoredProfile>,
    freshness: Freshness,
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    outbox: Outbox,
    events_topic: String,
    source: String,
    mem: Arc<Mutex<Mem>>,
    changed: Arc<Notify>,
    /// Bumped after every committed record: what a deployment waiting for others watches.
    records: Arc<tokio::sync::watch::Sender<u64>>,
    /// The store's name and configured groups: the context until the first profile.
    bootstrap: Arc<StoreContext>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("source", &self.source)
            .finish()
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS agent_accepted (
        scope TEXT NOT NULL,
        deployment TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        digest TEXT NOT NULL,
        rollout TEXT NOT NULL,
        envelope BLOB NOT NULL,
        PRIMARY KEY (scope, deployment)
    );
    CREATE TABLE IF NOT EXISTS agent_deployments (
        deployment TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS agent_snapshot (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sequence INTEGER NOT NULL,
        digest TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        confirmed_at TEXT
    );
    CREATE TABLE IF NOT EXISTS agent_profile (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sequence INTEGER NOT NULL,
        digest TEXT NOT NULL,
        profile TEXT NOT NULL,
        envelope BLOB NOT NULL
    );";

type Loaded = (
    Vec<(String, String, String, String)>,
    Vec<(String, String)>,
    Option<(String, String, Option<String>)>,
    Option<(String, String)>,
);

/// The row with id 1 of a single-row table, if there is one.
fn single_row<T>(
    c: &rusqlite::Connection,
    sql: &str,
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    c.query_row(sql, [], row).map(Some).or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    })
}

impl Ledger {
    /// Opens the ledger in `outbox`'s database (creating its tables) and loads it.
    /// `bootstrap` (the store's name and configured groups) is the store context until the
    /// first profile is accepted.
    pub async fn open(
        outbox: Outbox,
        events_topic: String,
        source: String,
        bootstrap: StoreContext,
    ) -> Result<Ledger, LedgerError> {
        let loaded: Result<Loaded, rusqlite::Error> = outbox
            .read(|c| {
                c.execute_batch(SCHEMA)?;
                let mut stmt =
                    c.prepare("SELECT scope, deployment, digest, rollout FROM agent_accepted")?;
                let acc = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut stmt = c.prepare("SELECT deployment, record FROM agent_deployments")?;
                let recs = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                let snap = single_row(
                    c,
                    "SELECT digest, snapshot, confirmed_at FROM agent_snapshot WHERE id = 1",
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let profile = single_row(
                    c,
                    "SELECT digest, profile FROM agent_profile WHERE id = 1",
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok((acc, recs, snap, profile))
            })
            .await?;
        let (acc, recs, snap, profile) = loaded?;
        let mut mem = Mem::default();
        if let Some((digest, json)) = profile {
            let profile: Profile =
                serde_json::from_str(&json).map_err(|source| LedgerError::Json {
                    what: "accepted profile",
                    source,
                })?;
            mem.profile = Some(StoredProfile { profile, digest });
        }
        if let Some((digest, json, confirmed_at)) = snap {
            let snapshot: Snapshot =
                serde_json::from_str(&json).map_err(|source| LedgerError::Json {
                    what: "accepted snapshot",
                    source,
                })?;
            mem.snapshot = Some(StoredSnapshot {
                snapshot,
                digest,
                confirmed_at,
            });
        }
        for (scope, deployment, digest, json) in acc {
            let rollout: Rollout =
                serde_json::from_str(&json).map_err(|source| LedgerError::Json {
                    what: "accepted rollout",
                    source,
                })?;
            mem.accepted
                .insert((scope, deployment), AcceptedSlot { rollout, digest });
        }
        for (deployment, json) in recs {
            let rec: Record = serde_json::from_str(&json).map_err(|source| LedgerError::Json {
                what: "deployment record",
                source,
            })?;
            mem.records.insert(deployment, rec);
        }
        Ok(Ledger {
            outbox,
            events_topic,
            source,
            mem: Arc::new(Mutex::new(mem)),
            changed: Arc::new(Notify::new()),
            records: Arc::new(tokio::sync::watch::Sender::new(0)),
            bootstrap: Arc::new(bootstrap),
        })
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        match self.mem.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    fn messages(&self, events: Vec<EventData>) -> Vec<NewMessage> {
        events
            .into_iter()
            .map(|e| {
                let ty = e.event_type();
                info!(
                    event = ty.as_str(),
                    deployment = e.deployment().unwrap_or(""),
                    "event"
                );
                NewMessage::event(self.events_topic.clone(), e.into_event(&self.source))
            })
            .collect()
    }

    /// A deployment's record (a fresh one if none was ever stored).
    pub fn record(&self, deployment: &str) -> Record {
        self.mem()
            .records
            .get(deployment)
            .cloned()
            .unwrap_or_else(|| Record::new(deployment))
    }

    /// Every deployment with an accepted slot or a record.
    pub fn deployments(&self) -> Vec<String> {
        let m = self.mem();
        let mut out: Vec<String> = m
            .records
            .keys()
            .cloned()
            .chain(m.accepted.keys().map(|(_, d)| d.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Commits a deployment's new record with the events reporting it, in one transaction
    /// (fsynced when there are events; a record alone is ordered).
    /// Only the deployment's worker calls this, so records never race.
    pub async fn commit(&self, rec: Record, events: Vec<EventData>) -> Result<(), LedgerError> {
        let unchanged = self.mem().records.get(&rec.deployment) == Some(&rec);
        if unchanged && events.is_empty() {
            return Ok(());
        }
        let json = serde_json::to_string(&rec).map_err(|source| LedgerError::Json {
            what: "deployment record",
            source,
        })?;
        let deployment = rec.deployment.clone();
        let sync = durability(&events);
        let msgs = self.messages(events);
        self.outbox
            .commit(
                msgs,
                Box::new(move |c| {
                    c.prepare_cached(
                        "INSERT INTO agent_deployments(deployment, record, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(deployment) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
                    )?
                    .execute(params![deployment, json, roost_schemas::now_rfc3339()])?;
                    Ok(())
                }),
                sync,
            )
            .await?;
        let deployment = rec.deployment.clone();
        self.mem().records.insert(deployment, rec);
        self.changed.notify_one();
        self.records.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Changes whenever a deployment's record is committed (for workers waiting on others).
    pub fn watch_records(&self) -> tokio::sync::watch::Receiver<u64> {
        self.records.subscribe()
    }

    /// Stores events that change no record (message rejections).
    pub async fn emit(&self, events: Vec<EventData>) {
        if let Err(error) = self.outbox.enqueue(self.messages(events)).await {
            warn!(error = %roost_runtime::error_chain(&error), "could not store event");
        }
    }

    /// The last accepted (sequence, digest) of a slot.
    pub fn last_sequence(&self, scope: &Scope, deployment: &str) -> Option<(u64, String)> {
        self.mem()
            .accepted
            .get(&(scope.key(), deployment.to_owned()))
            .map(|s| (s.rollout.sequence, s.digest.clone()))
    }

    /// Records an accepted envelope (replacing the slot's previous one) together with its
    /// `rollout.received` event.
    pub async fn accept(
        &self,
        rollout: &Rollout,
        digest: &str,
        envelope: &[u8],
        event: EventData,
    ) -> Result<(), LedgerError> {
        let json = serde_json::to_string(rollout).map_err(|source| LedgerError::Json {
            what: "accepted rollout",
            source,
        })?;
        let (scope, deployment, seq, dg, env) = (
            rollout.scope.key(),
            rollout.deployment.clone(),
            rollout.sequence as i64,
            digest.to_owned(),
            envelope.to_vec(),
        );
        self.outbox
            .commit(
                self.messages(vec![event]),
                Box::new(move |c| {
                    c.prepare_cached(
                        "INSERT INTO agent_accepted(scope, deployment, sequence, digest, rollout, envelope)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT(scope, deployment) DO UPDATE SET sequence = excluded.sequence,
                           digest = excluded.digest, rollout = excluded.rollout, envelope = excluded.envelope",
                    )?
                    .execute(params![scope, deployment, seq, dg, json, env])?;
                    Ok(())
                }),
                // The replay guard: a rollout's sequence must never be forgotten once accepted.
                Durability::Full,
            )
            .await?;
        self.mem().accepted.insert(
            (rollout.scope.key(), rollout.deployment.clone()),
            AcceptedSlot {
                rollout: rollout.clone(),
                digest: digest.to_owned(),
            },
        );
        Ok(())
    }

    /// The last accepted store profile.
    pub fn profile(&self) -> Option<StoredProfile> {
        self.mem().profile.clone()
    }

    /// What the agent knows about its own store: the last accepted profile's groups,
    /// labels, vars and time zone, or before the first one the configured groups. The one
    /// accessor for the groups in force (precedence, subscriptions, status) and for what
    /// rendering reads.
    pub fn store_context(&self) -> StoreContext {
        match &self.mem().profile {
            Some(p) => self.bootstrap.with_profile(&p.profile),
            None => (*self.bootstrap).clone(),
        }
    }

    /// The context `agent.toml` gives (store name and configured groups), which a profile
    /// builds on.
    pub fn bootstrap(&self) -> &StoreContext {
        &self.bootstrap
    }

    /// The groups in force, in precedence order (see [`Ledger::store_context`]).
    pub fn groups(&self) -> Vec<String> {
        self.store_context().groups
    }

    /// Records an accepted store profile (replacing the previous one) together with its
    /// `profile.accepted` event, in one fsynced transaction: the profile replay guard must
    /// never be forgotten once accepted.
    pub async fn accept_profile(
        &self,
        stored: &StoredProfile,
        envelope: &[u8],
        event: EventData,
    ) -> Result<(), LedgerError> {
        let json = serde_json::to_string(&stored.profile).map_err(|source| LedgerError::Json {
            what: "accepted profile",
            source,
        })?;
        let (seq, digest) = (stored.profile.sequence as i64, stored.digest.clone());
        let env = envelope.to_vec();
        let write = move |c: &rusqlite::Connection| {
            c.prepare_cached(
                "INSERT INTO agent_profile(id, sequence, digest, profile, envelope)
                 VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET sequence = excluded.sequence,
                   digest = excluded.digest, profile = excluded.profile,
                   envelope = excluded.envelope",
            )?
            .execute(params![seq, digest, json, env])?;
            Ok(())
        };
        // The profile replay guard: never forgotten once accepted.
        self.outbox
            .commit(
                self.messages(vec![event]),
                Box::new(write),
                Durability::Full,
            )
            .await?;
        self.mem().profile = Some(stored.clone());
        // The status document names the groups in force and the profile's sequence.
        self.changed.notify_one();
        Ok(())
    }

    /// The last accepted fleet snapshot.
    pub fn snapshot(&self) -> Option<StoredSnapshot> {
        self.mem().snapshot.clone()
    }

    /// Records an accepted fleet snapshot (replacing the previous one, keeping when the
    /// desired state was last confirmed) with `events`, in one transaction.
    pub async fn accept_snapshot(
        &self,
        snapshot: &Snapshot,
        digest: &str,
        events: Vec<EventData>,
    ) -> Result<(), LedgerError> {
        let json = serde_json::to_string(snapshot).map_err(|source| LedgerError::Json {
            what: "accepted snapshot",
            source,
        })?;
        let (seq, dg) = (snapshot.sequence as i64, digest.to_owned());
        self.outbox
            .commit(
                self.messages(events),
                Box::new(move |c| {
                    c.prepare_cached(
                        "INSERT INTO agent_snapshot(id, sequence, digest, snapshot) VALUES (1, ?1, ?2, ?3)
                         ON CONFLICT(id) DO UPDATE SET sequence = excluded.sequence,
                           digest = excluded.digest, snapshot = excluded.snapshot",
                    )?
                    .execute(params![seq, dg, json])?;
                    Ok(())
                }),
                Durability::Full,
            )
            .await?;
        let mut m = self.mem();
        let confirmed_at = m.snapshot.as_ref().and_then(|s| s.confirmed_at.clone());
        m.snapshot = Some(StoredSnapshot {
            snapshot: snapshot.clone(),
            digest: digest.to_owned(),
            confirmed_at,
        });
        Ok(())
    }

    /// Sets the status document's freshness fields and stores `events` (a `desired.stale`
    /// report), persisting when the desired state was last confirmed, in one transaction.
    pub async fn set_freshness(
        &self,
        freshness: Freshness,
        events: Vec<EventData>,
    ) -> Result<(), LedgerError> {
        let confirmed = freshness.desired_confirmed_at.clone();
        let changed_confirmation = self
            .mem()
            .snapshot
            .as_ref()
            .is_some_and(|s| s.confirmed_at != confirmed);
        if changed_confirmation || !events.is_empty() {
            let c2 = confirmed.clone();
            // A confirmation lost to a power cut only makes the desired state look older.
            let sync = durability(&events);
            self.outbox
                .commit(
                    self.messages(events),
                    Box::new(move |c| {
                        c.prepare_cached(
                            "UPDATE agent_snapshot SET confirmed_at = ?1 WHERE id = 1",
                        )?
                        .execute(params![c2])?;
                        Ok(())
                    }),
                    sync,
                )
                .await?;
        }
        let mut m = self.mem();
        if let Some(s) = m.snapshot.as_mut() {
            s.confirmed_at = confirmed;
        }
        if m.freshness != freshness {
            m.freshness = freshness;
            drop(m);
            self.changed.notify_one();
        }
        Ok(())
    }

    /// The accepted rollouts of every slot of a deployment.
    pub fn slots(&self, deployment: &str) -> Vec<Rollout> {
        let m = self.mem();
        let mut out: Vec<(String, Rollout)> = m
            .accepted
            .iter()
            .filter(|((_, d), _)| d == deployment)
            .map(|((s, _), slot)| (s.clone(), slot.rollout.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// Schedules a publish of the status document (after a reconnect: a restarted edge
    /// broker has lost the retained copy).
    pub fn touch(&self) {
        self.changed.notify_one();
    }

    /// The status document's deployments, derived from the records.
    pub fn statuses(&self) -> BTreeMap<String, roost_schemas::DeploymentStatus> {
        self.mem()
            .records
            .iter()
            .map(|(d, r)| (d.clone(), r.status()))
            .collect()
    }

    /// Publishes the status document after each change (debounced), until cancelled; and
    /// once at start so a restarted agent refreshes the retained document.
    pub async fn run_status_publisher(
        self,
        topic: String,
        store: String,
        heartbeat: Duration,
        cancel: CancellationToken,
    ) {
        self.changed.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.changed.notified() => {}
                // Nothing changed for a while: say so anyway, so silence means trouble.
                _ = tokio::time::sleep(heartbeat) => {}
            }
            // Coalesce bursts of changes into one document.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let deployments = self.statuses();
            let freshness = self.mem().freshness.clone();
            let store = store.clone();
            let groups = self.groups();
            let profile_sequence = self.profile().map(|p| p.profile.sequence);
            let render = move |roostseq: u64, backlog: u64| {
                let doc = StatusDoc {
                    store: store.clone(),
                    groups: groups.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    updated_at: roost_schemas::now_rfc3339(),
                    roostseq,
                    outbox_backlog: backlog,
                    deployments: deployments.clone(),
                    heartbeat_s: Some(heartbeat.as_secs()),
                    profile_sequence,
                    freshness: freshness.clone(),
                };
                serde_json::to_vec(&doc).unwrap_or_default()
            };
            let msg = NewMessage {
                topic: topic.clone(),
                payload: Payload::WithCounters(Arc::new(render)),
                retain: true,
                compact: true,
            };
            // Rebuilt from the records whenever it is lost (and at every start): no fsync.
            if let Err(error) = self
                .outbox
                .enqueue_with(vec![msg], Durability::Ordered)
                .await
            {
                warn!(error = %roost_runtime::error_chain(&error), "could not store status document");
            }
        }
    }
}

/// How a commit of `events` (with a record or other state) must reach the disk: fsynced when
/// it stores events, which must never be lost once made; otherwise ordered only. A record or
/// confirmation without events is rebuilt after a power cut that loses it: the accepted
/// rollouts are fsynced, so the worker derives the same wanted state and redoes the step, and
/// the next fsynced commit makes everything before it durable.
fn durability(events: &[EventData]) -> Durability {
    if events.is_empty() {
        Durability::Ordered
    } else {
        Durability::Full
    }
}
