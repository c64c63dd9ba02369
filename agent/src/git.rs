//! Git sources: a bare-repository cache per source URL, fetched with git2 only when the wanted
//! commit is missing (so a cached revision applies with the remote unreachable), and rendering
//! of a revision's directory straight from the Git object database (no checkout, so a path
//! cannot escape the repository through the file system).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roost_schemas::Reason;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::config::GitCredential;
use crate::decide::{SourceError, SourceUrl};

/// Deepest directory nesting walked under a rollout's path.
pub const MAX_TREE_DEPTH: usize = 32;
/// Deepest YAML/JSON nesting (mappings and sequences) in a manifest document.
pub const YAML_MAX_DEPTH: usize = 64;
/// Most events a manifest file's YAML aliases may replay (`*ref` expansions): bounds a
/// "billion laughs" file to a few thousand nodes instead of a billion.
pub const YAML_MAX_ALIAS_EVENTS: usize = 10_000;
/// Most YAML documents in one manifest file.
pub const YAML_MAX_DOCUMENTS: usize = 4096;

/// Errors of the git subsystem, each with a reason code.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The remote could not be reached or refused.
    #[error("fetching {url}: {message}")]
    Fetch {
        /// Source URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The commit is not in the repository (after fetching).
    #[error("revision {revision} not found in {url}")]
    RevisionNotFound {
        /// Source URL.
        url: String,
        /// Commit id.
        revision: String,
    },
    /// The revision's content is not acceptable.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The revision exceeds a limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The source URL is not one the agent fetches from (checked again right before a fetch).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The local repository cache failed.
    #[error("git cache")]
    Cache(#[from] git2::Error),
    /// The cache directory could not be created.
    #[error("git cache directory {path}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A blocking git job panicked or was cancelled.
    #[error("git job")]
    Join(#[from] tokio::task::JoinError),
}

impl GitError {
    /// The wire reason code.
    pub fn reason(&self) -> Reason {
        match self {
            GitError::Fetch { .. } => Reason::FetchFailed,
            GitError::RevisionNotFound { .. } => Reason::RevisionNotFound,
            GitError::InvalidManifest(_) => Reason::InvalidManifest,
            GitError::TooLarge(_) => Reason::TooLarge,
            GitError::Source(_) => Reason::SourceNotAllowed,
            GitError::Cache(_) | GitError::CacheDir { .. } | GitError::Join(_) => Reason::Internal,
        }
    }
}

/// One file of a rendered revision. `Debug` shows its path and size, never its content (a
/// decrypted Secret's, for one).
#[derive(Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path relative to the rollout's `path`.
    pub path: String,
    /// Content.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for ManifestFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestFile")
            .field("path", &self.path)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// A rendered revision: the files under `path`, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Commit.
    pub revision: String,
    /// Files, sorted by path.
    pub files: Vec<ManifestFile>,
    /// Which files were decrypted from sealed (`.age`) files for this store (by
    /// [`crate::personalize`]; none from Git), and the key their objects' inventory digests
    /// are taken with.
    pub sealed: SealedFiles,
}

/// Files of a [`Rendered`] that hold decrypted content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealedFiles {
    /// Their paths.
    pub paths: std::collections::BTreeSet<String>,
    /// A key derived from the store's identity: digests of these files' objects are keyed
    /// with it, so the inventory cannot be used to test guesses of a secret.
    pub digest_key: Option<roost_runtime::sealed::DigestKey>,
}

impl SealedFiles {
    /// The inventory digest of `bytes` of the file `path`: keyed when the file was sealed.
    pub fn digest(&self, path: &str, bytes: &[u8]) -> Option<String> {
        match &self.digest_key {
            Some(k) if self.paths.contains(path) => Some(k.digest(bytes)),
            _ => None,
        }
    }
}

impl Rendered {
    /// A digest over paths and contents: equal digests mean equal content.
    pub fn digest(&self) -> String {
        digest_files(
            self.files
                .iter()
                .map(|f| (f.path.as_str(), f.data.as_slice())),
        )
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }
}

/// Digest over (path, content) pairs in the given order.
pub fn digest_files<'a>(files: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (p, d) in files {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
        h.update((d.len() as u64).to_be_bytes());
        h.update(d);
    }
    hex::encode(h.finalize())
}

/// Render limits.
#[derive(Debug, Clone, Copy)]
pub struct RenderLimits {
    /// Total bytes.
    pub max_bytes: u64,
    /// Files.
    pub max_files: usize,
    /// Bytes of one file.
    pub max_file_bytes: u64,
}

/// A cache of bare repositories, one per source URL.
#[derive(Clone)]
pub struct GitCache {
    root: PathBuf,
    /// Credentials with their parsed `url_prefix` (one that does not parse is never sent).
    credentials: Arc<Vec<(SourceUrl, GitCredential)>>,
    fetch_timeout: Duration,
    /// `git.ca_file`: the only trust for https servers when set.
    ca_file: Option<PathBuf>,
    locks: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    repos: Repos,
    metrics: Option<crate::metrics::AgentMetrics>,
}

/// Open repositories by cache directory, shared by the reads of every stage (the cached-
/// revision check, files, commit info, render). Opening a repository reads its config files
/// and closing it unmaps its packs: with a new handle for each of those reads that was 8 % of
/// all CPU of 2,000 stores in one process. A fetch opens its own handle (a stalled fetch must
/// not hold the one the reads use), and libgit2 reads the pack directory again when a lookup
/// misses, so the shared handle sees what a fetch added.
#[derive(Clone, Default)]
struct Repos(Arc<std::sync::Mutex<HashMap<PathBuf, Arc<std::sync::Mutex<git2::Repository>>>>>);

impl Repos {
    /// The shared handle of `dir` (opened and kept on first use).
    fn handle(&self, dir: &Path) -> Result<Arc<std::sync::Mutex<git2::Repository>>, GitError> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = map.get(dir) {
            return Ok(h.clone());
        }
        let h = Arc::new(std::sync::Mutex::new(git2::Repository::open_bare(dir)?));
        map.insert(dir.to_owned(), h.clone());
        Ok(h)
    }

    /// Runs `f` with the open repository in `dir` (opened and kept on first use).
    fn with<R>(
        &self,
        dir: &Path,
        f: impl FnOnce(&git2::Repository) -> Result<R, GitError>,
    ) -> Result<R, GitError> {
        let handle = self.handle(dir)?;
        let repo = handle.lock().unwrap_or_else(|p| p.into_inner());
        f(&repo)
    }

    /// Runs `f` on `dir` while no read of it is running or can start (it holds the shared
    /// handle's lock), then replaces the shared handle with a new one, so reads see the
    /// repository as `f` left it (packs added and removed) and never a pack `f` deleted.
    fn exclusive<R>(
        &self,
        dir: &Path,
        f: impl FnOnce() -> Result<R, GitError>,
    ) -> Result<R, GitError> {
        let handle = self.handle(dir)?;
        let mut repo = handle.lock().unwrap_or_else(|p| p.into_inner());
        let out = f();
        match git2::Repository::open_bare(dir) {
            Ok(fresh) => *repo = fresh,
            // The old handle stays; its next miss refreshes the pack list.
            Err(e) => debug!(error = %e, "cannot reopen the cached repository"),
        }
        out
    }
}

/// More packs than this in a cache and a fetch merges the smallest half of them into one
/// (see [`consolidate_packs`]).
pub const MAX_PACKS: usize = 16;

impl std::fmt::Debug for GitCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCache")
            .field("root", &self.root)
            .finish()
    }
}

impl GitCache {
    /// A cache under `root`.
    pub fn new(
        root: PathBuf,
        credentials: Vec<GitCredential>,
        fetch_timeout: Duration,
    ) -> GitCache {
        let credentials = credentials
            .into_iter()
            .filter_map(|c| SourceUrl::parse(&c.url_prefix).ok().map(|u| (u, c)))
            .collect();
        GitCache {
            root,
            credentials: Arc::new(credentials),
            fetch_timeout,
            ca_file: None,
            locks: Arc::default(),
            repos: Repos::default(),
            metrics: None,
        }
    }

    /// Verifies https servers against the CA certificates in `ca_file` (read on every fetch)
    /// instead of the system's trust store.
    pub fn with_ca_file(mut self, ca_file: Option<PathBuf>) -> GitCache {
        self.ca_file = ca_file;
        self
    }

    /// Counts fetches (duration, bytes) in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::AgentMetrics) -> GitCache {
        self.metrics = Some(metrics);
        self
    }

    /// Removes `*.lock` files that a fetch killed mid-way left behind (libgit2 would refuse
    /// to update refs while they exist). Call at startup, before any fetch: the agent is the
    /// cache's only user.
    pub fn clear_stale_locks(&self) -> usize {
        fn rec(dir: &Path, n: &mut usize) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    rec(&p, n);
                } else if p.extension().is_some_and(|x| x == "lock")
                    && std::fs::remove_file(&p).is_ok()
                {
                    *n += 1;
                }
            }
        }
        let mut n = 0;
        rec(&self.root, &mut n);
        if n > 0 {
            info!(removed = n, "removed stale git lock files");
        }
        n
    }

    fn repo_dir(&self, url: &str) -> PathBuf {
        let h = Sha256::digest(url.as_bytes());
        self.root.join(hex::encode(&h[..12]))
    }

    fn lock_for(&self, url: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(url.to_owned()).or_default().clone()
    }

    /// Makes sure `revision` is in the cache, fetching only if it is missing. Returns whether
    /// a fetch happened.
    ///
    /// libgit2 has no per-call network timeout (its global one needs `unsafe`), so the fetch
    /// runs on a blocking thread under a deadline; a stalled fetch is abandoned and keeps its
    /// source's lock until it ends, so there is at most one such thread per source.
    pub async fn ensure(&self, url: &str, revision: &str) -> Result<bool, GitError> {
        // Verification checked the allow-list; this repeats the transport rules right where
        // git2 would take the URL, so no code path hands it `ext::` or `http://`.
        SourceUrl::parse(url)?;
        let dir = self.repo_dir(url);
        // Fast path without the lock: a cached commit applies even while a fetch of this
        // source is stalled (offline, or a rollback to a known revision).
        {
            let (d, r, repos) = (dir.clone(), revision.to_owned(), self.repos.clone());
            let cached = tokio::task::spawn_blocking(move || {
                repos
                    .with(&d, |repo| Ok(has_commit(repo, &r)))
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if cached {
                debug!(%url, %revision, "revision in cache");
                return Ok(false);
            }
        }
        let lock = self.lock_for(url);
        let guard = tokio::time::timeout(self.fetch_timeout, lock.lock_owned())
            .await
            .map_err(|_| GitError::Fetch {
                url: url.to_owned(),
                message: "a previous fetch of this source is still stalled".into(),
            })?;
        let (u, r) = (url.to_owned(), revision.to_owned());
        let creds = self.credentials.clone();
        let ca = self.ca_file.clone();
        let timeout = self.fetch_timeout;
        // The guard moves into the blocking job: an abandoned (stalled) fetch keeps the
        // source locked until it really ends, so two fetches never race on one repository.
        let repos = self.repos.clone();
        let job = tokio::task::spawn_blocking(move || {
            let res = ensure_blocking(&dir, &u, &r, &creds, ca.as_deref(), timeout);
            if matches!(res, Ok(Some(_))) {
                // Still under the source's lock: no other fetch adds a pack meanwhile.
                if let Err(error) = repos.exclusive(&dir, || consolidate_packs(&dir, MAX_PACKS)) {
                    // The fetched revision is in the cache either way; the next fetch tries again.
                    tracing::warn!(error = %error, "could not consolidate the git cache's packs");
                }
            }
            drop(guard);
            res
        });
        let started = std::time::Instant::now();
        let res = match tokio::time::timeout(self.fetch_timeout, job).await {
            Ok(Ok(res)) => res,
            Ok(Err(join)) => Err(GitError::Join(join)),
            Err(_) => Err(GitError::Fetch {
                url: url.to_owned(),
                message: format!("no answer within {} s", self.fetch_timeout.as_secs()),
            }),
        };
        match (&res, &self.metrics) {
            // A fetch happened (or failed): the cached case is not a fetch.
            (Ok(Some(bytes)), Some(m)) => m.fetched(true, *bytes, started.elapsed()),
            (Err(_), Some(m)) => m.fetched(false, 0, started.elapsed()),
            _ => {}
        }
        res.map(|fetched| fetched.is_some())
    }

    /// One file at `revision` (which must be in the cache), at most `max_bytes`.
    pub async fn read_file(
        &self,
        url: &str,
        revision: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let dir = self.repo_dir(url);
        let (r, p, repos) = (revision.to_owned(), path.to_owned(), self.repos.clone());
        tokio::task::spawn_blocking(move || {
            repos.with(&dir, |repo| read_file_blocking(repo, &r, &p, max_bytes))
        })
        .await
        .map_err(GitError::Join)?
    }

    /// The subject line and commit time (Unix seconds) of `revision` (which must be in the
    /// cache), for people reading the fleet's status.
    pub async fn commit_info(&self, url: &str, revision: &str) -> Result<(String, i64), GitError> {
        let dir = self.repo_dir(url);
        let (r, repos) = (revision.to_owned(), self.repos.clone());
        tokio::task::spawn_blocking(move || repos.with(&dir, |repo| commit_info_blocking(repo, &r)))
            .await
            .map_err(GitError::Join)?
    }

    /// Renders the files under `path` at `revision` (which must be in the cache).
    pub async fn render(
        &self,
        url: &str,
        revision: &str,
        path: &str,
        limits: RenderLimits,
    ) -> Result<Rendered, GitError> {
        let dir = self.repo_dir(url);
        let (r, p, repos) = (revision.to_owned(), path.to_owned(), self.repos.clone());
        tokio::task::spawn_blocking(move || {
            repos.with(&dir, |repo| render_blocking(repo, &r, &p, limits))
        })
        .await
        .map_err(GitError::Join)?
    }
}

/// The subject line (at most 200 characters) and commit time of `revision`.
fn commit_info_blocking(
    repo: &git2::Repository,
    revision: &str,
) -> Result<(String, i64), GitError> {
    let commit = repo.find_commit(git2::Oid::from_str(revision)?)?;
    let summary = String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default()).into_owned();
    let subject: String = summary.chars().take(200).collect();
    Ok((subject, commit.time().seconds()))
}

/// One file of a commit (None when the commit has no such file).
fn read_file_blocking(
    repo: &git2::Repository,
    revision: &str,
    path: &str,
    max_bytes: u64,
) -> Result<Option<Vec<u8>>, GitError> {
    let commit = repo.find_commit(git2::Oid::from_str(revision)?)?;
    let entry = match commit.tree()?.get_path(Path::new(path)) {
        Ok(e) => e,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let blob = entry
        .to_object(repo)?
        .into_blob()
        .map_err(|_| GitError::InvalidManifest(format!("{path}: not a file")))?;
    if blob.size() as u64 > max_bytes {
        return Err(GitError::TooLarge(format!(
            "{path}: {} bytes, limit {max_bytes}",
            blob.size()
        )));
    }
    Ok(Some(blob.content().to_vec()))
}

fn open_or_init(dir: &Path) -> Result<git2::Repository, GitError> {
    match git2::Repository::open_bare(dir) {
        Ok(r) => Ok(r),
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|source| GitError::CacheDir {
                path: dir.to_owned(),
                source,
            })?;
            // libgit2's internal template only: git2's default copies the system's template
            // directory (a dozen sample hooks nothing here runs) into every new cache, which
            // on a fleet-sized sim was 8 % of all CPU in new inodes.
            let mut opts = git2::RepositoryInitOptions::new();
            opts.bare(true).external_template(false);
            Ok(git2::Repository::init_opts(dir, &opts)?)
        }
    }
}

/// The packs (`objects/pack/pack-*.pack`) of the bare repository in `dir`, by file stem.
fn pack_stems(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("objects/pack"))? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".pack") {
            if stem.starts_with("pack-") {
                out.push(stem.to_owned());
            }
        }
    }
    Ok(out)
}

/// The object ids an index file (`.idx`, version 2, SHA-1) lists.
fn idx_oids(path: &Path) -> std::io::Result<Vec<git2::Oid>> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let bytes = std::fs::read(path)?;
    let be32 = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.get(..4) != Some(b"\xfftOc".as_slice()) || be32(4) != Some(2) {
        return Err(bad("not a version 2 pack index"));
    }
    // The fan-out table's last entry is the number of objects; their ids follow it.
    let n = be32(8 + 255 * 4).ok_or_else(|| bad("truncated"))?;
    let ids = bytes
        .get(8 + 256 * 4..8 + 256 * 4 + n * 20)
        .ok_or_else(|| bad("truncated"))?;
    ids.chunks_exact(20)
        .map(|id| git2::Oid::from_bytes(id).map_err(|_| bad("bad object id")))
        .collect()
}

/// Every fetch adds a pack (and its index) to the cache and libgit2 never merges them: a
/// store that received a thousand rollouts would hold a thousand packs, every object lookup
/// that misses (each new revision's first) would search them all, and since libgit2 keeps
/// each pack it has read open (no file limit by default), the agent would hold a thousand
/// open files. With more than `max` packs, this merges the `max / 2` smallest into one
/// (generations, as `git repack --geometric` does: new objects are copied a few times as
/// they move into larger packs, never the whole cache on every call). The new pack is synced
/// before the packs it replaces are deleted, so a power cut at any point leaves the old
/// packs, the new one, or both: no revision in the cache is lost. Returns whether it merged.
/// Run it with no read or fetch of the repository in progress (under the source's fetch
/// lock and [`Repos::exclusive`]).
pub fn consolidate_packs(dir: &Path, max: usize) -> Result<bool, GitError> {
    let cache_io = |source| GitError::CacheDir {
        path: dir.to_owned(),
        source,
    };
    let pack_dir = dir.join("objects/pack");
    let stems = pack_stems(dir).map_err(cache_io)?;
    if stems.len() <= max {
        return Ok(false);
    }
    let mut sized: Vec<(u64, String)> = stems
        .into_iter()
        .map(|stem| {
            let len = std::fs::metadata(pack_dir.join(format!("{stem}.pack")))
                .map(|m| m.len())
                .unwrap_or(0);
            (len, stem)
        })
        .collect();
    sized.sort();
    let merged: Vec<String> = sized
        .into_iter()
        .take(max.div_ceil(2).max(2))
        .map(|(_, stem)| stem)
        .collect();
    let repo = git2::Repository::open_bare(dir)?;
    let mut pb = repo.packbuilder()?;
    let mut seen = std::collections::HashSet::new();
    for stem in &merged {
        for oid in idx_oids(&pack_dir.join(format!("{stem}.idx"))).map_err(cache_io)? {
            if seen.insert(oid) {
                pb.insert_object(oid, None)?;
            }
        }
    }
    pb.write(&pack_dir, 0)?;
    let new_stem = format!(
        "pack-{}",
        pb.name()?
            .ok_or_else(|| GitError::Cache(git2::Error::from_str("the new pack has no name")))?
    );
    drop(pb);
    drop(repo);
    // libgit2 does not sync what it writes: the new pack and its index reach the disk
    // before anything they replace is deleted.
    for ext in ["pack", "idx"] {
        let p = pack_dir.join(format!("{new_stem}.{ext}"));
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(cache_io)?;
    }
    std::fs::File::open(&pack_dir)
        .and_then(|f| f.sync_all())
        .map_err(cache_io)?;
    for stem in merged.iter().filter(|s| **s != new_stem) {
        // The index first: libgit2 lists packs by their index, so a pack whose index is
        // gone is never opened, while an index without its pack would be an error.
        for ext in ["idx", "rev", "pack"] {
            match std::fs::remove_file(pack_dir.join(format!("{stem}.{ext}"))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(cache_io(e)),
            }
        }
    }
    info!(packs = merged.len(), objects = seen.len(), into = %new_stem, "merged the git cache's smallest packs");
    Ok(true)
}

fn has_commit(repo: &git2::Repository, revision: &str) -> bool {
    git2::Oid::from_str(revision)
        .ok()
        .and_then(|oid| repo.find_commit(oid).ok())
        .is_some()
}

/// The credential for `url`: the one whose `url_prefix` covers it with the most path
/// segments (https only, compared like the allow-list, so a look-alike host gets nothing).
fn credential_for<'a>(
    creds: &'a [(SourceUrl, GitCredential)],
    url: &str,
) -> Option<&'a (SourceUrl, GitCredential)> {
    let u = SourceUrl::parse(url).ok()?;
    creds
        .iter()
        .filter(|(p, _)| p.scheme == "https" && p.covers(&u))
        .max_by_key(|(p, _)| p.segments.len())
}

fn ensure_blocking(
    dir: &Path,
    url: &str,
    revision: &str,
    creds: &[(SourceUrl, GitCredential)],
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Option<u64>, GitError> {
    let repo = open_or_init(dir)?;
    if has_commit(&repo, revision) {
        debug!(%url, %revision, "revision in cache");
        return Ok(None);
    }
    // Why an https request failed, in our words (libgit2 may replace the transport's
    // message with its own).
    let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let fetch_err = |e: git2::Error| GitError::Fetch {
        url: crate::decide::redact_url(url),
        message: failure
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .unwrap_or_else(|| e.message().to_owned()),
    };
    let https = crate::git_https::FetchSettings {
        ca_file: ca_file.map(Path::to_owned),
        credential: credential_for(creds, url).cloned(),
        timeout,
        failure: failure.clone(),
    };
    let mut remote = repo.remote_anonymous(url).map_err(fetch_err)?;
    let mut cb = git2::RemoteCallbacks::new();
    // Bytes received, as the transfer reports them (the remote's own stats are not kept for
    // every transport).
    let received = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let r2 = received.clone();
    cb.transfer_progress(move |p| {
        r2.set(r2.get().max(p.received_bytes() as u64));
        true
    });
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(cb);
    fo.download_tags(git2::AutotagOption::All);
    // Nothing reads FETCH_HEAD; writing it is a file created and one deleted per fetch.
    fo.update_fetchhead(false);
    // An off-site redirect could lead the fetch (and a token) anywhere.
    fo.follow_redirects(git2::RemoteRedirect::None);
    info!(%url, %revision, "fetching");
    let bytes = crate::git_https::with_fetch(https, || {
        remote.fetch(
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            Some(&mut fo),
            None,
        )?;
        let mut bytes = received.replace(0);
        if !has_commit(&repo, revision) {
            // Servers that allow it can serve an unadvertised commit directly.
            let _ = remote.fetch(&[revision], Some(&mut fo), None);
            bytes += received.get();
        }
        Ok(bytes)
    })
    .map_err(fetch_err)?;
    if has_commit(&repo, revision) {
        info!(%url, %revision, bytes, "fetched");
        Ok(Some(bytes))
    } else {
        Err(GitError::RevisionNotFound {
            url: crate::decide::redact_url(url),
            revision: revision.to_owned(),
        })
    }
}

/// Whether a tree entry name can be written as one path component anywhere: not empty,
/// `.` or `..`, no separators or NUL, and not `.git` in any case (a crafted tree object can
/// hold names that `git` itself never writes).
pub fn safe_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.eq_ignore_ascii_case(".git")
        && !name.contains(['/', '\\', '\0'])
}

/// Reads a blob after checking its size in the object header, so an oversize blob is never
/// inflated into memory.
fn read_blob(
    repo: &git2::Repository,
    id: git2::Oid,
    path: &str,
    limits: &RenderLimits,
) -> Result<Vec<u8>, GitError> {
    let (size, _) = repo.odb()?.read_header(id)?;
    if size as u64 > limits.max_file_bytes {
        return Err(GitError::TooLarge(format!(
            "{path}: {size} bytes, limit {} per file",
            limits.max_file_bytes
        )));
    }
    Ok(repo.find_blob(id)?.content().to_vec())
}

fn render_blocking(
    repo: &git2::Repository,
    revision: &str,
    path: &str,
    limits: RenderLimits,
) -> Result<Rendered, GitError> {
    let oid = git2::Oid::from_str(revision)?;
    let commit = repo.find_commit(oid)?;
    let root = commit.tree()?;
    let path = roost_schemas::rollout::normalize_path(path)
        .map_err(|m| GitError::InvalidManifest(format!("path: {m}")))?;
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut push = |p: String, data: Vec<u8>| -> Result<(), GitError> {
        total += data.len() as u64;
        if total > limits.max_bytes {
            return Err(GitError::TooLarge(format!(
                "revision content exceeds {} bytes",
                limits.max_bytes
            )));
        }
        files.push(ManifestFile { path: p, data });
        if files.len() > limits.max_files {
            return Err(GitError::TooLarge(format!(
                "more than {} files",
                limits.max_files
            )));
        }
        Ok(())
    };
    if path.is_empty() {
        walk(repo, &root, "", 0, &limits, &mut push)?;
    } else {
        let entry = root.get_path(Path::new(&path)).map_err(|_| {
            GitError::InvalidManifest(format!("path {path:?} does not exist in {revision}"))
        })?;
        match (entry.kind(), entry.filemode()) {
            (Some(git2::ObjectType::Tree), _) => {
                let tree = repo.find_tree(entry.id())?;
                walk(repo, &tree, "", 0, &limits, &mut push)?;
            }
            (Some(git2::ObjectType::Blob), 0o120000) => {
                return Err(GitError::InvalidManifest(format!(
                    "path {path:?} is a symbolic link"
                )))
            }
            (Some(git2::ObjectType::Blob), _) => {
                let name = entry.name().unwrap_or("manifest").to_owned();
                if !safe_entry_name(&name) {
                    return Err(GitError::InvalidManifest(format!(
                        "path {path:?}: unusable file name"
                    )));
                }
                let data = read_blob(repo, entry.id(), &path, &limits)?;
                push(name, data)?;
            }
            _ => {
                return Err(GitError::InvalidManifest(format!(
                    "path {path:?} is not a directory or file"
                )))
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    for f in &files {
        check_syntax(f)?;
    }
    Ok(Rendered {
        revision: revision.to_owned(),
        files,
        sealed: SealedFiles::default(),
    })
}

fn walk(
    repo: &git2::Repository,
    tree: &git2::Tree<'_>,
    prefix: &str,
    depth: usize,
    limits: &RenderLimits,
    push: &mut dyn FnMut(String, Vec<u8>) -> Result<(), GitError>,
) -> Result<(), GitError> {
    if depth > MAX_TREE_DEPTH {
        return Err(GitError::InvalidManifest(format!(
            "{prefix}: directories nested deeper than {MAX_TREE_DEPTH}"
        )));
    }
    if tree.len() > limits.max_files {
        return Err(GitError::TooLarge(format!(
            "{prefix}: more than {} entries in one directory",
            limits.max_files
        )));
    }
    for entry in tree.iter() {
        let name = entry
            .name()
            .map_err(|_| GitError::InvalidManifest("a file name is not UTF-8".into()))?;
        if !safe_entry_name(name) {
            return Err(GitError::InvalidManifest(format!(
                "{prefix}/{name:?}: unusable file name"
            )));
        }
        let p = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        match (entry.kind(), entry.filemode()) {
            (Some(git2::ObjectType::Tree), _) => {
                let sub = repo.find_tree(entry.id())?;
                walk(repo, &sub, &p, depth + 1, limits, push)?;
            }
            (Some(git2::ObjectType::Blob), 0o120000) => {
                return Err(GitError::InvalidManifest(format!(
                    "{p}: symbolic links are not allowed"
                )))
            }
            (Some(git2::ObjectType::Blob), _) => {
                let data = read_blob(repo, entry.id(), &p, limits)?;
                push(p, data)?;
            }
            _ => {
                return Err(GitError::InvalidManifest(format!(
                    "{p}: submodules are not supported"
                )))
            }
        }
    }
    Ok(())
}

/// True for files that hold manifests (`*.yaml`, `*.yml`, `*.json`).
pub fn is_manifest(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

/// The YAML parser's limits for one manifest file: nesting depth, alias replay (billion
/// laughs), documents; no input snippets in error messages (they would carry the file's
/// content, a Secret's for instance, into events).
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: YAML_MAX_DEPTH,
            flow_nesting_limit: YAML_MAX_DEPTH,
            max_documents: YAML_MAX_DOCUMENTS,
            max_aliases: YAML_MAX_ALIAS_EVENTS,
            max_recorded_anchor_events: YAML_MAX_ALIAS_EVENTS,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: YAML_MAX_ALIAS_EVENTS,
            max_replay_stack_depth: 16,
        },
        with_snippet: false,
    }
}

/// Depth of a JSON value (a scalar is 0).
fn depth(v: &serde_json::Value) -> usize {
    // Iterative: the parsers bound the depth, but this must not overflow the stack either.
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Parses one manifest file into its documents (multi-document YAML or JSON), skipping
/// empty documents. UTF-8 without NUL only; nesting, aliases and documents are bounded
/// ([`YAML_MAX_DEPTH`], [`YAML_MAX_ALIAS_EVENTS`], [`YAML_MAX_DOCUMENTS`]).
pub fn parse_documents(f: &ManifestFile) -> Result<Vec<serde_json::Value>, GitError> {
    let text = std::str::from_utf8(&f.data)
        .map_err(|_| GitError::InvalidManifest(format!("{}: not UTF-8", f.path)))?;
    if text.contains('\0') {
        return Err(GitError::InvalidManifest(format!(
            "{}: contains a NUL byte",
            f.path
        )));
    }
    let docs: Vec<serde_json::Value> = if f.path.to_ascii_lowercase().ends_with(".json") {
        vec![serde_json::from_str(text)
            .map_err(|e| GitError::InvalidManifest(format!("{}: {e}", f.path)))?]
    } else {
        serde_saphyr::from_multiple_with_options(text, yaml_options())
            .map_err(|e| GitError::InvalidManifest(format!("{}: {e}", f.path)))?
    };
    if docs.iter().any(|d| depth(d) > YAML_MAX_DEPTH) {
        return Err(GitError::InvalidManifest(format!(
            "{}: nested deeper than {YAML_MAX_DEPTH}",
            f.path
        )));
    }
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Writes documents back as one manifest file of `path`'s kind, the inverse of
/// [`parse_documents`]: a `.json` file holds exactly one document (pretty JSON); any other
/// file YAML documents separated by `---`. The result is parsed again and must give exactly
/// `docs` back (else YAML is tried as JSON documents, which YAML reads too), so a string can
/// never come back as structure, whatever it holds. `None` when no form round-trips.
pub fn write_documents(path: &str, docs: &[serde_json::Value]) -> Option<Vec<u8>> {
    let round_trips = |data: &[u8]| {
        let f = ManifestFile {
            path: path.to_owned(),
            data: data.to_vec(),
        };
        parse_documents(&f).is_ok_and(|back| back == docs)
    };
    let mut forms: Vec<Vec<u8>> = Vec::new();
    if path.to_ascii_lowercase().ends_with(".json") {
        if let [doc] = docs {
            if let Ok(mut v) = serde_json::to_vec_pretty(doc) {
                v.push(b'\n');
                forms.push(v);
            }
        }
    } else {
        if let Ok(y) = serde_saphyr::to_string_multiple(docs) {
            forms.push(y.into_bytes());
        }
        let json: Result<Vec<String>, _> = docs.iter().map(serde_json::to_string).collect();
        if let Ok(json) = json {
            forms.push(format!("{}\n", json.join("\n---\n")).into_bytes());
        }
    }
    forms.into_iter().find(|f| round_trips(f))
}

fn check_syntax(f: &ManifestFile) -> Result<(), GitError> {
    if is_manifest(&f.path) {
        parse_documents(f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository with `files` committed; returns (file:// URL, commit id).
    fn repo_with(
        dir: &Path,
        files: &[(&str, &[u8])],
        symlink: Option<(&str, &str)>,
    ) -> (String, String) {
        let repo = git2::Repository::init(dir).expect("init");
        let mut index = repo.index().expect("index");
        for (p, c) in files {
            let full = dir.join(p);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(&full, c).expect("write");
            index.add_path(Path::new(p)).expect("add");
        }
        if let Some((link, target)) = symlink {
            std::os::unix::fs::symlink(target, dir.join(link)).expect("symlink");
            index.add_path(Path::new(link)).expect("add link");
        }
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let sig = git2::Signature::now("t", "t@t").expect("sig");
        let id = repo
            .commit(Some("HEAD"), &sig, &sig, "c", &tree, &[])
            .expect("commit");
        (format!("file://{}", dir.display()), id.to_string())
    }

    const LIMITS: RenderLimits = RenderLimits {
        max_bytes: 1 << 20,
        max_files: 100,
        max_file_bytes: 1 << 20,
    };

    #[tokio::test]
    async fn file_urls_fetch_once_render_sorted_and_work_offline() {
        let src = tempfile::tempdir().expect("tmp");
        let (url, rev) = repo_with(
            src.path(),
            &[
                ("apps/web/b.yaml", b"kind: B\n---\nkind: C\n"),
                ("apps/web/a/x.json", b"{\"kind\": \"A\"}"),
                ("apps/other.yaml", b"kind: O\n"),
            ],
            None,
        );
        let cache_dir = tempfile::tempdir().expect("tmp");
        let cache = GitCache::new(cache_dir.path().to_owned(), vec![], Duration::from_secs(10));
        assert!(
            cache.ensure(&url, &rev).await.expect("fetch"),
            "first time fetches"
        );
        assert!(
            !cache.ensure(&url, &rev).await.expect("cached"),
            "then the cache answers"
        );
        // The cache holds objects and refs, not the system's sample hooks (libgit2's own
        // template writes only hooks/README.sample).
        let hooks: Vec<_> = walkdir(cache_dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sample"))
            .filter(|p| !p.ends_with("hooks/README.sample"))
            .collect();
        assert!(hooks.is_empty(), "template files copied: {hooks:?}");
        let r = cache
            .render(&url, &rev, "./apps/web/", LIMITS)
            .await
            .expect("render");
        let paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["a/x.json", "b.yaml"]);
        assert_eq!(parse_documents(&r.files[1]).expect("docs").len(), 2);
        // The source disappears: the cached revision still renders.
        drop(src);
        assert!(!cache.ensure(&url, &rev).await.expect("offline"));
        assert_eq!(
            cache
                .render(&url, &rev, "apps/web", LIMITS)
                .await
                .expect("render"),
            r
        );
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = cache.ensure(&url, missing).await.expect_err("gone");
        assert_eq!(err.reason(), Reason::FetchFailed);
    }

    #[tokio::test]
    async fn packs_are_consolidated_and_every_revision_survives() {
        let src = tempfile::tempdir().expect("tmp");
        let (url, first) = repo_with(src.path(), &[("app/v.yaml", b"n: 0\n")], None);
        let source = git2::Repository::open(src.path()).expect("open");
        let cache_dir = tempfile::tempdir().expect("tmp");
        let cache = GitCache::new(cache_dir.path().to_owned(), vec![], Duration::from_secs(10));
        assert!(cache.ensure(&url, &first).await.expect("fetch"));
        let repo_dir = cache.repo_dir(&url);
        let mut revisions = vec![first];
        let mut most = 0;
        for n in 1..=(2 * MAX_PACKS + 3) {
            let (_, rev) = {
                std::fs::write(src.path().join("app/v.yaml"), format!("n: {n}\n")).expect("w");
                let mut index = source.index().expect("index");
                index.add_path(Path::new("app/v.yaml")).expect("add");
                let tree = source
                    .find_tree(index.write_tree().expect("tree"))
                    .expect("tree");
                let parent = source.head().expect("head").peel_to_commit().expect("c");
                let sig = git2::Signature::now("t", "t@t").expect("sig");
                let id = source
                    .commit(Some("HEAD"), &sig, &sig, "c", &tree, &[&parent])
                    .expect("commit");
                (url.clone(), id.to_string())
            };
            // A read holds the shared handle open across fetches, as the agent's stages do.
            cache
                .commit_info(&url, &revisions[n - 1])
                .await
                .expect("info");
            assert!(cache.ensure(&url, &rev).await.expect("fetch"), "fetch {n}");
            most = most.max(pack_stems(&repo_dir).expect("packs").len());
            revisions.push(rev);
        }
        assert!(most <= MAX_PACKS, "{most} packs at most, limit {MAX_PACKS}");
        assert!(
            pack_stems(&repo_dir).expect("packs").len() < MAX_PACKS,
            "consolidated at least once"
        );
        // Offline, every revision ever fetched still renders from the cache, through the
        // shared handle and through a new one.
        drop(source);
        drop(src);
        for (n, rev) in revisions.iter().enumerate() {
            assert!(
                !cache.ensure(&url, rev).await.expect("cached"),
                "revision {n}"
            );
            let r = cache
                .render(&url, rev, "app", LIMITS)
                .await
                .expect("render");
            assert_eq!(
                r.files[0].data,
                format!("n: {n}\n").into_bytes(),
                "revision {n}"
            );
        }
        let fresh = GitCache::new(cache_dir.path().to_owned(), vec![], Duration::from_secs(10));
        for rev in &revisions {
            assert!(!fresh.ensure(&url, rev).await.expect("cached"));
        }
        // Nothing to do under the limit.
        assert!(!consolidate_packs(&repo_dir, MAX_PACKS).expect("no-op"));
    }

    #[tokio::test]
    async fn bad_revisions_are_refused_with_reasons() {
        let src = tempfile::tempdir().expect("tmp");
        let (url, rev) = repo_with(
            src.path(),
            &[
                ("apps/ok.yaml", b"kind: A\n"),
                ("apps/bad.yaml", b"key: [unclosed\n"),
            ],
            Some(("apps/link.yaml", "/etc/passwd")),
        );
        let cache_dir = tempfile::tempdir().expect("tmp");
        let cache = GitCache::new(cache_dir.path().to_owned(), vec![], Duration::from_secs(10));
        let missing = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            cache
                .ensure(&url, missing)
                .await
                .expect_err("missing")
                .reason(),
            Reason::RevisionNotFound
        );
        cache.ensure(&url, &rev).await.expect("fetch");
        let reason = |r: Result<Rendered, GitError>| r.expect_err("refused").reason();
        assert_eq!(
            reason(cache.render(&url, &rev, "apps", LIMITS).await),
            Reason::InvalidManifest,
            "symlink"
        );
        assert_eq!(
            reason(cache.render(&url, &rev, "nowhere", LIMITS).await),
            Reason::InvalidManifest
        );
        assert_eq!(
            reason(cache.render(&url, &rev, "../x", LIMITS).await),
            Reason::InvalidManifest
        );
        assert_eq!(
            reason(cache.render(&url, &rev, "apps/bad.yaml", LIMITS).await),
            Reason::InvalidManifest
        );
        let tiny = RenderLimits {
            max_bytes: 4,
            max_files: 100,
            max_file_bytes: 1 << 20,
        };
        assert_eq!(
            reason(cache.render(&url, &rev, "apps/ok.yaml", tiny).await),
            Reason::TooLarge
        );
        assert!(cache
            .render(&url, &rev, "apps/ok.yaml", LIMITS)
            .await
            .is_ok());
    }

    fn doc(path: &str, text: &str) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            data: text.as_bytes().to_vec(),
        }
    }

    /// Every path under `dir`, recursively.
    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walkdir(&p));
            }
            out.push(p);
        }
        out
    }

    /// The classic "billion laughs": nine levels of ten aliases each.
    pub(crate) fn billion_laughs() -> String {
        let mut y = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut prev = "a";
        for n in names {
            let refs = vec![format!("*{prev}"); 9].join(",");
            y.push_str(&format!("{n}: &{n} [{refs}]\n"));
            prev = n;
        }
        y
    }

    #[test]
    fn hostile_manifests_are_bounded() {
        let started = std::time::Instant::now();
        let reason = |f: ManifestFile| parse_documents(&f).expect_err("refused").reason();
        assert_eq!(
            reason(doc("bomb.yaml", &billion_laughs())),
            Reason::InvalidManifest
        );
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(reason(doc("deep.yaml", &deep)), Reason::InvalidManifest);
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        assert_eq!(
            reason(doc("deep-block.yaml", &block)),
            Reason::InvalidManifest
        );
        assert_eq!(reason(doc("deep.json", &deep)), Reason::InvalidManifest);
        let deep_json = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            reason(doc("deep100.json", &deep_json)),
            Reason::InvalidManifest
        );
        assert_eq!(
            reason(doc("nul.yaml", "kind: A\0\n")),
            Reason::InvalidManifest
        );
        assert_eq!(
            reason(ManifestFile {
                path: "latin1.yaml".into(),
                data: b"kind: \xe9t\xe9\n".to_vec()
            }),
            Reason::InvalidManifest
        );
        let storm = "---\nkind: A\n".repeat(YAML_MAX_DOCUMENTS + 1);
        assert_eq!(reason(doc("storm.yaml", &storm)), Reason::InvalidManifest);
        // Ordinary anchors and moderate nesting still work.
        let ok = "base: &b {app: web}\nlabels: *b\nx: [[[[1]]]]\n";
        assert_eq!(parse_documents(&doc("ok.yaml", ok)).expect("ok").len(), 1);
        assert!(started.elapsed() < Duration::from_secs(20), "bounded work");
    }

    /// A commit whose tree holds `entries` written as raw objects (names git would refuse).
    fn raw_tree_commit(dir: &Path, entries: &[(&str, u32, &[u8])]) -> (String, String) {
        let repo = git2::Repository::init_bare(dir).expect("init");
        let odb = repo.odb().expect("odb");
        let mut raw = Vec::new();
        for (name, mode, content) in entries {
            let blob = odb.write(git2::ObjectType::Blob, content).expect("blob");
            raw.extend_from_slice(format!("{mode:o} {name}\0").as_bytes());
            raw.extend_from_slice(blob.as_bytes());
        }
        let tree = odb.write(git2::ObjectType::Tree, &raw).expect("tree");
        let tree = repo.find_tree(tree).expect("find tree");
        let sig = git2::Signature::now("t", "t@t").expect("sig");
        let id = repo
            .commit(Some("HEAD"), &sig, &sig, "c", &tree, &[])
            .expect("commit");
        (format!("file://{}", dir.display()), id.to_string())
    }

    #[tokio::test]
    async fn crafted_trees_and_big_files_are_refused() {
        let cache_dir = tempfile::tempdir().expect("tmp");
        let cache = GitCache::new(cache_dir.path().to_owned(), vec![], Duration::from_secs(10));
        for name in ["..", ".git", ".GIT", "a\\b"] {
            let src = tempfile::tempdir().expect("tmp");
            let (url, rev) = raw_tree_commit(src.path(), &[(name, 0o100644, b"kind: A\n")]);
            cache.ensure(&url, &rev).await.expect("fetch");
            let err = cache.render(&url, &rev, "", LIMITS).await.expect_err(name);
            assert_eq!(err.reason(), Reason::InvalidManifest, "{name}: {err}");
        }
        // A file over the per-file limit is refused before it is read.
        let src = tempfile::tempdir().expect("tmp");
        let big = vec![b'x'; 4096];
        let (url, rev) = repo_with(src.path(), &[("apps/big.txt", &big)], None);
        cache.ensure(&url, &rev).await.expect("fetch");
        let small = RenderLimits {
            max_file_bytes: 1024,
            ..LIMITS
        };
        let err = cache
            .render(&url, &rev, "apps", small)
            .await
            .expect_err("big");
        assert_eq!(err.reason(), Reason::TooLarge, "{err}");
        // Directories nested deeper than the walk allows.
        let src = tempfile::tempdir().expect("tmp");
        let deep = format!("{}/x.yaml", vec!["d"; MAX_TREE_DEPTH + 2].join("/"));
        let (url, rev) = repo_with(src.path(), &[(&deep, b"kind: A\n")], None);
        cache.ensure(&url, &rev).await.expect("fetch");
        let err = cache
            .render(&url, &rev, "", LIMITS)
            .await
            .expect_err("deep");
        assert_eq!(err.reason(), Reason::InvalidManifest, "{err}");
        // A path through a symbolic link (to a directory outside) does not resolve.
        let src = tempfile::tempdir().expect("tmp");
        let (url, rev) = repo_with(
            src.path(),
            &[("apps/ok.yaml", b"kind: A\n")],
            Some(("apps/up", "../..")),
        );
        cache.ensure(&url, &rev).await.expect("fetch");
        for path in ["apps/up", "apps/up/etc"] {
            let err = cache
                .render(&url, &rev, path, LIMITS)
                .await
                .expect_err(path);
            assert_eq!(err.reason(), Reason::InvalidManifest, "{path}: {err}");
        }
        // The transport rules hold right at the fetch, too.
        let err = cache
            .ensure("ext::sh -c true", &rev)
            .await
            .expect_err("ext");
        assert_eq!(err.reason(), Reason::SourceNotAllowed);
    }

    #[test]
    fn credentials_match_whole_components_over_https_only() {
        let cred = |p: &str| {
            let c = GitCredential {
                url_prefix: p.into(),
                username: None,
                token: Some("t".into()),
                token_file: None,
            };
            (SourceUrl::parse(p).expect("prefix"), c)
        };
        let creds = vec![
            cred("https://git.example/org"),
            cred("https://git.example/org/team"),
        ];
        let pick = |u: &str| credential_for(&creds, u).map(|(_, c)| c.url_prefix.clone());
        assert_eq!(
            pick("https://git.example/org/team/x.git").as_deref(),
            Some("https://git.example/org/team"),
            "the most specific"
        );
        assert_eq!(
            pick("https://git.example/org/x.git").as_deref(),
            Some("https://git.example/org")
        );
        assert_eq!(pick("https://git.example.evil.com/org/x.git"), None);
        assert_eq!(pick("https://git.example/org-evil/x.git"), None);
        assert_eq!(pick("git://git.example/org/x.git"), None);
        assert_eq!(pick("https://git.example:8443/org/x.git"), None);
    }

    #[test]
    fn stale_locks_are_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let repo = dir.path().join("abc/refs/remotes/origin");
        std::fs::create_dir_all(&repo).expect("mkdir");
        std::fs::write(repo.join("main.lock"), "x").expect("write");
        std::fs::write(dir.path().join("abc/index.lock"), "x").expect("write");
        std::fs::write(dir.path().join("abc/HEAD"), "x").expect("write");
        let cache = GitCache::new(dir.path().to_owned(), vec![], Duration::from_secs(1));
        assert_eq!(cache.clear_stale_locks(), 2);
        assert!(dir.path().join("abc/HEAD").exists());
        assert!(!repo.join("main.lock").exists());
    }
}

#[cfg(test)]
mod props {
    //! Property tests of manifest parsing: never a panic on any bytes, bounded documents,
    //! and JSON-shaped values within the depth limit parse back to themselves as YAML.
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            "[a-z]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(data in proptest::collection::vec(any::<u8>(), 0..2000), json in any::<bool>()) {
            let f = ManifestFile { path: if json { "x.json".into() } else { "x.yaml".into() }, data };
            if let Ok(docs) = parse_documents(&f) {
                prop_assert!(docs.len() <= YAML_MAX_DOCUMENTS);
                prop_assert!(docs.iter().all(|d| depth(d) <= YAML_MAX_DEPTH && !d.is_null()));
            }
        }

        #[test]
        fn yaml_like_text_never_panics(text in "([a-z&*:\\[\\]{}, \\n-]|---\\n|&a |\\*a){0,400}") {
            let f = ManifestFile { path: "x.yaml".into(), data: text.into_bytes() };
            let _ = parse_documents(&f);
        }

        #[test]
        fn documents_round_trip(docs in proptest::collection::vec(value(), 1..4)) {
            let text: Vec<String> = docs.iter().map(|d| serde_json::to_string(d).expect("json")).collect();
            let f = ManifestFile { path: "x.yaml".into(), data: text.join("\n---\n").into_bytes() };
            let parsed = parse_documents(&f).expect("parses");
            let want: Vec<&serde_json::Value> = docs.iter().filter(|d| !d.is_null()).collect();
            prop_assert_eq!(parsed.iter().collect::<Vec<_>>(), want);
        }

        #[test]
        fn source_urls_never_panic_and_covering_is_segmentwise(url in "[a-z+:/@.%#?\\\\0-9\\[\\]-]{0,80}") {
            if let Ok(u) = SourceUrl::parse(&url) {
                prop_assert!(u.covers(&u));
                prop_assert!(u.segments.iter().all(|s| !s.is_empty() && s != "." && s != ".."));
                prop_assert!(crate::decide::TRANSPORTS.contains(&u.scheme.as_str()));
            }
        }
    }
}
