//! A scripted target for tests: it keeps "live" objects in memory, records every call, and
//! fails, holds or reports what a test queues, so the reconciler's phase transitions,
//! retries and interruptions can be tested without a cluster or a directory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use roost_schemas::{Policy, Reason};
use tokio::sync::{mpsc, Notify};

use super::{ApplyReport, DriftReport, Health, InventoryEntry, ObjectRef, Target, TargetError};
use crate::git::Rendered;

/// A failure to play at a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFailure {
    /// The "API server" is unreachable (transient).
    Unavailable,
    /// The "API server" refuses an object.
    Refused,
    /// The revision violates policy.
    PolicyDenied,
}

impl FakeFailure {
    fn error(self, what: &str) -> TargetError {
        match self {
            FakeFailure::Unavailable => TargetError::Unavailable {
                what: what.to_owned(),
                source: ::kube::Error::Service(Box::new(std::io::Error::other(
                    "connection refused",
                ))),
            },
            FakeFailure::Refused => TargetError::Refused {
                object: what.to_owned(),
                message: "refused".into(),
                source: None,
            },
            FakeFailure::PolicyDenied => TargetError::PolicyDenied(format!("{what}: denied")),
        }
    }
}

/// The fake's plan.
#[derive(Debug, Clone)]
pub struct FakePlan {
    /// Deployment.
    pub deployment: String,
    /// Commit.
    pub revision: String,
    /// One object per rendered file, with the file's digest.
    pub objects: Vec<InventoryEntry>,
}

/// What the fake does and saw.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Every call, e.g. `build <rev>`, `apply <rev> wrote=[..]`, `prune [..]`.
    pub calls: Vec<String>,
    /// Failures queued per stage (`build`, `apply`, `prune`, `remove`).
    pub failures: BTreeMap<&'static str, VecDeque<FakeFailure>>,
    /// Health answers; when empty, `healthy`.
    pub health: VecDeque<Health>,
    /// Health when nothing is queued.
    pub unhealthy: bool,
    /// Drift answers; when empty, no drift.
    pub drift: VecDeque<Vec<String>>,
    /// Objects "live" with the digest written.
    pub live: BTreeMap<ObjectRef, String>,
    /// Objects written, in order.
    pub writes: Vec<ObjectRef>,
}

/// The fake target.
#[derive(Debug, Default, Clone)]
pub struct FakeTarget {
    /// State, shared with the test.
    pub state: Arc<Mutex<FakeState>>,
    /// While set, `apply` waits for [`FakeTarget::release`].
    hold: Arc<Mutex<bool>>,
    released: Arc<Notify>,
    /// Signalled when an apply call starts.
    pub apply_started: Arc<Notify>,
}

impl FakeTarget {
    /// A fake with nothing queued.
    pub fn new() -> FakeTarget {
        FakeTarget::default()
    }

    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Queues a failure for the next call of `stage`.
    pub fn fail(&self, stage: &'static str, f: FakeFailure) {
        self.st().failures.entry(stage).or_default().push_back(f);
    }

    /// Queues a drift finding for the next drift check.
    pub fn drift_next(&self, items: &[&str]) {
        self.st()
            .drift
            .push_back(items.iter().map(|s| s.to_string()).collect());
    }

    /// Makes health answer not ready from now on (until `set_healthy(true)`).
    pub fn set_healthy(&self, healthy: bool) {
        self.st().unhealthy = !healthy;
    }

    /// Makes `apply` wait until [`FakeTarget::release`].
    pub fn hold_apply(&self) {
        if let Ok(mut h) = self.hold.lock() {
            *h = true;
        }
    }

    /// Lets held applies go on.
    pub fn release(&self) {
        if let Ok(mut h) = self.hold.lock() {
            *h = false;
        }
        self.released.notify_waiters();
    }

    /// A copy of the calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    fn take_failure(&self, stage: &'static str) -> Option<FakeFailure> {
        self.st()
            .failures
            .get_mut(stage)
            .and_then(VecDeque::pop_front)
    }

    fn held(&self) -> bool {
        self.hold.lock().map(|h| *h).unwrap_or(false)
    }
}

fn digest(d: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    hex::encode(Sha256::digest(d))
}

impl Target for FakeTarget {
    type Plan = FakePlan;

    async fn build(
        &self,
        deployment: &str,
        rendered: Rendered,
        _policy: &Policy,
    ) -> Result<FakePlan, TargetError> {
        self.st().calls.push(format!("build {}", rendered.revision));
        if let Some(f) = self.take_failure("build") {
            return Err(f.error("build"));
        }
        Ok(FakePlan {
            deployment: deployment.to_owned(),
            objects: rendered
                .files
                .iter()
                .map(|f| InventoryEntry {
                    object: ObjectRef::File {
                        path: f.path.clone(),
                    },
                    digest: digest(&f.data),
                })
                .collect(),
            revision: rendered.revision,
        })
    }

    fn entries(&self, plan: &FakePlan) -> Vec<InventoryEntry> {
        plan.objects.clone()
    }

    async fn apply(
        &self,
        plan: &FakePlan,
        inventory: &[InventoryEntry],
    ) -> Result<ApplyReport, TargetError> {
        self.apply_started.notify_waiters();
        while self.held() {
            let n = self.released.notified();
            if !self.held() {
                break;
            }
            n.await;
        }
        if let Some(f) = self.take_failure("apply") {
            self.st()
                .calls
                .push(format!("apply {} failed", plan.revision));
            return Err(f.error("apply"));
        }
        let mut st = self.st();
        let mut report = ApplyReport::default();
        for e in &plan.objects {
            let known = inventory
                .iter()
                .any(|i| i.object == e.object && i.digest == e.digest);
            if known && st.live.contains_key(&e.object) {
                report.unchanged += 1;
                continue;
            }
            if st.live.get(&e.object) == Some(&e.digest) {
                report.unchanged += 1;
                continue;
            }
            st.live.insert(e.object.clone(), e.digest.clone());
            st.writes.push(e.object.clone());
            report.changed.push(e.object.clone());
        }
        let wrote: Vec<String> = report.changed.iter().map(ToString::to_string).collect();
        st.calls
            .push(format!("apply {} wrote={wrote:?}", plan.revision));
        Ok(report)
    }

    async fn prune(
        &self,
        _deployment: &str,
        stale: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let names: Vec<String> = stale.iter().map(ToString::to_string).collect();
        self.st().calls.push(format!("prune {names:?}"));
        if let Some(f) = self.take_failure("prune") {
            return Err(f.error("prune"));
        }
        let mut st = self.st();
        Ok(stale
            .iter()
            .filter(|o| st.live.remove(*o).is_some())
            .cloned()
            .collect())
    }

    async fn remove(
        &self,
        deployment: &str,
        inventory: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        self.st().calls.push(format!("remove {deployment}"));
        if let Some(f) = self.take_failure("remove") {
            return Err(f.error("remove"));
        }
        let mut st = self.st();
        Ok(inventory
            .iter()
            .filter(|o| st.live.remove(*o).is_some())
            .cloned()
            .collect())
    }

    async fn health(&self, plan: &FakePlan) -> Result<Health, TargetError> {
        let mut st = self.st();
        if let Some(h) = st.health.pop_front() {
            return Ok(h);
        }
        let missing: Vec<String> = plan
            .objects
            .iter()
            .filter(|e| !st.live.contains_key(&e.object))
            .map(|e| format!("{}: not found", e.object))
            .collect();
        Ok(if st.unhealthy || !missing.is_empty() {
            Health {
                ready: false,
                not_ready: if missing.is_empty() {
                    vec!["not ready".into()]
                } else {
                    missing
                },
                reason: None,
            }
        } else {
            Health::ready()
        })
    }

    async fn drift(&self, _plan: &FakePlan) -> Result<Option<DriftReport>, TargetError> {
        let mut st = self.st();
        st.calls.push("drift".into());
        Ok(st.drift.pop_front().map(|items| DriftReport { items }))
    }

    async fn recover(
        &self,
        _deployment: &str,
        _plan: Option<&FakePlan>,
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let mut st = self.st();
        st.calls.push("recover".into());
        Ok(st.live.keys().cloned().collect())
    }

    fn watch(&self, _plan: &FakePlan) -> Option<mpsc::Receiver<()>> {
        None
    }
}

/// Health that is not ready because a hook failed (for tests of the files path).
pub fn hook_failed(message: &str) -> Health {
    Health {
        ready: false,
        not_ready: vec![message.to_owned()],
        reason: Some(Reason::HookFailed),
    }
}
