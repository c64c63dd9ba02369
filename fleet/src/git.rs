//! Everything the cloud does with Git, with git2: resolving a branch or tag through the remote
//! (`roost rollout --revision main`, the controller's tracked refs), a cache of bare
//! repositories the GitOps controller fetches the fleet repository and the sources into and
//! reads files and commits from, and writing commits to a working repository (the demo's
//! repositories, tests). Git over https goes through the transport the `roost` binary
//! registers at start; this module only hands git2 URLs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tracing::info;

/// A Git operation of the cloud side failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The repository has no working tree to commit from.
    #[error("{0}: bare repository")]
    Bare(String),
    /// Writing a file of the new tree.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// libgit2 refused a step on a local repository.
    #[error("git {step}")]
    Git {
        /// What was being done (index, tree, commit …).
        step: &'static str,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// A URL the cloud does not fetch from.
    #[error("{url}: {why}")]
    Url {
        /// The URL (without user-info).
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Talking to a remote failed (connecting, listing its refs, fetching).
    #[error("{step} {url}")]
    Remote {
        /// What was being done (`ls-remote`, `fetch`).
        step: &'static str,
        /// The remote.
        url: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// The remote has no such branch or tag.
    #[error("{rev} is not a branch, tag or full commit id in {url}")]
    RefNotFound {
        /// The remote.
        url: String,
        /// What was asked for.
        rev: String,
    },
    /// The commit is not in the repository, even after fetching.
    #[error("revision {revision} not found in {url}")]
    RevisionNotFound {
        /// The remote.
        url: String,
        /// Commit id.
        revision: String,
    },
    /// A fetch did not finish in time (or a stalled one still holds the repository).
    #[error("fetching {url}: {why}")]
    Timeout {
        /// The remote.
        url: String,
        /// What did not finish.
        why: String,
    },
    /// The path at the commit is not a file.
    #[error("{path}: not a file")]
    NotAFile {
        /// The path in the repository.
        path: String,
    },
    /// The file at the commit is larger than the caller reads.
    #[error("{path}: {size} bytes, limit {limit}")]
    TooLarge {
        /// The path in the repository.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The cache directory could not be created.
    #[error("git cache directory {}", path.display())]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blocking Git job panicked or was cancelled.
    #[error("git job")]
    Job(#[from] tokio::task::JoinError),
}

fn step(step: &'static str) -> impl Fn(git2::Error) -> GitError {
    move |source| GitError::Git { step, source }
}

fn remote<'a>(step: &'static str, url: &'a str) -> impl Fn(git2::Error) -> GitError + 'a {
    move |source| GitError::Remote {
        step,
        url: url.to_owned(),
        source,
    }
}

/// The transports the cloud fetches over, as the agent: no `ext::` commands, no plain
/// `http`, no ssh.
const TRANSPORTS: [&str; 3] = ["https", "git", "file"];

/// Checks that `url` is one the cloud fetches from: a transport of [`TRANSPORTS`] and no
/// user-info (credentials do not belong in a URL that ends up in logs and the database).
pub fn check_url(url: &str) -> Result<(), GitError> {
    let why = match url.split_once("://") {
        None => "not a URL of the https, git or file transport",
        Some((scheme, _)) if !TRANSPORTS.contains(&scheme) => {
            "the cloud fetches over https, git and file only"
        }
        Some((scheme, rest)) => match rest.split('/').next().and_then(|a| a.rfind('@')) {
            Some(at) => {
                return Err(GitError::Url {
                    url: format!("{scheme}://***@{}", &rest[at + 1..]),
                    why: "user-info in a URL",
                })
            }
            None => return Ok(()),
        },
    };
    Err(GitError::Url {
        url: url.to_owned(),
        why,
    })
}

/// Resolves a branch, tag or full commit id to a commit id through the remote (ls-remote); a
/// full commit id is taken as it is.
pub fn resolve_revision(url: &str, rev: &str) -> Result<String, GitError> {
    if roost_schemas::rollout::is_full_sha(rev) {
        return Ok(rev.to_owned());
    }
    let mut remote_ = git2::Remote::create_detached(url).map_err(remote("ls-remote", url))?;
    remote_
        .connect(git2::Direction::Fetch)
        .map_err(remote("ls-remote", url))?;
    let heads = remote_.list().map_err(remote("ls-remote", url))?;
    let wanted = [
        rev.to_owned(),
        format!("refs/heads/{rev}"),
        format!("refs/tags/{rev}^{{}}"),
        format!("refs/tags/{rev}"),
    ];
    for w in &wanted {
        if let Some(h) = heads.iter().find(|h| h.name() == w) {
            return Ok(h.oid().to_string());
        }
    }
    Err(GitError::RefNotFound {
        url: url.to_owned(),
        rev: rev.to_owned(),
    })
}

/// Bare repositories, one per remote URL, under one directory: what the GitOps controller
/// fetches (the fleet repository, every source) and reads files and commits from. A commit
/// already in the cache is never fetched again, so a known revision is read with the
/// remote unreachable.
#[derive(Debug, Clone)]
pub struct GitCache {
    root: PathBuf,
    fetch_timeout: Duration,
    /// One lock per URL: a fetch abandoned at its deadline keeps its repository locked until
    /// it really ends, so two fetches never race on one repository.
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl GitCache {
    /// A cache under `root`; a fetch is given up after `fetch_timeout`.
    pub fn new(root: PathBuf, fetch_timeout: Duration) -> GitCache {
        GitCache {
            root,
            fetch_timeout,
            locks: Arc::default(),
        }
    }

    /// The repository of `url`: the first 12 bytes of its SHA-256 in hex (the agent's layout).
    fn dir(&self, url: &str) -> PathBuf {
        let h = Sha256::digest(url.as_bytes());
        self.root.join(
            h[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
    }

    /// Makes sure `revision` is in the cache, fetching the remote's branches and tags (and
    /// then the commit itself, for servers that serve an unadvertised one) only when it is
    /// missing. Returns whether a fetch happened.
    ///
    /// libgit2 has no per-call network timeout, so the fetch runs on a blocking thread under
    /// `fetch_timeout`; one that does not end in time is abandoned and keeps its URL's lock
    /// until it ends.
    pub async fn ensure(&self, url: &str, revision: &str) -> Result<bool, GitError> {
        check_url(url)?;
        let dir = self.dir(url);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(url.to_owned()).or_default().clone()
        };
        let timeout = |why: String| GitError::Timeout {
            url: url.to_owned(),
            why,
        };
        let guard = tokio::time::timeout(self.fetch_timeout, lock.lock_owned())
            .await
            .map_err(|_| timeout("a previous fetch is still stalled".into()))?;
        let (u, r) = (url.to_owned(), revision.to_owned());
        let job = tokio::task::spawn_blocking(move || {
            let res = fetch_missing(&dir, &u, &r);
            drop(guard);
            res
        });
        match tokio::time::timeout(self.fetch_timeout, job).await {
            Ok(res) => res?,
            Err(_) => Err(timeout(format!(
                "no answer within {} s",
                self.fetch_timeout.as_secs()
            ))),
        }
    }

    /// The file at `path` of `revision` (which must be in the cache; None: no such path), at
    /// most `max_bytes` long.
    pub async fn read_file(
        &self,
        url: &str,
        revision: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let (dir, r, p) = (self.dir(url), revision.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let repo = git2::Repository::open_bare(&dir).map_err(step("open"))?;
            let commit = find_commit(&repo, &r)?;
            let entry = match commit.tree().map_err(step("tree"))?.get_path(Path::new(&p)) {
                Ok(e) => e,
                Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
                Err(e) => return Err(step("tree")(e)),
            };
            let object = entry.to_object(&repo).map_err(step("blob"))?;
            let blob = object
                .as_blob()
                .ok_or_else(|| GitError::NotAFile { path: p.clone() })?;
            let size = blob.size() as u64;
            if size > max_bytes {
                return Err(GitError::TooLarge {
                    path: p,
                    size,
                    limit: max_bytes,
                });
            }
            Ok(Some(blob.content().to_vec()))
        })
        .await?
    }

    /// The id of the tree at `dir` of `revision` (which must be in the cache); None when
    /// there is no such directory. Two commits with the same id have the same files there,
    /// byte for byte (what [`GitCache::read_dir`] would read).
    pub async fn tree_id(
        &self,
        url: &str,
        revision: &str,
        dir: &str,
    ) -> Result<Option<String>, GitError> {
        let (root, r, d) = (self.dir(url), revision.to_owned(), dir.to_owned());
        tokio::task::spawn_blocking(move || {
            let repo = git2::Repository::open_bare(&root).map_err(step("open"))?;
            let commit = find_commit(&repo, &r)?;
            let tree = commit.tree().map_err(step("tree"))?;
            match tree.get_path(Path::new(&d)) {
                Ok(e) if e.kind() == Some(git2::ObjectType::Tree) => Ok(Some(e.id().to_string())),
                Ok(_) => Ok(None),
                Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
                Err(e) => Err(step("tree")(e)),
            }
        })
        .await?
    }

    /// The files directly under `dir` of `revision` (which must be in the cache) whose path
    /// `wanted` accepts, by path; empty when there is no such directory. A file larger than
    /// `max_file` bytes, or all of them together larger than `max_total`, is
    /// [`GitError::TooLarge`] (sizes are read from the objects before their content).
    pub async fn read_dir(
        &self,
        url: &str,
        revision: &str,
        dir: &str,
        wanted: fn(&str) -> bool,
        max_file: u64,
        max_total: u64,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, GitError> {
        let (root, r, d) = (self.dir(url), revision.to_owned(), dir.to_owned());
        tokio::task::spawn_blocking(move || {
            let repo = git2::Repository::open_bare(&root).map_err(step("open"))?;
            let commit = find_commit(&repo, &r)?;
            let tree = commit.tree().map_err(step("tree"))?;
            let mut out = std::collections::BTreeMap::new();
            let entry = match tree.get_path(Path::new(&d)) {
                Ok(e) => e,
                Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(out),
                Err(e) => return Err(step("tree")(e)),
            };
            let Some(sub) = entry.to_object(&repo).ok().and_then(|o| o.into_tree().ok()) else {
                return Ok(out);
            };
            let odb = repo.odb().map_err(step("odb"))?;
            let mut total = 0u64;
            for e in sub.iter() {
                let Ok(name) = e.name() else { continue };
                let path = format!("{d}/{name}");
                if e.kind() != Some(git2::ObjectType::Blob) || !wanted(&path) {
                    continue;
                }
                let (size, _) = odb.read_header(e.id()).map_err(step("blob"))?;
                let size = size as u64;
                total += size;
                if size > max_file || total > max_total {
                    return Err(GitError::TooLarge {
                        limit: if size > max_file { max_file } else { max_total },
                        size: if size > max_file { size } else { total },
                        path,
                    });
                }
                let blob = repo.find_blob(e.id()).map_err(step("blob"))?;
                out.insert(path, blob.content().to_vec());
            }
            Ok(out)
        })
        .await?
    }

    /// The subject line (at most 200 characters) and commit time (Unix seconds) of
    /// `revision`, which must be in the cache: for people reading the fleet's status.
    pub async fn commit_info(&self, url: &str, revision: &str) -> Result<(String, i64), GitError> {
        let (dir, r) = (self.dir(url), revision.to_owned());
        tokio::task::spawn_blocking(move || {
            let repo = git2::Repository::open_bare(&dir).map_err(step("open"))?;
            let commit = find_commit(&repo, &r)?;
            let summary = String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default());
            Ok((summary.chars().take(200).collect(), commit.time().seconds()))
        })
        .await?
    }
}

fn find_commit<'r>(
    repo: &'r git2::Repository,
    revision: &str,
) -> Result<git2::Commit<'r>, GitError> {
    git2::Oid::from_str(revision)
        .and_then(|oid| repo.find_commit(oid))
        .map_err(step("commit"))
}

fn has_commit(repo: &git2::Repository, revision: &str) -> bool {
    find_commit(repo, revision).is_ok()
}

/// The blocking part of [`GitCache::ensure`]: opens (or creates) the bare repository in `dir`
/// and fetches `url` into it when `revision` is missing.
fn fetch_missing(dir: &Path, url: &str, revision: &str) -> Result<bool, GitError> {
    let repo = match git2::Repository::open_bare(dir) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|source| GitError::CacheDir {
                path: dir.to_owned(),
                source,
            })?;
            git2::Repository::init_bare(dir).map_err(step("init"))?
        }
    };
    if has_commit(&repo, revision) {
        return Ok(false);
    }
    let mut fo = git2::FetchOptions::new();
    fo.download_tags(git2::AutotagOption::All);
    // Nothing reads FETCH_HEAD.
    fo.update_fetchhead(false);
    // An off-site redirect could lead the fetch anywhere.
    fo.follow_redirects(git2::RemoteRedirect::None);
    info!(%url, %revision, "fetching");
    let mut origin = repo.remote_anonymous(url).map_err(remote("fetch", url))?;
    origin
        .fetch(
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            Some(&mut fo),
            None,
        )
        .map_err(remote("fetch", url))?;
    if !has_commit(&repo, revision) {
        // Servers that allow it serve an unadvertised commit directly.
        let _ = origin.fetch(&[revision], Some(&mut fo), None);
    }
    if has_commit(&repo, revision) {
        Ok(true)
    } else {
        Err(GitError::RevisionNotFound {
            url: url.to_owned(),
            revision: revision.to_owned(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A working repository with one commit of `files`; its file:// URL and the commit.
    fn repo(dir: &Path, files: &[(&str, &str)]) -> (String, String) {
        let repo = git2::Repository::init(dir).expect("init");
        let files = files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect();
        let commit = commit_files(&repo, &files, "the subject\n\nthe body").expect("commit");
        repo.tag_lightweight("v1", &repo.revparse_single("HEAD").expect("head"), false)
            .expect("tag");
        (format!("file://{}", dir.display()), commit)
    }

    #[test]
    fn urls_the_cloud_fetches_from() {
        for ok in [
            "https://git.example/a.git",
            "git://h:9418/a",
            "file:///srv/a",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://git.example/a.git", "https, git and file only"),
            ("ssh://git@h/a", "https, git and file only"),
            ("ext::sh -c touch% /tmp/x", "not a URL"),
            ("/srv/a", "not a URL"),
            ("https://user:token@h/a.git", "user-info"),
        ] {
            let e = check_url(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("token"), "credentials are not repeated: {e}");
        }
    }

    #[test]
    fn resolves_branches_tags_and_full_ids() {
        let dir = tempfile::tempdir().expect("tmp");
        let (url, commit) = repo(dir.path(), &[("roost.yaml", "x")]);
        let branch = git2::Repository::open(dir.path())
            .expect("open")
            .head()
            .expect("head")
            .shorthand()
            .expect("name")
            .to_owned();
        assert_eq!(resolve_revision(&url, &branch).expect("branch"), commit);
        assert_eq!(resolve_revision(&url, "HEAD").expect("HEAD"), commit);
        assert_eq!(resolve_revision(&url, "v1").expect("tag"), commit);
        let full = "c".repeat(40);
        assert_eq!(resolve_revision(&url, &full).expect("as is"), full);
        let e = resolve_revision(&url, "nope").expect_err("unknown");
        assert!(matches!(e, GitError::RefNotFound { .. }), "{e}");
        let e = resolve_revision("file:///nonexistent/repo", "main").expect_err("no remote");
        assert!(
            matches!(
                e,
                GitError::Remote {
                    step: "ls-remote",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn fetches_once_and_reads_files_and_commits_from_the_cache() {
        let dir = tempfile::tempdir().expect("tmp");
        let (url, commit) = repo(
            &dir.path().join("remote"),
            &[
                ("roost.yaml", "deployments: {}\n"),
                ("apps/web/a.yaml", "a"),
            ],
        );
        let cache = GitCache::new(dir.path().join("cache"), Duration::from_secs(30));
        assert!(cache.ensure(&url, &commit).await.expect("fetch"), "fetched");
        assert!(
            !cache.ensure(&url, &commit).await.expect("cached"),
            "cached"
        );
        assert_eq!(
            cache
                .read_file(&url, &commit, "roost.yaml", 1 << 20)
                .await
                .expect("read"),
            Some(b"deployments: {}\n".to_vec())
        );
        assert_eq!(
            cache
                .read_file(&url, &commit, "missing.yaml", 1 << 20)
                .await
                .expect("read"),
            None
        );
        let e = cache
            .read_file(&url, &commit, "roost.yaml", 4)
            .await
            .expect_err("limit");
        assert!(
            matches!(
                e,
                GitError::TooLarge {
                    size: 16,
                    limit: 4,
                    ..
                }
            ),
            "{e}"
        );
        let e = cache
            .read_file(&url, &commit, "apps", 1 << 20)
            .await
            .expect_err("a directory");
        assert!(matches!(e, GitError::NotAFile { .. }), "{e}");
        let (subject, at) = cache.commit_info(&url, &commit).await.expect("info");
        assert_eq!(subject, "the subject");
        assert!(at > 1_600_000_000, "{at}");
        // The cache serves a known commit with the remote gone.
        std::fs::remove_dir_all(dir.path().join("remote")).expect("rm");
        assert!(!cache.ensure(&url, &commit).await.expect("offline"));
        let e = cache
            .ensure(&url, &"d".repeat(40))
            .await
            .expect_err("unreachable");
        assert!(matches!(e, GitError::Remote { step: "fetch", .. }), "{e}");
        let e = cache
            .ensure("http://h/a", &commit)
            .await
            .expect_err("transport");
        assert!(matches!(e, GitError::Url { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_commit_the_remote_does_not_have_is_not_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let (url, _) = repo(&dir.path().join("remote"), &[("a", "a")]);
        let cache = GitCache::new(dir.path().join("cache"), Duration::from_secs(30));
        let e = cache
            .ensure(&url, &"e".repeat(40))
            .await
            .expect_err("missing");
        assert!(matches!(e, GitError::RevisionNotFound { .. }), "{e}");
    }
}
