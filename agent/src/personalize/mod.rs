//! Per-store content: between rendering a revision from Git and building the target's plan,
//! turns the rendered files into the files *this* store builds: its overlays
//! ([`overlay`]), its sealed files decrypted in memory ([`sealed`]) and, when the rollout asks
//! for it (`policy.substitute`), its values in the manifests ([`substitute`]). Pure over its
//! inputs; the build stage runs it on a blocking thread.
//!
//! # The store context seam
//!
//! What a store is ([`StoreContext`]: name, groups in precedence order, labels, vars, time
//! zone) comes from one accessor, the ledger's `store_context` (`crate::ledger`): the last
//! accepted store profile ([`StoreContext::with_profile`]) on top of what `agent.toml` gives
//! ([`StoreContext::from_config`]: store and groups; no labels or vars). [`Personalizer`],
//! which the reconciler's `Ctx` holds, carries it to the builds: the agent sets it at start and
//! after every accepted profile ([`Personalizer::set_context`]), before it decides the
//! deployments again; a deployment whose rendering reads what changed
//! (`crate::profile::context_for`) is rendered and applied again. Nothing else in the agent
//! reads labels or vars.
//!
//! Order: other stores' and groups' overlay directories are dropped; sealed files are
//! decrypted (for the Kubernetes target the plaintext replaces the `.age` file under the name
//! without `.age`; for the files target the ciphertext is kept, see [`Layout`]); variables are
//! substituted; overlays replace base objects or files; the result is checked against the
//! render limits again.

pub mod overlay;
pub mod sealed;
pub mod substitute;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use roost_runtime::sealed::Identity;
use roost_schemas::Reason;
use tokio::sync::watch;

use crate::git::{ManifestFile, RenderLimits, Rendered, SealedFiles};
use overlay::OverlayError;
use sealed::SealedFileError;
use substitute::SubstituteError;

/// What makes a store different: the values substitution and overlays use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContext {
    /// The store's name (`${roost.store}`, `_stores/<store>/`).
    pub store: String,
    /// Its groups, highest precedence first (`_groups/<group>/`).
    pub groups: Vec<String>,
    /// Its labels (`${roost.labels.KEY}`).
    pub labels: BTreeMap<String, String>,
    /// Its vars (`${roost.vars.KEY}`).
    pub vars: BTreeMap<String, String>,
    /// Its IANA time zone; None: UTC.
    pub timezone: Option<String>,
}

impl StoreContext {
    /// The context `agent.toml` gives: store and groups, no labels or vars (those come with
    /// the store profile; see the module documentation).
    pub fn from_config(file: &crate::config::AgentFile) -> StoreContext {
        StoreContext {
            store: file.store.clone(),
            groups: file.groups.clone(),
            ..StoreContext::default()
        }
    }

    /// The context a verified store profile gives: its labels, vars and time zone, and its
    /// groups (the configured ones when the profile names none, as the contract says).
    pub fn from_profile(
        profile: &roost_schemas::profile::Profile,
        file: &crate::config::AgentFile,
    ) -> StoreContext {
        StoreContext::from_config(file).with_profile(profile)
    }

    /// The context `profile` gives on top of this one (the configured context): the profile's
    /// labels, vars and time zone, and its groups (these groups when it names none).
    pub fn with_profile(&self, profile: &roost_schemas::profile::Profile) -> StoreContext {
        StoreContext {
            store: self.store.clone(),
            groups: profile
                .groups
                .clone()
                .unwrap_or_else(|| self.groups.clone()),
            labels: profile.labels.clone(),
            vars: profile.vars.clone(),
            timezone: profile.timezone.clone(),
        }
    }

    /// What differs from `before`, by field name (`groups`, `labels`, `vars`, `timezone`).
    pub fn changes(&self, before: &StoreContext) -> Vec<String> {
        [
            ("groups", self.groups != before.groups),
            ("labels", self.labels != before.labels),
            ("vars", self.vars != before.vars),
            ("timezone", self.timezone != before.timezone),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name.to_owned())
        .collect()
    }

    /// SHA-256 (hex) of the whole context, so a record can say which context its revision
    /// was rendered with.
    pub fn digest(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let json = serde_json::json!({
            "store": self.store,
            "groups": self.groups,
            "labels": self.labels,
            "vars": self.vars,
            "timezone": self.timezone,
        });
        hex::encode(Sha256::digest(json.to_string().as_bytes()))
    }
}

/// How a target consumes files, which decides how overlays replace and what happens to a
/// sealed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Kubernetes objects: an overlay object replaces the base object with the same
    /// apiVersion, kind, namespace and name; a sealed file is decrypted and its manifest
    /// applied from memory.
    Objects,
    /// Files written to disk: an overlay file replaces the base file with the same relative
    /// path; a sealed file is checked to be for this store (decrypted in memory, the
    /// plaintext dropped) and written as it is, ciphertext, for the site's consumer to
    /// decrypt with the store's identity. Plaintext never reaches the disk.
    Files,
}

/// Why a revision cannot be personalized for this store: all `invalid_manifest` (a problem of
/// the revision for this store), except a failed job.
#[derive(Debug, thiserror::Error)]
pub enum PersonalizeError {
    /// Overlays could not be merged.
    #[error("overlays")]
    Overlay(#[source] OverlayError),
    /// A sealed file cannot be used by this store.
    #[error("sealed file")]
    Sealed(#[source] SealedFileError),
    /// Substitution failed.
    #[error("substitution")]
    Substitute(#[source] SubstituteError),
    /// The personalized revision exceeds the render limits.
    #[error("after personalization: {0}")]
    TooLarge(String),
    /// The blocking job failed.
    #[error("personalize job")]
    Job(#[source] tokio::task::JoinError),
}

impl PersonalizeError {
    /// The wire reason code.
    pub fn reason(&self) -> Reason {
        match self {
            PersonalizeError::Job(_) => Reason::Internal,
            _ => Reason::InvalidManifest,
        }
    }

    /// A problem of the revision for this store (not retried).
    pub fn is_rejection(&self) -> bool {
        !matches!(self, PersonalizeError::Job(_))
    }

    /// The stable `data.detail` code, if any (`secret_not_for_this_store`).
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            PersonalizeError::Sealed(e) => e.detail(),
            _ => None,
        }
    }
}

/// Everything one personalization needs.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The store.
    pub context: &'a StoreContext,
    /// Its age identity, if it has one.
    pub identity: Option<&'a Identity>,
    /// The target's layout.
    pub layout: Layout,
    /// `policy.substitute` of the rollout.
    pub substitute: bool,
    /// The agent's render limits, which the result must keep too.
    pub limits: RenderLimits,
}

/// The files of `rendered` this store builds (see the module documentation).
pub fn personalize(rendered: Rendered, input: &Input<'_>) -> Result<Rendered, PersonalizeError> {
    let ctx = input.context;
    let mut layered = overlay::select(rendered.files, &ctx.store, &ctx.groups);
    let mut sealed_paths = BTreeSet::new();
    for l in &mut layered {
        if !sealed::is_sealed(&l.file.path) {
            continue;
        }
        let plain = sealed::open(&l.file, input.identity).map_err(PersonalizeError::Sealed)?;
        if input.layout == Layout::Objects {
            l.file.path = sealed::plain_path(&l.file.path).to_owned();
            l.rel = sealed::plain_path(&l.rel).to_owned();
            l.file.data = plain;
            sealed_paths.insert(l.file.path.clone());
        }
    }
    if input.substitute {
        substitute::check_context(ctx).map_err(PersonalizeError::Substitute)?;
        let used = layered.iter().map(|l| l.file.data.len() as u64).sum();
        let mut budget = substitute::Budget::new(input.limits.max_bytes, used);
        for l in &mut layered {
            if sealed::is_sealed(&l.file.path) {
                continue; // ciphertext for the files target
            }
            let was_sealed = sealed_paths.contains(&l.file.path);
            if let Some(data) = substitute::substitute_file(&l.file, ctx, was_sealed, &mut budget)
                .map_err(PersonalizeError::Substitute)?
            {
                l.file.data = data;
            }
        }
    }
    let mut files = match input.layout {
        Layout::Objects => overlay::merge_objects(layered).map_err(PersonalizeError::Overlay)?,
        Layout::Files => overlay::merge_files(layered),
    };
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = files.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(PersonalizeError::Sealed(SealedFileError::Duplicate {
            path: w[0].path.clone(),
        }));
    }
    check_limits(&files, &input.limits)?;
    sealed_paths.retain(|p| files.iter().any(|f| &f.path == p));
    let digest_key = (!sealed_paths.is_empty())
        .then(|| input.identity.map(Identity::digest_key))
        .flatten();
    Ok(Rendered {
        revision: rendered.revision,
        files,
        sealed: SealedFiles {
            paths: sealed_paths,
            digest_key,
        },
    })
}

fn check_limits(files: &[ManifestFile], limits: &RenderLimits) -> Result<(), PersonalizeError> {
    if let Some(f) = files
        .iter()
        .find(|f| f.data.len() as u64 > limits.max_file_bytes)
    {
        return Err(PersonalizeError::TooLarge(format!(
            "{}: {} bytes, limit {} per file",
            f.path,
            f.data.len(),
            limits.max_file_bytes
        )));
    }
    let total: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    if total > limits.max_bytes {
        return Err(PersonalizeError::TooLarge(format!(
            "{total} bytes, limit {}",
            limits.max_bytes
        )));
    }
    if files.len() > limits.max_files {
        return Err(PersonalizeError::TooLarge(format!(
            "{} files, limit {}",
            files.len(),
            limits.max_files
        )));
    }
    Ok(())
}

/// The store's context and identity, shared by every deployment's worker. The one place a
/// store profile changes what the agent renders (see the module documentation).
#[derive(Clone)]
pub struct Personalizer {
    context: watch::Sender<Arc<StoreContext>>,
    identity: Option<Arc<Identity>>,
}

impl std::fmt::Debug for Personalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Personalizer")
            .field("context", &*self.context.borrow())
            .field("identity", &self.identity)
            .finish()
    }
}

impl Personalizer {
    /// A personalizer for `context`, decrypting with `identity`.
    pub fn new(context: StoreContext, identity: Option<Identity>) -> Personalizer {
        Personalizer {
            context: watch::Sender::new(Arc::new(context)),
            identity: identity.map(Arc::new),
        }
    }

    /// The current context.
    pub fn context(&self) -> Arc<StoreContext> {
        self.context.borrow().clone()
    }

    /// Replaces the context (the store profile's seam): later builds use it.
    pub fn set_context(&self, context: StoreContext) {
        self.context.send_replace(Arc::new(context));
    }

    /// Changes of the context.
    pub fn subscribe(&self) -> watch::Receiver<Arc<StoreContext>> {
        self.context.subscribe()
    }

    /// Whether the store has an age identity.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// [`personalize`] with the current context, on a blocking thread (decryption and parsing
    /// are CPU work).
    pub async fn run(
        &self,
        rendered: Rendered,
        layout: Layout,
        substitute: bool,
        limits: RenderLimits,
    ) -> Result<Rendered, PersonalizeError> {
        let context = self.context();
        let identity = self.identity.clone();
        tokio::task::spawn_blocking(move || {
            personalize(
                rendered,
                &Input {
                    context: &context,
                    identity: identity.as_deref(),
                    layout,
                    substitute,
                    limits,
                },
            )
        })
        .await
        .map_err(PersonalizeError::Job)?
    }
}

#[cfg(test)]
mod tests;
