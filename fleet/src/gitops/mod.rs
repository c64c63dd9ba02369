//! GitOps for the fleet: `roost fleet --repo` polls the fleet repository's `roost.yaml` and
//! every tracked source ref, validates the file (JSON Schema plus the rules of
//! [`FleetFile::validate`]), and rolls each change out with signed, retained rollouts, wave
//! by wave ([`plan`]), stopping by itself when stores fail. Everything it decides is in the
//! fleet database first (plans, sequences, what it published), so a `kill -9` resumes where
//! it was and publishes nothing twice. Every `snapshot_interval` and right after it publishes
//! desired state it signs and publishes the fleet snapshot ([`snapshot`]).

pub mod handle;
pub mod plan;
pub mod promote;
pub mod snapshot;

use roost_schemas::ShortRev;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use roost_runtime::{DirectMessage, Link, LinkConfig};
use roost_schemas::fleet::{FleetDeployment, FleetFile};
use roost_schemas::{Keyring, Scope, SigningKey, Topics, SNAPSHOT_PAYLOAD_TYPE};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use crate::db::{self, DbError, FleetDb, Published, Request};
use crate::inventory::{self, Inventory};
use crate::leadership::Leadership;
use crate::sign::{sign_rollout, RolloutSpec};
pub use handle::{ControllerHandle, ControllerInbox};
use plan::{Action, Plan, PlanStatus, Release};

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum GitopsError {
    /// The fleet database.
    #[error("fleet database")]
    Db(#[from] DbError),
    /// The MQTT link.
    #[error("mqtt link")]
    Link(#[from] roost_runtime::LinkError),
    /// A blocking job failed.
    #[error("controller job")]
    Join(#[from] tokio::task::JoinError),
    /// A rollout could not be signed.
    #[error("cannot sign the rollout for {topic}")]
    Sign {
        /// Its topic.
        topic: String,
        /// Why.
        #[source]
        source: crate::sign::SignError,
    },
    /// The controller's own key could not be made a keyring (for the fleet snapshot).
    #[error("the controller's key")]
    Key(#[from] roost_schemas::dsse::KeyError),
    /// The fleet snapshot could not be encoded.
    #[error("cannot encode the fleet snapshot")]
    Snapshot(#[source] serde_json::Error),
}

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct GitopsOptions {
    /// Fleet repository URL.
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// File in the repository.
    pub file: String,
    /// Poll interval.
    pub poll: Duration,
    /// Cloud broker.
    pub host: String,
    /// Cloud broker port.
    pub port: u16,
    /// More cloud broker addresses (a cluster's other nodes), tried in turn.
    pub fallbacks: Vec<roost_runtime::BrokerAddr>,
    /// TLS and credentials for the cloud broker.
    pub security: roost_runtime::Security,
    /// Where fetched repositories are cached.
    pub cache_dir: PathBuf,
    /// How often the signed fleet snapshot is published (also right after desired state).
    pub snapshot_interval: Duration,
    /// How long a snapshot stays valid (`expires` - `issued_at`); default 3 × the interval.
    pub snapshot_expiry: Duration,
}

/// Loads and validates a fleet file's bytes.
pub fn parse_fleet_file(bytes: &[u8]) -> Result<FleetFile, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| format!("YAML: {e}"))?;
    static SCHEMA: std::sync::OnceLock<Option<jsonschema::Validator>> = std::sync::OnceLock::new();
    let validator = SCHEMA.get_or_init(|| {
        let schema: serde_json::Value =
            serde_json::from_str(roost_schemas::json_schema::FLEET).ok()?;
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .ok()
    });
    if let Some(v) = validator {
        if let Some(e) = v.iter_errors(&value).next() {
            let at = e.instance_path().to_string();
            return Err(format!(
                "schema: {}{e}",
                if at.is_empty() {
                    String::new()
                } else {
                    format!("{at}: ")
                }
            ));
        }
    }
    // Typed from the text itself, not from `value`: a JSON object sorts its keys, and the
    // order of `groups:` is the stores' precedence order.
    let file: FleetFile = serde_saphyr::from_str(text).map_err(|e| format!("schema: {e}"))?;
    file.validate().map_err(|e| e.to_string())?;
    Ok(file)
}

/// The topic of a scope.
fn topic(topics: &Topics, scope: &Scope, deployment: &str) -> String {
    topics.deployment(scope, deployment)
}

/// Signs, with the one signer ([`crate::sign`]), a rollout of `release` (a tombstone when
/// None) for `scope`; returns the envelope's bytes.
fn sign(
    key: &SigningKey,
    deployment: &str,
    scope: &Scope,
    sequence: u64,
    release: Option<&Release>,
    origin: Option<roost_schemas::rollout::Origin>,
) -> Result<Vec<u8>, crate::sign::SignError> {
    let spec = RolloutSpec {
        deployment: deployment.to_owned(),
        scope: scope.clone(),
        url: release.map(|r| r.url.clone()).unwrap_or_default(),
        revision: release.map(|r| r.revision.clone()).unwrap_or_default(),
        path: release.map(|r| r.path.clone()).unwrap_or_default(),
        policy: release.map(|r| r.policy.clone()).unwrap_or_default(),
        not_before: release.and_then(|r| r.not_before.clone()),
        remove: release.is_none(),
        sequence: Some(sequence),
        origin,
        schedule: release.map(|r| r.schedule.clone()).unwrap_or_default(),
    };
    Ok(sign_rollout(std::slice::from_ref(key), &spec, sequence)?.envelope)
}

/// What a new plan `p` of `deployment` retires of what earlier plans published and left
/// live: under `targets:` every fleet and group message (each target store gets its own);
/// otherwise every store message of a wave (not a pin) that `p` does not carry on. Each goes
/// when `p` reaches its stores by another scope, or when `p` is done.
fn retired_by(p: &Plan, deployment: &str, published: &[Published], topics: &Topics) -> Vec<Scope> {
    published
        .iter()
        .filter(|x| x.deployment == deployment && !x.remove && x.role != "pin")
        .filter_map(|x| topics.parse_deployment(&x.topic).map(|t| t.scope))
        .filter(|scope| {
            let store = matches!(scope, Scope::Store(_));
            if p.targets.is_some() {
                !store
            } else {
                store && !p.scopes.contains(scope)
            }
        })
        .collect()
}

/// The controller.
struct Controller {
    opts: GitopsOptions,
    /// Fenced when several instances share the database: every write checks the term.
    db: FleetDb,
    /// Whether this instance leads: it steps and publishes only then.
    leadership: Leadership,
    key: Arc<SigningKey>,
    topics: Topics,
    git: crate::git::GitCache,
    link: roost_runtime::LinkHandle,
    /// Resolved refs: (url, ref) -> commit, refreshed every poll.
    refs: HashMap<(String, String), String>,
    /// The file in force and the commit it came from.
    file: Option<(String, FleetFile)>,
    /// The store inventory of that commit.
    inventory: Inventory,
    /// Store profiles may need publishing (a new good commit, or start).
    profiles_due: bool,
    /// Desired state was published since the last snapshot.
    snapshot_dirty: bool,
    /// When the last snapshot went out.
    last_snapshot: Option<tokio::time::Instant>,
}

/// One message to publish, decided and recorded before it goes out.
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
}

impl Controller {
    /// Publishes a message the controller decided and recorded, if it still leads by its
    /// lease's local deadline (a leader paused past its lease publishes nothing).
    fn send(&mut self, m: DirectMessage) {
        if self.leadership.is_leading() {
            let _ = self.link.publish(m);
        } else {
            warn!(topic = %m.topic, "not publishing: this instance no longer leads");
        }
    }

    /// Loads what the controller keeps in memory from the database: at start, and when
    /// this instance becomes the leader (the previous leader's work is all there).
    async fn load(&mut self) -> Result<(), GitopsError> {
        let (file, inventory) = self
            .blocking(|db| {
                db.with_conn(|c| {
                    Ok((
                        db::gitops::sync_state(c)?.and_then(|(s, f)| Some((s.good_commit?, f?))),
                        db::inventory::inventory(c)?,
                    ))
                })
            })
            .await?;
        self.file = file;
        self.inventory = inventory;
        self.profiles_due = true;
        self.last_snapshot = None;
        Ok(())
    }

    /// One step of the leader: operator requests, the repository when due, profiles, plans
    /// and the snapshot.
    async fn step(&mut self, mut sent: Vec<Request>, next_poll: &mut tokio::time::Instant) {
        // The table serves other processes; it is read every step (500 ms).
        let mut requests = match self.blocking(|db| db.take_requests()).await {
            Ok(r) => r,
            Err(error) => {
                warn!(error = %roost_runtime::error_chain(&error), "cannot read requests");
                Vec::new()
            }
        };
        requests.append(&mut sent);
        let sync_now = requests.contains(&Request::Sync);
        let synced = sync_now || tokio::time::Instant::now() >= *next_poll;
        if synced {
            if let Err(error) = self.sync().await {
                warn!(error = %roost_runtime::error_chain(&error), "sync failed");
            }
            *next_poll = tokio::time::Instant::now() + self.opts.poll;
        }
        if self.link.is_connected() {
            // Profiles first: a rollout that substitutes a store's vars finds them there.
            if let Err(error) = self.profiles().await {
                warn!(error = %roost_runtime::error_chain(&error), "cannot publish store profiles");
            }
            // Operator requests are put back when the step fails (a busy database, a lost
            // PostgreSQL session): a pause taken from the table and then dropped would be lost.
            let actions: Vec<Request> = requests
                .iter()
                .filter(|r| !matches!(r, Request::Sync))
                .cloned()
                .collect();
            if let Err(error) = self.tick(requests).await {
                warn!(error = %roost_runtime::error_chain(&error), requests = actions.len(), "controller step failed");
                if !actions.is_empty() {
                    let put_back = self
                        .blocking(move |db| actions.iter().try_for_each(|r| db.request(r)))
                        .await;
                    if let Err(error) = put_back {
                        warn!(error = %roost_runtime::error_chain(&error), "cannot put operator requests back");
                    }
                }
            }
            if let Err(error) = self.snapshot().await {
                warn!(error = %roost_runtime::error_chain(&error), "cannot publish the fleet snapshot");
            }
        }
        // The releases' commit subjects are for the fleet views only: after the step, so a
        // commit's first wave does not wait for its source's fetch.
        if synced {
            if let Err(error) = self.describe_releases().await {
                warn!(error = %roost_runtime::error_chain(&error), "cannot describe releases");
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FleetDb) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, GitopsError> {
        Ok(self.db.call(f).await?)
    }

    /// Looks at the fleet repository and every tracked ref; records the file's validity.
    async fn sync(&mut self) -> Result<(), GitopsError> {
        let (repo, branch) = (self.opts.repo.clone(), self.opts.branch.clone());
        let commit = match tokio::task::spawn_blocking(move || {
            crate::git::resolve_revision(&repo, &branch)
        })
        .await?
        {
            Ok(c) => c,
            Err(error) => {
                warn!(repo = %self.opts.repo, error = %roost_runtime::error_chain(&error), "cannot resolve the fleet repository's branch");
                return Ok(());
            }
        };
        let known = self.file.as_ref().map(|(c, _)| c.clone());
        let last = self
            .blocking(|db| db.with_conn(db::gitops::sync_state))
            .await?
            .map(|(s, _)| s.commit);
        if known.as_deref() == Some(commit.as_str()) || last.as_deref() == Some(commit.as_str()) {
            self.blocking(|db| db.touch_sync()).await?;
        } else {
            let parsed = match self.git.ensure(&self.opts.repo, &commit).await {
                Err(e) => Err(format!("fetch: {}", roost_runtime::error_chain(&e))),
                Ok(_) => match self
                    .git
                    .read_file(&self.opts.repo, &commit, &self.opts.file, 1 << 20)
                    .await
                {
                    Ok(Some(bytes)) => parse_fleet_file(&bytes),
                    Ok(None) => Err(format!("{} is missing", self.opts.file)),
                    Err(e) => Err(roost_runtime::error_chain(&e)),
                },
            };
            // The commit is taken whole: its file and its inventory, or neither. An
            // inventory whose `stores/` tree is the one in force is not read again (at 20,000
            // stores that was most of a commit's way to its first wave).
            let parsed = match parsed {
                Ok(file) => match self.same_inventory_tree(&commit).await {
                    true => Ok((file, None)),
                    false => self
                        .read_inventory(&commit)
                        .await
                        .map(|inv| (file, Some(inv))),
                },
                Err(reason) => Err(reason),
            };
            let (repo, c2) = (self.opts.repo.clone(), commit.clone());
            match parsed {
                Ok((file, inventory)) => {
                    let inventory_changed = inventory.is_some();
                    info!(commit = %commit, deployments = file.deployments.len(), stores = inventory.as_ref().unwrap_or(&self.inventory).stores.len(), inventory_changed, "fleet file and inventory in force");
                    let (f2, i2) = (file.clone(), inventory.clone());
                    self.blocking(move |db| db.put_sync(&repo, &c2, Ok((&f2, i2.as_ref()))))
                        .await?;
                    // Profiles depend on the inventory and the file's group definitions.
                    let groups_changed =
                        self.file.as_ref().map(|(_, f)| &f.groups) != Some(&file.groups);
                    if inventory_changed || groups_changed {
                        self.profiles_due = true;
                    }
                    self.file = Some((commit.clone(), file));
                    if let Some(inventory) = inventory {
                        self.inventory = inventory;
                    }
                }
                Err(reason) => {
                    warn!(commit = %commit, %reason, "fleet commit invalid (file or inventory); the last good one stays in force");
                    let r2 = reason.clone();
                    self.blocking(move |db| db.put_sync(&repo, &c2, Err(&r2)))
                        .await?;
                }
            }
        }
        // Every tracked ref of the file in force.
        let tracked: BTreeSet<(String, String)> = self
            .file
            .iter()
            .flat_map(|(_, f)| f.deployments.values())
            .filter(|d| !d.remove)
            .filter_map(|d| d.source.as_ref())
            .filter_map(|s| s.git_ref.clone().map(|r| (s.url.clone(), r)))
            .collect();
        for (url, r) in tracked {
            let (u, rr) = (url.clone(), r.clone());
            match tokio::task::spawn_blocking(move || crate::git::resolve_revision(&u, &rr)).await?
            {
                Ok(c) => {
                    self.refs.insert((url, r), c);
                }
                Err(error) => {
                    warn!(%url, git_ref = %r, error = %roost_runtime::error_chain(&error), "cannot resolve a tracked ref; keeping the last commit")
                }
            }
        }
        Ok(())
    }

    /// Whether `commit`'s `stores/` is the same tree as the inventory in force's commit
    /// (both in the cache); false when either cannot be read.
    async fn same_inventory_tree(&self, commit: &str) -> bool {
        let Some((good, _)) = &self.file else {
            return false;
        };
        let (a, b) = tokio::join!(
            self.git.tree_id(&self.opts.repo, commit, inventory::DIR),
            self.git.tree_id(&self.opts.repo, good, inventory::DIR),
        );
        matches!((a, b), (Ok(a), Ok(b)) if a == b)
    }

    /// The store inventory of `commit` (`stores/*.yaml`, which must be in the cache),
    /// parsed and validated whole; an error names the file and why.
    async fn read_inventory(&self, commit: &str) -> Result<Inventory, String> {
        let files = self
            .git
            .read_dir(
                &self.opts.repo,
                commit,
                inventory::DIR,
                inventory::is_inventory_file,
                inventory::MAX_FILE_BYTES as u64,
                inventory::MAX_TOTAL_BYTES as u64,
            )
            .await
            .map_err(|e| format!("{}: {}", inventory::DIR, roost_runtime::error_chain(&e)))?;
        tokio::task::spawn_blocking(move || inventory::parse(&files))
            .await
            .map_err(|e| format!("{}: {e}", inventory::DIR))?
            .map_err(|e| e.to_string())
    }

    /// Publishes the store profile of every inventory store whose profile content (labels,
    /// groups by the file's definitions, time zone, vars) changed since its last one, and
    /// the neutral profile of a store that left the inventory; signed, recorded with their
    /// sequences before they go out ([`FleetDb::record_profiles`]). Runs after a new good
    /// commit (and at start) until it succeeds.
    async fn profiles(&mut self) -> Result<(), GitopsError> {
        if !self.profiles_due {
            return Ok(());
        }
        let Some((_, file)) = &self.file else {
            return Ok(());
        };
        let groups = file.groups.clone();
        let wanted = self
            .inventory
            .profiles(|name, labels| groups.as_ref().and_then(|g| g.of(name, labels)));
        let (published, held) = self
            .blocking(|db| {
                db.with_conn(|c| {
                    Ok((
                        db::inventory::profiles(c)?,
                        db::inventory::held_profile_topics(c)?,
                    ))
                })
            })
            .await?;
        let topics = self.topics.clone();
        let changes =
            inventory::profile_changes(&wanted, &published, |s| held.contains(&topics.profile(s)));
        if !changes.is_empty() {
            let publications: Vec<db::inventory::ProfilePublication> = changes
                .iter()
                .map(|c| db::inventory::ProfilePublication {
                    store: c.store.clone(),
                    topic: self.topics.profile(&c.store),
                    digest: c.content.digest(),
                    in_inventory: c.in_inventory,
                })
                .collect();
            let key = self.key.clone();
            let msgs = self
                .db
                .call(move |db| {
                    db.record_profiles(&publications, |p, sequence| {
                        let content = &changes
                            .iter()
                            .find(|c| c.store == p.store)
                            .map(|c| c.content.clone())
                            .unwrap_or_default();
                        crate::sign::sign_profile(
                            std::slice::from_ref(&*key),
                            &content.profile(&p.store, sequence),
                        )
                        .map_err(|source| GitopsError::Sign {
                            topic: p.topic.clone(),
                            source,
                        })
                    })
                })
                .await?;
            info!(profiles = msgs.len(), "publishing store profiles");
            for (topic, payload) in msgs {
                self.send(DirectMessage {
                    topic,
                    payload,
                    retain: true,
                });
            }
            self.snapshot_dirty = true;
        }
        self.profiles_due = false;
        Ok(())
    }

    /// Records the subject and time of every release's commit not yet known, for the fleet
    /// views (best effort: a source that cannot be fetched now is tried at the next sync).
    async fn describe_releases(&mut self) -> Result<(), GitopsError> {
        let releases: BTreeSet<(String, String)> = self
            .file
            .iter()
            .flat_map(|(_, f)| f.deployments.values())
            .filter_map(|d| self.release_of(d))
            .map(|r| (r.url, r.revision))
            .collect();
        let known = self.blocking(|db| db.revisions()).await?;
        for (url, revision) in releases {
            if known.contains_key(&revision) {
                continue;
            }
            let info = match self.git.ensure(&url, &revision).await {
                Ok(_) => self.git.commit_info(&url, &revision).await,
                Err(e) => Err(e),
            };
            match info {
                Ok((subject, secs)) => {
                    let at = time::OffsetDateTime::from_unix_timestamp(secs)
                        .ok()
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_default();
                    self.blocking(move |db| db.put_revision(&revision, &url, &subject, &at))
                        .await?;
                }
                Err(error) => {
                    warn!(%url, %revision, error = %roost_runtime::error_chain(&error), "cannot describe a release's commit")
                }
            }
        }
        Ok(())
    }

    fn release_of(&self, d: &FleetDeployment) -> Option<Release> {
        let src = d.source.as_ref()?;
        let revision = match (&src.revision, &src.git_ref) {
            (Some(r), _) => r.clone(),
            (None, Some(r)) => self.refs.get(&(src.url.clone(), r.clone()))?.clone(),
            (None, None) => return None,
        };
        Some(Release {
            url: src.url.clone(),
            revision,
            path: roost_schemas::rollout::normalize_path(&src.path).ok()?,
            policy: match &self.file {
                Some((_, f)) => f.policy_of(d),
                None => d.policy.clone().unwrap_or_default(),
            },
            not_before: d.not_before.clone(),
            schedule: match &self.file {
                Some((_, f)) => f.schedule_of(d),
                None => roost_schemas::Schedule {
                    depends_on: d.depends_on.clone(),
                    ..Default::default()
                },
            },
        })
    }

    /// One evaluation of every deployment: new plans, wave steps, pins, removals.
    async fn tick(&mut self, requests: Vec<Request>) -> Result<(), GitopsError> {
        let Some((origin, file)) = self.file.clone() else {
            return Ok(());
        };
        let now = db::now_ms();
        let mut plans = self.blocking(|db| db.with_conn(db::gitops::plans)).await?;
        let published = self
            .blocking(|db| db.with_conn(db::gitops::published))
            .await?;
        for r in &requests {
            let Some(d) = r.deployment() else { continue };
            let Some(p) = plans.get_mut(d) else { continue };
            match (r, &p.status) {
                (Request::Pause(_), PlanStatus::Running) => p.status = PlanStatus::Paused,
                (Request::Resume(_), PlanStatus::Paused) => p.status = PlanStatus::Running,
                (Request::Abort(_), PlanStatus::Running | PlanStatus::Paused) => {
                    let actions = plan::abort(p, "aborted by an operator".into());
                    let p = p.clone();
                    self.execute(&p, actions, &published).await?;
                    continue;
                }
                _ => continue,
            }
            info!(deployment = %d, action = %r.action(), "plan request");
            let p = p.clone();
            self.execute(&p, Vec::new(), &published).await?;
        }
        for (name, d) in &file.deployments {
            if d.remove {
                self.remove(name, &published).await?;
                continue;
            }
            let Some(release) = self.release_of(d) else {
                continue;
            };
            let current = plans.get(name);
            let waves = FleetFile::waves_of(d);
            // A plan is for one release with one set of waves: a new commit of the source, a
            // changed policy or changed waves make a new plan (an aborted one stays aborted
            // until then).
            let targets = d.targets.as_ref().map(|t| t.selector.clone());
            let mut p = match current {
                Some(p) if p.release == release && p.waves == waves && p.targets == targets => {
                    p.clone()
                }
                _ => {
                    let previous = current.and_then(|p| match p.status {
                        PlanStatus::Done => Some(p.release.clone()),
                        _ => p.previous.clone(),
                    });
                    let mut p = Plan::new(
                        name,
                        release,
                        previous,
                        &origin,
                        waves,
                        d.abort.clone().unwrap_or_default(),
                        now,
                    );
                    // Scopes an unfinished plan reached stay this plan's to replace or
                    // tombstone.
                    if let Some(old) = current.filter(|o| o.status != PlanStatus::Done) {
                        p.scopes = old
                            .scopes
                            .iter()
                            .filter(|s| **s != Scope::Fleet)
                            .cloned()
                            .collect();
                    }
                    p.targets = targets;
                    p.retire = retired_by(&p, name, &published, &self.topics);
                    if p.targets.is_some() {
                        p.scopes.retain(|s| matches!(s, Scope::Store(_)));
                    }
                    info!(deployment = %name, revision = %p.release.revision, origin = %origin, "new plan");
                    p
                }
            };
            let pinned: BTreeSet<String> = d.stores.keys().cloned().collect();
            let n = name.clone();
            let view = self
                .blocking(move |db| db.with_conn(|c| db::gitops::view(c, &n)))
                .await?;
            let before = p.clone();
            let mut actions = plan::step(&mut p, &view, &pinned, now);
            actions.extend(plan::follow_targets(&mut p, &view, &pinned));
            if p != before || !actions.is_empty() {
                self.execute(&p, actions, &published).await?;
            }
            self.pins(name, d, &published).await?;
        }
        // Deployments no longer in the file: tombstone everything published for them.
        let gone: BTreeSet<String> = published
            .iter()
            .map(|p| p.deployment.clone())
            .filter(|d| !file.deployments.contains_key(d))
            .collect();
        for d in gone {
            self.remove(&d, &published).await?;
        }
        Ok(())
    }

    /// Pins: a store-scoped message per pinned store; a pin removed from the file is
    /// tombstoned.
    async fn pins(
        &mut self,
        deployment: &str,
        d: &FleetDeployment,
        published: &[Published],
    ) -> Result<(), GitopsError> {
        let Some(base) = self.release_of(d) else {
            return Ok(());
        };
        let mut out = Vec::new();
        for (store, pin) in &d.stores {
            let scope = Scope::Store(store.clone());
            let t = topic(&self.topics, &scope, deployment);
            let have = published.iter().find(|p| p.topic == t);
            if have
                .is_some_and(|p| p.revision.as_deref() == Some(pin.revision.as_str()) && !p.remove)
            {
                continue;
            }
            let release = Release {
                revision: pin.revision.clone(),
                ..base.clone()
            };
            out.push((scope, Some(release), "pin"));
        }
        for p in published
            .iter()
            .filter(|p| p.deployment == deployment && p.role == "pin" && !p.remove)
        {
            let store = p.topic.split('/').nth(3).unwrap_or_default();
            if !d.stores.contains_key(store) {
                out.push((Scope::Store(store.to_owned()), None, "pin"));
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        self.publish(deployment, None, out).await
    }

    async fn remove(
        &mut self,
        deployment: &str,
        published: &[Published],
    ) -> Result<(), GitopsError> {
        let out: Vec<(Scope, Option<Release>, &'static str)> = published
            .iter()
            .filter(|p| p.deployment == deployment && !p.remove)
            .filter_map(|p| {
                self.topics
                    .parse_deployment(&p.topic)
                    .map(|t| (t.scope, None, "removed"))
            })
            .collect();
        let had_plan = {
            let d = deployment.to_owned();
            self.blocking(move |db| db.with_conn(|c| Ok(db::gitops::plans(c)?.contains_key(&d))))
                .await?
        };
        if out.is_empty() && !had_plan {
            return Ok(());
        }
        info!(%deployment, topics = out.len(), "deployment removed from the fleet file; tombstoning");
        self.publish(deployment, None, out).await?;
        let d = deployment.to_owned();
        self.blocking(move |db| db.delete_plan(&d)).await
    }

    async fn execute(
        &mut self,
        p: &Plan,
        actions: Vec<Action>,
        _published: &[Published],
    ) -> Result<(), GitopsError> {
        let out = actions
            .into_iter()
            .map(|a| match a {
                Action::Publish { scope, release } => {
                    let role = if scope == Scope::Fleet {
                        "fleet"
                    } else {
                        "wave"
                    };
                    (scope, Some(release), role)
                }
                Action::Tombstone { scope } => (scope, None, "wave"),
            })
            .collect();
        self.publish(&p.deployment, Some(p.clone()), out).await
    }

    /// Allocates sequences, signs, records (with the plan) in one transaction, then publishes.
    async fn publish(
        &mut self,
        deployment: &str,
        plan: Option<Plan>,
        out: Vec<(Scope, Option<Release>, &'static str)>,
    ) -> Result<(), GitopsError> {
        let key = self.key.clone();
        let dep = deployment.to_owned();
        // The fleet-repository commit that caused it: the plan's, else the file in force.
        let origin = plan
            .as_ref()
            .map(|p| p.origin.clone())
            .or_else(|| self.file.as_ref().map(|(c, _)| c.clone()))
            .filter(|c| roost_schemas::rollout::is_full_sha(c))
            .map(|commit| roost_schemas::rollout::Origin {
                repo: self.opts.repo.clone(),
                commit,
                path: self.opts.file.clone(),
            });
        let publications: Vec<Published> = out
            .iter()
            .map(|(scope, release, role)| Published {
                topic: topic(&self.topics, scope, &dep),
                deployment: dep.clone(),
                role: (*role).to_owned(),
                revision: release.as_ref().map(|r| r.revision.clone()),
                remove: release.is_none(),
                sequence: 0,
            })
            .collect();
        let msgs: Vec<Outgoing> = self
            .db
            .call(move |db| {
                db.record_publications(publications, plan.as_ref(), |i, p| {
                    let (scope, release, _) = &out[i];
                    sign(
                        &key,
                        &dep,
                        scope,
                        p.sequence,
                        release.as_ref(),
                        origin.clone(),
                    )
                    .map_err(|source| GitopsError::Sign {
                        topic: p.topic.clone(),
                        source,
                    })
                })
            })
            .await?
            .into_iter()
            .map(|(topic, payload)| Outgoing { topic, payload })
            .collect();
        for m in msgs {
            info!(topic = %m.topic, "publishing");
            self.send(DirectMessage {
                topic: m.topic,
                payload: m.payload,
                retain: true,
            });
            // A new rollout is covered by a snapshot at once (after this step).
            self.snapshot_dirty = true;
        }
        Ok(())
    }

    /// Publishes the signed fleet snapshot (retained) when one is due: the current sequence
    /// of every desired-state topic in the fleet database that carries the controller's
    /// signature, with a sequence by the contract's rule on the snapshot topic.
    async fn snapshot(&mut self) -> Result<(), GitopsError> {
        let now = tokio::time::Instant::now();
        if !snapshot::due(
            self.last_snapshot,
            now,
            self.opts.snapshot_interval,
            self.snapshot_dirty,
        ) {
            return Ok(());
        }
        let key = self.key.clone();
        let topic = self.topics.snapshot();
        let expiry = self.opts.snapshot_expiry;
        let t2 = topic.clone();
        let (payload, built) = self
            .db
            .call(move |db| {
                let desired = db.desired()?;
                let mut ring = Keyring::new();
                ring.add(key.public_key())?;
                db.with_sequence(&t2, |seq| {
                    let built = snapshot::build(
                        &desired,
                        &ring,
                        seq,
                        time::OffsetDateTime::now_utc(),
                        expiry,
                    );
                    let body =
                        serde_json::to_vec(&built.snapshot).map_err(GitopsError::Snapshot)?;
                    let env = serde_json::to_vec(&key.sign(SNAPSHOT_PAYLOAD_TYPE, &body))
                        .map_err(GitopsError::Snapshot)?;
                    Ok::<_, GitopsError>((env, built))
                })
            })
            .await?;
        if !built.skipped.is_empty() {
            warn!(topics = ?built.skipped, "desired state not signed by this controller's key is left out of the fleet snapshot");
        }
        info!(
            sequence = built.snapshot.sequence,
            topics = built.snapshot.topics.len(),
            expires = %built.snapshot.expires,
            "publishing the fleet snapshot"
        );
        self.send(DirectMessage {
            topic,
            payload,
            retain: true,
        });
        self.snapshot_dirty = false;
        self.last_snapshot = Some(now);
        Ok(())
    }
}

/// Runs the controller until cancelled. Operator requests reach it through the fleet
/// database's request table only (`roost plan pause`, `roost fleet sync`, an API in another
/// process); [`run_with_handle`] also takes them from a [`ControllerHandle`] at once.
pub async fn run(
    opts: GitopsOptions,
    db: FleetDb,
    key: SigningKey,
    cancel: CancellationToken,
) -> Result<(), GitopsError> {
    run_with_handle(opts, db, key, None, cancel).await
}

/// [`run`], also acting at once on what the API (or anything else in this process) sends
/// through the [`ControllerHandle`] whose inbox this is.
pub async fn run_with_handle(
    opts: GitopsOptions,
    db: FleetDb,
    key: SigningKey,
    inbox: Option<ControllerInbox>,
    cancel: CancellationToken,
) -> Result<(), GitopsError> {
    run_led(opts, db, key, inbox, Leadership::solo(), cancel).await
}

/// [`run_with_handle`] as one of several instances on one database: it steps and publishes
/// only while `leadership` says it leads, every write under its term (a write under a term
/// that is no longer the leader's fails, and it steps down). When it becomes the leader it
/// loads the file in force, the inventory and the plans from the database and goes on
/// where the previous leader stopped. A follower's operator requests go to the request
/// table, for the leader.
pub async fn run_led(
    opts: GitopsOptions,
    db: FleetDb,
    key: SigningKey,
    mut inbox: Option<ControllerInbox>,
    leadership: Leadership,
    cancel: CancellationToken,
) -> Result<(), GitopsError> {
    let db = if db.engine() == db::Engine::Postgres {
        db.fenced(Arc::new(leadership.clone()))
    } else {
        db
    };
    let mut lc = LinkConfig::new(
        "cloud",
        &opts.host,
        opts.port,
        &format!("roost-controller-{:08x}", rand::random::<u32>()),
    );
    lc.security = opts.security.clone();
    lc.fallbacks = opts.fallbacks.clone();
    lc.keep_alive = Duration::from_secs(5);
    lc.backoff = (Duration::from_millis(100), Duration::from_secs(5));
    lc.max_packet_size = 4 << 20;
    let link = Link::start(lc, None, cancel.child_token())?;
    let mut c = Controller {
        git: crate::git::GitCache::new(opts.cache_dir.clone(), Duration::from_secs(60)),
        opts,
        db,
        leadership,
        key: Arc::new(key),
        topics: Topics::default(),
        link: link.handle.clone(),
        refs: HashMap::new(),
        file: None,
        inventory: Inventory::default(),
        profiles_due: true,
        snapshot_dirty: false,
        last_snapshot: None,
    };
    let span = tracing::info_span!("controller", repo = %c.opts.repo);
    async move {
        let mut next_poll = tokio::time::Instant::now();
        // Requests from the handle, taken since the last step.
        let mut sent: Vec<Request> = Vec::new();
        // The term whose state is loaded (0: none yet).
        let mut loaded = 0u64;
        let mut terms = c.leadership.watch();
        loop {
            if !c.leadership.is_leading() {
                // A follower: requests from this process's API are the leader's to take.
                for r in std::mem::take(&mut sent) {
                    if let Err(error) = c.blocking(move |db| db.request(&r)).await {
                        warn!(error = %roost_runtime::error_chain(&error), "cannot queue a request for the leader");
                    }
                }
                loaded = 0;
            } else if loaded != c.leadership.term() {
                let term = c.leadership.term();
                match c.load().await {
                    Ok(()) => {
                        info!(term, "controller: state loaded; resuming the plans");
                        loaded = term;
                        // The first step of a new term looks at the repository at once.
                        next_poll = tokio::time::Instant::now();
                        c.step(std::mem::take(&mut sent), &mut next_poll).await;
                    }
                    Err(error) => {
                        warn!(error = %roost_runtime::error_chain(&error), "cannot load the controller's state")
                    }
                }
            } else {
                c.step(std::mem::take(&mut sent), &mut next_poll).await;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                // This instance stopped (or started) leading.
                _ = terms.changed() => {}
                // A request from this process: the next step runs now.
                r = handle::recv(&mut inbox) => match r {
                    Some(r) => sent = handle::drain(r, &mut inbox),
                    None => inbox = None, // every handle is gone
                },
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), link.task).await;
    }
    .instrument(span)
    .await;
    Ok(())
}

/// `roost plan status`: the plans as text.
pub fn plan_status_text(db: &FleetDb, deployment: Option<&str>) -> Result<String, DbError> {
    db.with_conn(|c| {
        let mut out = String::new();
        if let Some((s, _)) = db::gitops::sync_state(c)? {
            out.push_str(&format!(
                "fleet file {} at {}: {}{}\n",
                s.repo,
                &s.commit[..s.commit.len().min(12)],
                if s.ok { "valid" } else { "INVALID" },
                if s.ok {
                    String::new()
                } else {
                    format!(" ({}); in force: {}", s.reason, s.good_commit.as_deref().map(|g| &g[..g.len().min(12)]).unwrap_or("none"))
                }
            ));
        }
        let plans: BTreeMap<String, Plan> = db::gitops::plans(c)?;
        for (d, p) in plans.iter().filter(|(d, _)| deployment.is_none_or(|x| x == d.as_str())) {
            let status = match &p.status {
                PlanStatus::Running => "running".to_owned(),
                PlanStatus::Paused => "paused".to_owned(),
                PlanStatus::Aborted(r) => format!("aborted: {r}"),
                PlanStatus::Done => "done".to_owned(),
            };
            out.push_str(&format!(
                "{d}  revision {}  origin {}  {status}\n",
                ShortRev::of(&p.release.revision),
                &p.origin[..p.origin.len().min(12)]
            ));
            for (i, w) in p.waves.iter().enumerate() {
                let stores = p.wave_stores.get(i).map(Vec::len).unwrap_or(0);
                let mark = if i < p.wave || p.status == PlanStatus::Done {
                    "done"
                } else if i == p.wave && p.wave_published {
                    "current"
                } else {
                    "waiting"
                };
                let counts = |o: plan::StoreOutcome| {
                    p.wave_stores
                        .get(i)
                        .map(|ss| ss.iter().filter(|s| p.outcomes.get(*s) == Some(&o)).count())
                        .unwrap_or(0)
                };
                out.push_str(&format!(
                    "  wave {} {:<10} {mark:<8} stores={stores} converged={} failed={} deferred={} waiting={}\n",
                    i + 1,
                    w.name,
                    counts(plan::StoreOutcome::Converged),
                    counts(plan::StoreOutcome::Failed),
                    counts(plan::StoreOutcome::Deferred),
                    counts(plan::StoreOutcome::Waiting),
                ));
            }
            for (store, why) in &p.waits {
                out.push_str(&format!("  {store} waits: {why}\n"));
            }
            if !p.waiting.is_empty() {
                out.push_str(&format!("  waiting: {}\n", p.waiting));
            }
        }
        out.push_str(&db::notify::render_failing(db::notify::overview(c)?.as_ref()));
        Ok(out)
    })
}

/// What `roost fleet sync --wait` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncWait {
    /// One line per plan (and the file's validity).
    pub lines: Vec<String>,
    /// Everything done; nothing aborted or invalid.
    pub ok: bool,
}

/// After a sync request at `since_ms`: waits until the controller ran a sync and every plan
/// is finished (done or aborted), then reports; an invalid file or an aborted plan is a
/// failure, naming why.
pub async fn wait_for_sync(
    db: &FleetDb,
    since_ms: u64,
    timeout: Duration,
) -> Result<SyncWait, GitopsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let db2 = db.clone();
        let (sync, plans) = tokio::task::spawn_blocking(move || {
            db2.with_conn(|c| Ok((db::gitops::sync_state(c)?, db::gitops::plans(c)?)))
        })
        .await??;
        let synced = sync.as_ref().is_some_and(|(s, _)| {
            roost_schemas::parse_rfc3339(&s.checked_at)
                .is_some_and(|t| (t.unix_timestamp_nanos() / 1_000_000) as u64 + 1 >= since_ms)
        });
        let running = plans
            .values()
            .any(|p| matches!(p.status, PlanStatus::Running | PlanStatus::Paused));
        if synced && !running {
            let mut lines = Vec::new();
            let mut ok = true;
            if let Some((s, _)) = &sync {
                if !s.ok {
                    ok = false;
                    lines.push(format!(
                        "fleet file at {} is invalid: {}",
                        ShortRev::of(&s.commit),
                        s.reason
                    ));
                }
            }
            for (d, p) in &plans {
                match &p.status {
                    PlanStatus::Done => {
                        lines.push(format!("{d} {} done", ShortRev::of(&p.release.revision)))
                    }
                    PlanStatus::Aborted(r) => {
                        ok = false;
                        lines.push(format!(
                            "{d} {} aborted: {r}",
                            ShortRev::of(&p.release.revision)
                        ));
                    }
                    _ => {}
                }
            }
            return Ok(SyncWait { lines, ok });
        }
        if tokio::time::Instant::now() >= deadline {
            let mut lines: Vec<String> = plans
                .iter()
                .filter(|(_, p)| matches!(p.status, PlanStatus::Running | PlanStatus::Paused))
                .map(|(d, p)| {
                    format!(
                        "{d} {} still running: {}",
                        ShortRev::of(&p.release.revision),
                        p.waiting
                    )
                })
                .collect();
            if !synced {
                lines.push("the controller has not synced (is roost fleet --repo running on this database?)".into());
            }
            return Ok(SyncWait { lines, ok: false });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_fleet_file;

    #[test]
    fn group_definitions_keep_their_order_and_the_list_form_still_parses() {
        let v12 = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups:
  zz-canary: {stores: [store-0001]}
  us-south: {selector: {region: us-south}}
  new-pos:
    selector:
      matchExpressions: [{key: pos, operator: In, values: [v7, v8]}]
deployments:
  kds:
    source: {url: git://h/apps, ref: main, path: apps/kds}
    targets: {selector: {format: drive-thru}}
    waves:
      - {name: canary, group: zz-canary}
      - {name: texas, selector: {region: us-south}}
      - {name: everyone, fleet: true}
";
        let f = parse_fleet_file(v12.as_bytes()).expect("v1.2 file");
        assert_eq!(
            f.groups.expect("groups").names(),
            ["zz-canary", "us-south", "new-pos"]
        );
        let v11 = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups: [canary, all]
deployments:
  kds:
    source: {url: git://h/apps, ref: main, path: apps/kds}
    waves: [{name: canary, group: canary}, {name: all, fleet: true}]
";
        let f = parse_fleet_file(v11.as_bytes()).expect("v1.1 file");
        assert_eq!(f.groups.expect("groups").names(), ["canary", "all"]);
        let bad = v12.replace(
            "region: us-south}}\n  new-pos",
            "region: \"us south\"}}\n  new-pos",
        );
        let e = parse_fleet_file(bad.as_bytes()).expect_err("bad selector");
        assert!(e.contains("selector"), "{e}");
    }
}
