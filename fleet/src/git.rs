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

// ---------------------------------------------------------------------------------------------
// Changes to a repository the way an operator makes them: clone (or use a local checkout),
// edit files, commit directly onto the branch or on a new branch for a pull request, push.
// `roost promote`, `roost store enroll` and `roost store retire` write their changes so.

/// A change to a repository could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Cloning the repository.
    #[error("cloning {url}")]
    Clone {
        /// The repository.
        url: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// The branch to change is not in the repository.
    #[error("{repo} has no branch {branch}")]
    NoBranch {
        /// The repository.
        repo: String,
        /// The branch.
        branch: String,
    },
    /// A path that is not a plain relative path in the repository.
    #[error("{0:?} is not a path inside the repository")]
    Path(String),
    /// libgit2 refused a step.
    #[error("git {step}")]
    Git {
        /// What was being done.
        step: &'static str,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// Pushing the new commit.
    #[error("pushing {branch} to {url}")]
    Push {
        /// The branch.
        branch: String,
        /// The repository.
        url: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
}

fn change_step(step: &'static str) -> impl Fn(git2::Error) -> ChangeError {
    move |source| ChangeError::Git { step, source }
}

/// One file of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Write `content` to `path` (created or replaced).
    Put {
        /// Path in the repository.
        path: String,
        /// New content.
        content: Vec<u8>,
    },
    /// Delete `path`.
    Remove {
        /// Path in the repository.
        path: String,
    },
}

impl Edit {
    fn path(&self) -> &str {
        match self {
            Edit::Put { path, .. } | Edit::Remove { path } => path,
        }
    }
}

/// Where a change's commit goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitTo {
    /// Onto the branch the change started from (`--direct`).
    Direct,
    /// Onto a new branch of this name, for a pull request.
    NewBranch(String),
}

/// A change's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The commit id.
    pub commit: String,
    /// The branch it is on.
    pub branch: String,
}

/// A repository opened to be changed: a local non-bare repository is changed in place (the
/// commit is made there, and a direct commit onto the checked-out branch updates its working
/// files); anything else (a URL, a bare repository) is cloned into a work directory and the
/// commit pushed back.
pub struct Changeable {
    repo: git2::Repository,
    url: String,
    branch: String,
    base: git2::Oid,
    push: bool,
}

impl Changeable {
    /// Opens `repo` (a path or URL) at `branch` (`HEAD`: the checked-out branch), cloning it
    /// into `work` when it is not a local checkout.
    pub fn open(repo: &str, branch: &str, work: &Path) -> Result<Changeable, ChangeError> {
        let local = git2::Repository::open(repo).ok().filter(|r| !r.is_bare());
        let (r, push) = match local {
            Some(r) => (r, false),
            None => {
                let cloned = git2::build::RepoBuilder::new()
                    .branch(branch)
                    .clone(repo, work)
                    .or_else(|_| {
                        // A half-made clone of the first try is in the way of the second.
                        let _ = std::fs::remove_dir_all(work);
                        git2::Repository::clone(repo, work)
                    })
                    .map_err(|source| ChangeError::Clone {
                        url: repo.to_owned(),
                        source,
                    })?;
                (cloned, true)
            }
        };
        let head_branch = || {
            r.head()
                .ok()
                .and_then(|h| h.shorthand().ok().map(str::to_owned))
        };
        let (name, base) = if branch == "HEAD" {
            let c = r
                .head()
                .and_then(|h| h.peel_to_commit())
                .map_err(change_step("HEAD"))?;
            (head_branch().unwrap_or_else(|| "main".into()), c.id())
        } else {
            let c = r
                .find_branch(branch, git2::BranchType::Local)
                .and_then(|b| b.get().peel_to_commit())
                .map_err(|_| ChangeError::NoBranch {
                    repo: repo.to_owned(),
                    branch: branch.to_owned(),
                })?;
            (branch.to_owned(), c.id())
        };
        Ok(Changeable {
            repo: r,
            url: repo.to_owned(),
            branch: name,
            base,
            push,
        })
    }

    /// The branch the change starts from.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    fn base_tree(&self) -> Result<git2::Tree<'_>, ChangeError> {
        self.repo
            .find_commit(self.base)
            .and_then(|c| c.tree())
            .map_err(change_step("tree"))
    }

    /// The content of `path` at the branch's tip, if it is a file.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, ChangeError> {
        let tree = self.base_tree()?;
        let Ok(entry) = tree.get_path(Path::new(path)) else {
            return Ok(None);
        };
        match entry.to_object(&self.repo).map(|o| o.into_blob()) {
            Ok(Ok(blob)) => Ok(Some(blob.content().to_vec())),
            Ok(Err(_)) => Ok(None),
            Err(source) => Err(ChangeError::Git {
                step: "read",
                source,
            }),
        }
    }

    /// The paths of the files under `dir` (recursively; `""`: the whole tree) at the
    /// branch's tip, sorted.
    pub fn files_under(&self, dir: &str) -> Result<Vec<String>, ChangeError> {
        let tree = self.base_tree()?;
        let prefix = dir.trim_end_matches('/');
        let mut out = Vec::new();
        tree.walk(git2::TreeWalkMode::PreOrder, |root, entry| {
            if entry.kind() == Some(git2::ObjectType::Blob) {
                let path = format!("{root}{}", entry.name().unwrap_or_default());
                if prefix.is_empty() || path.starts_with(&format!("{prefix}/")) {
                    out.push(path);
                }
            }
            git2::TreeWalkResult::Ok
        })
        .map_err(change_step("walk"))?;
        out.sort();
        Ok(out)
    }

    /// Commits `edits` on top of the branch's tip (no working tree involved) to `to`, and
    /// pushes it when the repository was cloned.
    pub fn commit(
        &self,
        edits: &[Edit],
        message: &str,
        author: &str,
        to: &CommitTo,
    ) -> Result<Committed, ChangeError> {
        let base = self
            .repo
            .find_commit(self.base)
            .map_err(change_step("commit"))?;
        let mut index = git2::Index::new().map_err(change_step("index"))?;
        index
            .read_tree(&base.tree().map_err(change_step("tree"))?)
            .map_err(change_step("index"))?;
        for e in edits {
            let p = e.path();
            if p.is_empty()
                || p.starts_with('/')
                || p.contains('\\')
                || p.split('/').any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(ChangeError::Path(p.to_owned()));
            }
            match e {
                Edit::Put { path, content } => {
                    let id = self.repo.blob(content).map_err(change_step("blob"))?;
                    index
                        .add(&git2::IndexEntry {
                            ctime: git2::IndexTime::new(0, 0),
                            mtime: git2::IndexTime::new(0, 0),
                            dev: 0,
                            ino: 0,
                            mode: 0o100644,
                            uid: 0,
                            gid: 0,
                            file_size: u32::try_from(content.len()).unwrap_or(u32::MAX),
                            id,
                            flags: 0,
                            flags_extended: 0,
                            path: path.as_bytes().to_vec(),
                        })
                        .map_err(change_step("add"))?;
                }
                Edit::Remove { path } => {
                    index
                        .remove_path(Path::new(path))
                        .map_err(change_step("remove"))?;
                }
            }
        }
        let tree_id = index
            .write_tree_to(&self.repo)
            .map_err(change_step("tree"))?;
        let tree = self.repo.find_tree(tree_id).map_err(change_step("tree"))?;
        let sig = self
            .repo
            .signature()
            .or_else(|_| git2::Signature::now(author, "roost@localhost"))
            .map_err(change_step("signature"))?;
        let commit = self
            .repo
            .commit(None, &sig, &sig, message, &tree, &[&base])
            .map_err(change_step("commit"))?;
        let branch = match to {
            CommitTo::Direct => self.branch.clone(),
            CommitTo::NewBranch(b) => b.clone(),
        };
        self.repo
            .reference(&format!("refs/heads/{branch}"), commit, true, message)
            .map_err(change_step("branch"))?;
        let head = self
            .repo
            .head()
            .ok()
            .and_then(|h| h.shorthand().ok().map(str::to_owned));
        if self.push {
            let mut remote = self
                .repo
                .find_remote("origin")
                .map_err(change_step("remote"))?;
            remote
                .push(&[format!("refs/heads/{branch}:refs/heads/{branch}")], None)
                .map_err(|source| ChangeError::Push {
                    branch: branch.clone(),
                    url: self.url.clone(),
                    source,
                })?;
        } else if head.as_deref() == Some(branch.as_str()) {
            // The checked-out branch moved: bring the changed files of the working copy along.
            let mut co = git2::build::CheckoutBuilder::new();
            co.force();
            for e in edits {
                co.path(e.path());
            }
            self.repo
                .checkout_head(Some(&mut co))
                .map_err(change_step("checkout"))?;
        }
        Ok(Committed {
            commit: commit.to_string(),
            branch,
        })
    }
}
