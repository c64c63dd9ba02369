//! `roost promote`: "Promote all", the GitOps way. Finds the revision a scope's stores run
//! (from their status documents in the fleet database) and writes the Git change that makes
//! the target scope run it: a commit on a new branch for a pull request, or `--direct` onto
//! the fleet repository's branch. The controller then rolls it out like any other commit.

use roost_schemas::ShortRev;
use std::collections::BTreeMap;
use std::path::Path;

use roost_schemas::fleet::{FleetFile, StorePin};

use crate::db::{DbError, FleetDb};
use crate::git::{ChangeError, Changeable, CommitTo, Edit};
use crate::judge::{self, Report, Reported, Wanted};

/// Errors of `roost promote`.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// Bad arguments or a state that cannot be promoted.
    #[error("{0}")]
    Usage(String),
    /// The fleet database.
    #[error("fleet database")]
    Db(#[from] DbError),
    /// Reading the fleet repository or writing the change.
    #[error("fleet repository")]
    Git(#[from] ChangeError),
}

/// What to promote.
#[derive(Debug, Clone)]
pub struct PromoteSpec {
    /// Deployment.
    pub deployment: String,
    /// `group:G` or `store:S`: whose running revision.
    pub from: String,
    /// `fleet` or `store:S`: who gets it.
    pub to: String,
    /// Fleet repository (a path or URL git can push to).
    pub repo: String,
    /// Branch.
    pub branch: String,
    /// File.
    pub file: String,
    /// Commit onto the branch instead of a new one.
    pub direct: bool,
}

/// The result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The revision promoted.
    pub revision: String,
    /// The branch the commit went to.
    pub branch: String,
    /// The commit.
    pub commit: String,
}

/// The revision every converged store of `from` runs for `deployment`.
pub fn running_revision(
    db: &FleetDb,
    deployment: &str,
    from: &str,
) -> Result<String, PromoteError> {
    let (kind, name) = from.split_once(':').ok_or_else(|| {
        PromoteError::Usage(format!("--from {from}: expected group:NAME or store:NAME"))
    })?;
    let view = db.with_conn(|c| crate::db::gitops::view(c, deployment))?;
    let members: Vec<_> = view
        .iter()
        .filter(|v| match kind {
            "group" => v.groups.iter().any(|g| g == name),
            "store" => v.store == name,
            _ => false,
        })
        .collect();
    if members.is_empty() {
        return Err(PromoteError::Usage(format!(
            "no store of {from} has reported its status"
        )));
    }
    // A store runs what it converged on (the convergence judgement against what it wants),
    // by its last report, as a plan counts it.
    let mut revs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &members {
        let Some(st) = &m.status else { continue };
        let Some(wanted) = st.desired.as_ref().map(|d| d.revision.as_str()) else {
            continue;
        };
        let report = Report {
            status: Some(st),
            stale: !m.online,
        };
        if judge::verdict(&report, &Wanted::revision(wanted)).reported() == Reported::Converged {
            revs.entry(wanted.to_owned())
                .or_default()
                .push(m.store.clone());
        }
    }
    match revs.len() {
        0 => Err(PromoteError::Usage(format!(
            "no store of {from} is Converged on {deployment}"
        ))),
        1 => Ok(revs.into_keys().next().unwrap_or_default()),
        _ => Err(PromoteError::Usage(format!(
            "the stores of {from} run different revisions of {deployment}: {}",
            revs.iter()
                .map(|(r, s)| format!("{} on {}", ShortRev::of(r), s.join(",")))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
    }
}

/// Rewrites the fleet file so `to` runs `revision`.
pub fn edit(
    file: &mut FleetFile,
    deployment: &str,
    to: &str,
    revision: &str,
) -> Result<(), PromoteError> {
    let d = file
        .deployments
        .get_mut(deployment)
        .ok_or_else(|| PromoteError::Usage(format!("{deployment} is not in the fleet file")))?;
    match to.split_once(':') {
        None if to == "fleet" => {
            let src = d
                .source
                .as_mut()
                .ok_or_else(|| PromoteError::Usage(format!("{deployment} has no source")))?;
            src.git_ref = None;
            src.revision = Some(revision.to_owned());
        }
        Some(("store", s)) => {
            d.stores.insert(
                s.to_owned(),
                StorePin {
                    revision: revision.to_owned(),
                },
            );
        }
        _ => {
            return Err(PromoteError::Usage(format!(
                "--to {to}: expected fleet or store:NAME"
            )))
        }
    }
    file.validate()
        .map_err(|e| PromoteError::Usage(format!("the promoted file would be invalid: {e}")))
}

/// Writes the promotion commit: onto a new branch (or `--direct` onto the branch) of the
/// fleet repository. A local non-bare repository (the one `roost up` creates) gets the commit
/// in place; anything else is cloned and pushed to.
pub fn promote(db: &FleetDb, spec: &PromoteSpec, work: &Path) -> Result<Promoted, PromoteError> {
    let revision = running_revision(db, &spec.deployment, &spec.from)?;
    let repo = Changeable::open(&spec.repo, &spec.branch, work)?;
    let text = repo
        .read(&spec.file)?
        .ok_or_else(|| PromoteError::Usage(format!("{}: no such file", spec.file)))?;
    let mut file = super::parse_fleet_file(&text)
        .map_err(|e| PromoteError::Usage(format!("{}: {e}", spec.file)))?;
    edit(&mut file, &spec.deployment, &spec.to, &revision)?;
    let yaml = serde_saphyr::to_string(&file)
        .map_err(|e| PromoteError::Usage(format!("cannot write YAML: {e}")))?;
    let text = format!(
        "# Promoted {} from {} to {} by roost promote.\n{yaml}",
        spec.deployment, spec.from, spec.to
    );
    let message = format!(
        "Promote {} {} from {} to {}",
        spec.deployment,
        ShortRev::of(&revision),
        spec.from,
        spec.to
    );
    let to = if spec.direct {
        CommitTo::Direct
    } else {
        CommitTo::NewBranch(format!(
            "promote/{}-{}",
            spec.deployment,
            ShortRev::of(&revision)
        ))
    };
    let done = repo.commit(
        &[Edit::Put {
            path: spec.file.clone(),
            content: text.into_bytes(),
        }],
        &message,
        "roost promote",
        &to,
    )?;
    Ok(Promoted {
        revision,
        branch: done.branch,
        commit: done.commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups: [canary, all]
deployments:
  kitchen-display:
    source: {url: git://h/apps, ref: HEAD, path: apps/kitchen-display}
    policy: {prune: true, self_heal: true, health_timeout_s: 120}
    waves:
      - {name: canary, group: canary}
      - {name: half, percent: 50}
      - {name: everyone, fleet: true}
    abort: {failed_pct: 20, min_finished: 1, wave_timeout_s: 600}
";

    #[test]
    fn edits_pin_the_fleet_or_a_store() {
        let mut f = super::super::parse_fleet_file(FLEET.as_bytes()).expect("file");
        let rev = "a".repeat(40);
        edit(&mut f, "kitchen-display", "fleet", &rev).expect("fleet");
        let src = f.deployments["kitchen-display"]
            .source
            .clone()
            .expect("src");
        assert_eq!(src.revision.as_deref(), Some(rev.as_str()));
        assert_eq!(src.git_ref, None, "exactly one of ref and revision");
        edit(&mut f, "kitchen-display", "store:store-0042", &rev).expect("pin");
        assert_eq!(
            f.deployments["kitchen-display"].stores["store-0042"].revision,
            rev
        );
        assert!(edit(&mut f, "nope", "fleet", &rev).is_err());
        assert!(edit(&mut f, "kitchen-display", "group:x", &rev).is_err());
        // The written YAML reads back as the same file.
        let yaml = serde_saphyr::to_string(&f).expect("yaml");
        assert_eq!(
            super::super::parse_fleet_file(yaml.as_bytes()).expect("reparse"),
            f
        );
    }
}
