//! Targets: where a rendered revision is applied. Every target answers the same five
//! questions (apply, prune, health, drift, remove) so the reconciler does not care which one
//! it drives. `files` writes a directory per deployment; `kubernetes` applies to a cluster.

pub mod files;
pub mod kube;

use roost_schemas::{Policy, Reason};
use tokio::sync::mpsc;

use crate::git::Rendered;

/// Errors of a target, each with a reason code.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The rendered objects violate the agent's policy.
    #[error("policy denied: {0}")]
    PolicyDenied(String),
    /// A manifest is not acceptable for this target.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The revision exceeds a limit (objects).
    #[error("too large: {0}")]
    TooLarge(String),
    /// Applying failed.
    #[error("apply failed: {0}")]
    Apply(String),
    /// Pruning failed.
    #[error("prune failed: {0}")]
    Prune(String),
    /// A hook command failed.
    #[error("hook failed: {0}")]
    Hook(String),
    /// Anything else (I/O, connection).
    #[error("{0}")]
    Internal(String),
}

impl TargetError {
    /// The wire reason code.
    pub fn reason(&self) -> Reason {
        match self {
            TargetError::PolicyDenied(_) => Reason::PolicyDenied,
            TargetError::InvalidManifest(_) => Reason::InvalidManifest,
            TargetError::TooLarge(_) => Reason::TooLarge,
            TargetError::Apply(_) => Reason::ApplyFailed,
            TargetError::Prune(_) => Reason::PruneFailed,
            TargetError::Hook(_) => Reason::HookFailed,
            TargetError::Internal(_) => Reason::Internal,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Items (files, objects) created or changed.
    pub changed: Vec<String>,
    /// The inventory of what the deployment now owns.
    pub inventory: Vec<String>,
}

/// Health of an applied deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// All items are current.
    pub ready: bool,
    /// Items not ready, with why.
    pub not_ready: Vec<String>,
}

/// A difference between live state and what was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftReport {
    /// Items that differ, with the fields or kind of difference.
    pub items: Vec<String>,
}

/// A target.
pub enum Target {
    /// Files in a directory.
    Files(files::FilesTarget),
    /// A Kubernetes cluster.
    Kube(Box<kube::KubeTarget>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Files(_) => f.write_str("Target::Files"),
            Target::Kube(_) => f.write_str("Target::Kube"),
        }
    }
}

impl Target {
    /// Checks the rendered revision against policy and the target's rules; applies nothing.
    pub async fn validate(&self, deployment: &str, rendered: &Rendered) -> Result<(), TargetError> {
        match self {
            Target::Files(t) => t.validate(deployment, rendered),
            Target::Kube(t) => t.validate(deployment, rendered).await,
        }
    }

    /// Applies a rendered revision.
    pub async fn apply(
        &self,
        deployment: &str,
        rendered: &Rendered,
        policy: &Policy,
    ) -> Result<ApplyReport, TargetError> {
        match self {
            Target::Files(t) => t.apply(deployment, rendered, policy).await,
            Target::Kube(t) => t.apply(deployment, rendered).await,
        }
    }

    /// Deletes what `previous` (an inventory) has and the new revision does not.
    pub async fn prune(
        &self,
        deployment: &str,
        rendered: &Rendered,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        match self {
            Target::Files(t) => t.prune(deployment, rendered, previous).await,
            Target::Kube(t) => t.prune(deployment, rendered, previous).await,
        }
    }

    /// Health of what was applied.
    pub async fn health(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Health, TargetError> {
        match self {
            Target::Files(t) => t.health(deployment, rendered).await,
            Target::Kube(t) => t.health(deployment, rendered).await,
        }
    }

    /// Compares live state with the rendered revision.
    pub async fn drift(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Option<DriftReport>, TargetError> {
        match self {
            Target::Files(t) => t.drift(deployment, rendered).await,
            Target::Kube(t) => t.drift(deployment, rendered).await,
        }
    }

    /// Removes everything of a deployment; returns what was deleted.
    pub async fn remove(
        &self,
        deployment: &str,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        match self {
            Target::Files(t) => t.remove(deployment, previous).await,
            Target::Kube(t) => t.remove(deployment, previous).await,
        }
    }

    /// A stream of "something may have changed" signals for a deployment (file-system
    /// events, watch events), used to check drift within seconds rather than on the timer.
    pub fn watch(&self, deployment: &str) -> Option<mpsc::Receiver<()>> {
        match self {
            Target::Files(t) => t.watch(deployment),
            Target::Kube(t) => t.watch(deployment),
        }
    }
}
