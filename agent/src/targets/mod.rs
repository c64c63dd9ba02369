//! Targets: where a rendered revision is applied. A target turns a rendered revision into a
//! [`Target::Plan`] once (`build`: parse, check policy, resolve), and every later stage (apply,
//! prune, health, drift, watch) works on that plan and on typed [`ObjectRef`]s from the
//! agent's inventory, never on raw files again. `files` writes a directory per deployment;
//! `kubernetes` applies to a cluster; `fake` (tests) records calls and plays scripted answers.

pub mod fake;
pub mod files;
pub mod kube;
pub mod rbac;

use std::future::Future;

use roost_schemas::{Policy, Reason};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::git::Rendered;
use crate::personalize::Layout;

/// One object a deployment owns, as the target names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectRef {
    /// A file of the files target (path relative to the deployment's directory).
    File {
        /// Relative path.
        path: String,
    },
    /// A Kubernetes object.
    Kube {
        /// API group (`""` for core).
        group: String,
        /// API version.
        version: String,
        /// Kind.
        kind: String,
        /// Namespace (namespaced objects).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// Name.
        name: String,
    },
}

impl std::fmt::Display for ObjectRef {
    /// The key used in events: a file's path, or `group/version/Kind/namespace/name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectRef::File { path } => f.write_str(path),
            ObjectRef::Kube {
                group,
                version,
                kind,
                namespace,
                name,
            } => write!(
                f,
                "{group}/{version}/{kind}/{}/{name}",
                namespace.as_deref().unwrap_or("")
            ),
        }
    }
}

/// What the inventory keeps of an applied object: which it is and a digest of the manifest
/// roost applied for it, so an unchanged manifest is not written again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    /// The object.
    pub object: ObjectRef,
    /// SHA-256 of the applied manifest (canonical JSON); empty when unknown (recovered).
    #[serde(default)]
    pub digest: String,
}

/// Errors of a target, each with a reason code and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The revision violates the agent's policy.
    #[error("policy denied: {0}")]
    PolicyDenied(String),
    /// A manifest is not acceptable for this target.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The revision exceeds a limit (objects).
    #[error("too large: {0}")]
    TooLarge(String),
    /// The API server refused an object (4xx other than a conflict that may clear).
    #[error("{object}: {message}")]
    Refused {
        /// The object.
        object: String,
        /// The server's answer.
        message: String,
        /// Cause.
        #[source]
        source: Option<::kube::Error>,
    },
    /// The API server could not be reached, timed out or answered with a server error.
    #[error("API server unavailable ({what})")]
    Unavailable {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: ::kube::Error,
    },
    /// The object was not ready in time (CRD not established).
    #[error("{0}")]
    NotReady(String),
    /// File-system work of the files target failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A hook command failed.
    #[error("hook failed: {0}")]
    Hook(String),
    /// Creating the Kubernetes client failed.
    #[error("kubernetes client: {what}")]
    Client {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A blocking job panicked.
    #[error("target job")]
    Join(#[from] tokio::task::JoinError),
}

impl TargetError {
    /// The wire reason code (for the stage that failed; see the reconciler).
    pub fn reason(&self) -> Reason {
        match self {
            TargetError::PolicyDenied(_) => Reason::PolicyDenied,
            TargetError::InvalidManifest(_) => Reason::InvalidManifest,
            TargetError::TooLarge(_) => Reason::TooLarge,
            TargetError::Refused { .. } | TargetError::NotReady(_) | TargetError::Io { .. } => {
                Reason::ApplyFailed
            }
            TargetError::Unavailable { .. } | TargetError::Client { .. } => {
                Reason::TargetUnavailable
            }
            TargetError::Hook(_) => Reason::HookFailed,
            TargetError::Join(_) => Reason::Internal,
        }
    }

    /// A problem of the revision itself: the same revision fails the same way every time,
    /// so it is rejected (`rollout.rejected`) and not retried.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            TargetError::PolicyDenied(_)
                | TargetError::InvalidManifest(_)
                | TargetError::TooLarge(_)
        )
    }

    /// A transient condition of the target (network, API server); retried.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TargetError::Unavailable { .. } | TargetError::Client { .. }
        )
    }

    /// The message with its causes (`a: b: c`), for events and logs.
    pub fn chain(&self) -> String {
        roost_runtime::error_chain(self)
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Objects written (created or changed).
    pub changed: Vec<ObjectRef>,
    /// Objects already as desired (nothing written).
    pub unchanged: usize,
}

/// Health of an applied deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// All objects are current.
    pub ready: bool,
    /// Objects not ready, with why.
    pub not_ready: Vec<String>,
    /// The reason when not ready for a known cause (a failed hook), else a health timeout.
    pub reason: Option<Reason>,
}

impl Health {
    /// Everything ready.
    pub fn ready() -> Health {
        Health {
            ready: true,
            not_ready: Vec::new(),
            reason: None,
        }
    }
}

/// A difference between live state and what was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftReport {
    /// Objects that differ, with the fields or kind of difference.
    pub items: Vec<String>,
}

/// A place revisions are applied to. Every stage after `build` takes the plan it built.
pub trait Target: Send + Sync + 'static {
    /// A revision, parsed, checked and resolved for this target.
    type Plan: Send + Sync + 'static;

    /// Parses and checks a rendered revision against the agent's policy and the target's
    /// rules, and resolves what it needs to apply it; applies nothing.
    fn build(
        &self,
        deployment: &str,
        rendered: Rendered,
        policy: &Policy,
    ) -> impl Future<Output = Result<Self::Plan, TargetError>> + Send;

    /// What the plan will own once applied (with manifest digests).
    fn entries(&self, plan: &Self::Plan) -> Vec<InventoryEntry>;

    /// Applies the plan, writing only objects whose manifest differs from `inventory`'s
    /// digest or that are missing.
    fn apply(
        &self,
        plan: &Self::Plan,
        inventory: &[InventoryEntry],
    ) -> impl Future<Output = Result<ApplyReport, TargetError>> + Send;

    /// Deletes `stale` objects of the deployment that are still roost's; returns those deleted.
    fn prune(
        &self,
        deployment: &str,
        stale: &[ObjectRef],
    ) -> impl Future<Output = Result<Vec<ObjectRef>, TargetError>> + Send;

    /// Removes everything of a deployment (`inventory`); returns what was deleted.
    fn remove(
        &self,
        deployment: &str,
        inventory: &[ObjectRef],
    ) -> impl Future<Output = Result<Vec<ObjectRef>, TargetError>> + Send;

    /// Health of what the plan applied.
    fn health(&self, plan: &Self::Plan)
        -> impl Future<Output = Result<Health, TargetError>> + Send;

    /// Compares live state with the plan.
    fn drift(
        &self,
        plan: &Self::Plan,
    ) -> impl Future<Output = Result<Option<DriftReport>, TargetError>> + Send;

    /// Recovers a lost inventory: objects this store's roost applied for the deployment
    /// (never objects another controller owns or that are labelled for someone else).
    fn recover(
        &self,
        deployment: &str,
        plan: Option<&Self::Plan>,
    ) -> impl Future<Output = Result<Vec<ObjectRef>, TargetError>> + Send;

    /// "Something may have changed" signals for the plan's objects (file-system or watch
    /// events), so drift is checked within seconds rather than on the timer.
    fn watch(&self, plan: &Self::Plan) -> Option<mpsc::Receiver<()>>;

    /// How the target consumes a revision's files: objects (overlays replace by identity,
    /// sealed files applied from memory) unless it writes files to disk.
    fn layout(&self) -> Layout {
        Layout::Objects
    }
}

/// The target named in the configuration.
#[derive(Debug)]
pub enum AnyTarget {
    /// Files in a directory.
    Files(files::FilesTarget),
    /// A Kubernetes cluster.
    Kube(Box<kube::KubeTarget>),
}

/// A plan of [`AnyTarget`].
#[derive(Debug)]
pub enum AnyPlan {
    /// Files target.
    Files(files::FilesPlan),
    /// Kubernetes target.
    Kube(kube::KubePlan),
}

fn mismatch() -> TargetError {
    TargetError::InvalidManifest("plan was built by another target".into())
}

impl Target for AnyTarget {
    type Plan = AnyPlan;

    async fn build(
        &self,
        deployment: &str,
        rendered: Rendered,
        policy: &Policy,
    ) -> Result<AnyPlan, TargetError> {
        Ok(match self {
            AnyTarget::Files(t) => AnyPlan::Files(t.build(deployment, rendered, policy).await?),
            AnyTarget::Kube(t) => AnyPlan::Kube(t.build(deployment, rendered, policy).await?),
        })
    }

    fn entries(&self, plan: &AnyPlan) -> Vec<InventoryEntry> {
        match (self, plan) {
            (AnyTarget::Files(t), AnyPlan::Files(p)) => t.entries(p),
            (AnyTarget::Kube(t), AnyPlan::Kube(p)) => t.entries(p),
            _ => Vec::new(),
        }
    }

    async fn apply(
        &self,
        plan: &AnyPlan,
        inventory: &[InventoryEntry],
    ) -> Result<ApplyReport, TargetError> {
        match (self, plan) {
            (AnyTarget::Files(t), AnyPlan::Files(p)) => t.apply(p, inventory).await,
            (AnyTarget::Kube(t), AnyPlan::Kube(p)) => t.apply(p, inventory).await,
            _ => Err(mismatch()),
        }
    }

    async fn prune(
        &self,
        deployment: &str,
        stale: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        match self {
            AnyTarget::Files(t) => t.prune(deployment, stale).await,
            AnyTarget::Kube(t) => t.prune(deployment, stale).await,
        }
    }

    async fn remove(
        &self,
        deployment: &str,
        inventory: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        match self {
            AnyTarget::Files(t) => t.remove(deployment, inventory).await,
            AnyTarget::Kube(t) => t.prune(deployment, inventory).await,
        }
    }

    async fn health(&self, plan: &AnyPlan) -> Result<Health, TargetError> {
        match (self, plan) {
            (AnyTarget::Files(t), AnyPlan::Files(p)) => t.health(p).await,
            (AnyTarget::Kube(t), AnyPlan::Kube(p)) => t.health(p).await,
            _ => Err(mismatch()),
        }
    }

    async fn drift(&self, plan: &AnyPlan) -> Result<Option<DriftReport>, TargetError> {
        match (self, plan) {
            (AnyTarget::Files(t), AnyPlan::Files(p)) => t.drift(p).await,
            (AnyTarget::Kube(t), AnyPlan::Kube(p)) => t.drift(p).await,
            _ => Err(mismatch()),
        }
    }

    async fn recover(
        &self,
        deployment: &str,
        plan: Option<&AnyPlan>,
    ) -> Result<Vec<ObjectRef>, TargetError> {
        match (self, plan) {
            (AnyTarget::Files(t), Some(AnyPlan::Files(p))) => t.recover(deployment, Some(p)).await,
            (AnyTarget::Files(t), _) => t.recover(deployment, None).await,
            (AnyTarget::Kube(t), Some(AnyPlan::Kube(p))) => t.recover(deployment, Some(p)).await,
            (AnyTarget::Kube(t), _) => t.recover(deployment, None).await,
        }
    }

    fn watch(&self, plan: &AnyPlan) -> Option<mpsc::Receiver<()>> {
        match (self, plan) {
            (AnyTarget::Files(t), AnyPlan::Files(p)) => t.watch(p),
            (AnyTarget::Kube(t), AnyPlan::Kube(p)) => t.watch(p),
            _ => None,
        }
    }

    fn layout(&self) -> Layout {
        match self {
            AnyTarget::Files(_) => Layout::Files,
            AnyTarget::Kube(_) => Layout::Objects,
        }
    }
}

/// SHA-256 (hex) of a value's canonical JSON (object keys sorted by serde_json's map).
pub fn digest_json(v: &serde_json::Value) -> String {
    use sha2::{Digest as _, Sha256};
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}
