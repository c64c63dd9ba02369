//! The cloud side's Git: writing commits to a working repository (the demo's repositories,
//! `roost promote`'s edits, tests). Stores fetch with the agent's own Git code; the cloud
//! never depends on it for writing.

use std::collections::BTreeMap;
use std::path::Path;

/// A Git operation of the cloud side failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The repository has no working tree to commit from.
    #[error("{0}: bare repository")]
    Bare(String),
    /// Writing a file of the new tree.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// libgit2 refused a step.
    #[error("git {step}: {source}")]
    Git {
        /// What was being done (index, tree, commit …).
        step: &'static str,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
}

fn step(step: &'static str) -> impl Fn(git2::Error) -> GitError {
    move |source| GitError::Git { step, source }
}

/// Commits exactly `files` (path → content) as the new tree of HEAD; returns the commit id.
pub fn commit_files(
    repo: &git2::Repository,
    files: &BTreeMap<String, String>,
    message: &str,
) -> Result<String, GitError> {
    let workdir = repo
        .workdir()
        .ok_or_else(|| GitError::Bare(repo.path().display().to_string()))?
        .to_owned();
    let mut index = repo.index().map_err(step("index"))?;
    index.clear().map_err(step("index"))?;
    for (p, c) in files {
        let full = workdir.join(p);
        let io = |source| GitError::Io {
            path: full.display().to_string(),
            source,
        };
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&full, c).map_err(io)?;
        index.add_path(Path::new(p)).map_err(step("add"))?;
    }
    index.write().map_err(step("index"))?;
    let tree_id = index.write_tree().map_err(step("tree"))?;
    let tree = repo.find_tree(tree_id).map_err(step("tree"))?;
    let sig = git2::Signature::now("roost", "roost@localhost").map_err(step("signature"))?;
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .map_err(step("commit"))?;
    Ok(id.to_string())
}
