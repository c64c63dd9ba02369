//! `roost git-serve`: a read-only Git server for a fleet, speaking the `git://` protocol
//! (upload-pack, protocol v0 with `multi_ack_detailed`) in one process.
//!
//! When a rollout goes out, thousands of stores fetch the same revision from the same
//! starting point within seconds. `git daemon` forks `git-upload-pack` and `git
//! pack-objects` for every one of them and computes the same pack each time. Here a
//! fetch is a lookup: the pack for a (wants, common haves) pair is built once with
//! libgit2's pack builder, kept in memory, and written to every store that asks for the
//! same thing. Git objects are immutable, so a cached pack never goes stale; the cache is
//! bounded by bytes. Concurrent fetches of one pack wait for the one build.
//!
//! gitoxide has the protocol's client side and pkt-line codec, but no upload-pack server,
//! so the server side is written here (pkt-line framing and negotiation, about what
//! `git upload-pack` does for a client that sends no shallow or filter requests).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Errors of the Git server, each with a reason code (what a client is told in `ERR`).
#[derive(Debug, thiserror::Error)]
pub enum GitServeError {
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The request names no repository served here.
    #[error("no such repository: {0}")]
    NoRepository(String),
    /// The client wants an object this repository does not have.
    #[error("not our ref: {0}")]
    NotOurRef(String),
    /// The client was too slow.
    #[error("client timed out")]
    Timeout,
    /// Reading the repository or building the pack failed.
    #[error("repository: {0}")]
    Repository(String),
    /// The connection failed.
    #[error("io")]
    Io(#[from] std::io::Error),
}

impl GitServeError {
    /// A stable reason code for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            GitServeError::Protocol(_) => "protocol",
            GitServeError::NoRepository(_) => "no_repository",
            GitServeError::NotOurRef(_) => "not_our_ref",
            GitServeError::Timeout => "timeout",
            GitServeError::Repository(_) => "repository",
            GitServeError::Io(_) => "io",
        }
    }
}

impl From<git2::Error> for GitServeError {
    fn from(e: git2::Error) -> Self {
        GitServeError::Repository(e.message().to_owned())
    }
}

/// Largest pkt-line (the protocol's own limit).
const MAX_PKT: usize = 65520;
/// Most `want` and `have` lines one fetch may send.
const MAX_LINES: usize = 100_000;
/// How long a client may take between two lines.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one fetch may take in all (a client trickling lines cannot hold a connection).
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Server settings.
#[derive(Debug, Clone)]
pub struct GitServeConfig {
    /// Every bare repository directly under this directory is served as `/NAME`.
    pub base: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Bytes of packs kept in memory.
    pub cache_bytes: usize,
}

/// Counters, for the benchmark and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GitServeStats {
    /// Fetches answered with a pack.
    pub fetches: u64,
    /// Packs built (the rest came from the cache).
    pub packs_built: u64,
}

type PackKey = (PathBuf, Vec<git2::Oid>, Vec<git2::Oid>);
type PackCell = Arc<OnceCell<Result<Arc<Vec<u8>>, String>>>;

#[derive(Default)]
struct PackCache {
    cells: HashMap<PackKey, PackCell>,
    /// Keys with a finished pack, oldest first, and their sizes.
    order: VecDeque<(PackKey, usize)>,
    bytes: usize,
}

struct Shared {
    base: PathBuf,
    cache_limit: usize,
    cache: Mutex<PackCache>,
    stats: Mutex<GitServeStats>,
}

/// A running server; stops when dropped or cancelled.
pub struct GitServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl GitServer {
    /// Binds and starts serving on a thread of its own, with its own tokio runtime and
    /// blocking pool: in a process that also runs agents (`roost sim`, `roost up`), their
    /// blocking fetches would otherwise hold every blocking thread while they wait for this
    /// server, which then could not build the pack they wait for.
    pub fn start(config: GitServeConfig) -> std::io::Result<GitServer> {
        let std_listener = std::net::TcpListener::bind(config.listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared {
            base: config.base,
            cache_limit: config.cache_bytes,
            cache: Mutex::default(),
            stats: Mutex::default(),
        });
        let cancel = CancellationToken::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(8)
            .thread_name("git-serve-blocking")
            .build()?;
        let (s, c) = (shared.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("git-serve".into())
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => accept_loop(listener, s, c).await,
                        Err(e) => warn!(error = %e, "git server listener"),
                    }
                });
            })?;
        info!(%addr, base = %shared.base.display(), "git server listening");
        Ok(GitServer {
            addr,
            shared,
            cancel,
        })
    }

    /// URL of a repository under the base directory.
    pub fn url(&self, name: &str) -> String {
        format!("git://{}/{name}", self.addr)
    }

    /// Counters so far.
    pub fn stats(&self) -> GitServeStats {
        *lock(&self.shared.stats)
    }

    /// Stops accepting; running fetches finish.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "git server accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let res = tokio::time::timeout(FETCH_TIMEOUT, serve(sock, &shared))
                .await
                .unwrap_or(Err(GitServeError::Timeout));
            if let Err(e) = res {
                debug!(%peer, reason = e.reason(), error = %e, "git fetch ended");
            }
        });
    }
}

/// One pkt-line: `Some(payload)`, or `None` for a flush packet.
async fn read_pkt<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, GitServeError> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(READ_TIMEOUT, r.read_exact(&mut len)).await {
        Err(_) => return Err(GitServeError::Timeout),
        Ok(res) => res?,
    };
    let text = std::str::from_utf8(&len).map_err(|_| bad("pkt-line length is not hex"))?;
    let n = usize::from_str_radix(text, 16).map_err(|_| bad("pkt-line length is not hex"))?;
    match n {
        0 => Ok(None),
        1..=3 => Err(bad("pkt-line length below 4")),
        n if n > MAX_PKT => Err(bad("pkt-line longer than 65520")),
        n => {
            let mut buf = vec![0u8; n - 4];
            match tokio::time::timeout(READ_TIMEOUT, r.read_exact(&mut buf)).await {
                Err(_) => return Err(GitServeError::Timeout),
                Ok(res) => res?,
            };
            Ok(Some(buf))
        }
    }
}

fn bad(why: &str) -> GitServeError {
    GitServeError::Protocol(why.to_owned())
}

fn pkt(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(format!("{:04x}", line.len() + 4).as_bytes());
    out.extend_from_slice(line.as_bytes());
}

const FLUSH: &[u8] = b"0000";

/// The repository a `git-upload-pack /NAME` request names: a directory directly under
/// `base`, by a name without separators or dots in front.
fn resolve(base: &Path, path: &str) -> Result<PathBuf, GitServeError> {
    let name = path.trim_start_matches('/');
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(GitServeError::NoRepository(path.to_owned()));
    }
    let dir = base.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(GitServeError::NoRepository(path.to_owned()))
    }
}

/// The ref advertisement (HEAD first, annotated tags with their peeled line).
fn advertise(repo: &git2::Repository) -> Result<Vec<u8>, GitServeError> {
    let mut refs: Vec<(String, git2::Oid)> = Vec::new();
    let mut head_target = None;
    if let Ok(head) = repo.find_reference("HEAD") {
        head_target = head.symbolic_target().ok().flatten().map(str::to_owned);
        if let Ok(oid) = head
            .resolve()
            .and_then(|r| r.target().ok_or_else(no_target))
        {
            refs.push(("HEAD".into(), oid));
        }
    }
    let mut rest = Vec::new();
    for r in repo.references()? {
        let r = r?;
        let (Ok(name), Ok(r)) = (r.name().map(str::to_owned), r.resolve()) else {
            continue;
        };
        let Some(oid) = r.target() else { continue };
        rest.push((name, oid));
    }
    rest.sort();
    let mut out = Vec::new();
    let mut caps = "multi_ack_detailed no-progress agent=roost-git-serve".to_owned();
    if let Some(t) = &head_target {
        caps = format!("{caps} symref=HEAD:{t}");
    }
    let mut first = true;
    let mut line = |out: &mut Vec<u8>, oid: git2::Oid, name: &str| {
        if first {
            first = false;
            pkt(out, &format!("{oid} {name}\0{caps}\n"));
        } else {
            pkt(out, &format!("{oid} {name}\n"));
        }
    };
    for (name, oid) in &refs {
        line(&mut out, *oid, name);
    }
    for (name, oid) in &rest {
        line(&mut out, *oid, name);
        if name.starts_with("refs/tags/") {
            if let Ok(tag) = repo.find_tag(*oid) {
                line(&mut out, tag.target_id(), &format!("{name}^{{}}"));
            }
        }
    }
    if refs.is_empty() && rest.is_empty() {
        line(&mut out, git2::Oid::ZERO_SHA1, "capabilities^{}");
    }
    out.extend_from_slice(FLUSH);
    Ok(out)
}

fn no_target() -> git2::Error {
    git2::Error::from_str("ref without a target")
}

fn parse_oid(line: &str, prefix: &str) -> Option<git2::Oid> {
    let rest = line.strip_prefix(prefix)?;
    let hex = rest.get(..40)?;
    git2::Oid::from_str(hex).ok()
}

async fn serve(sock: TcpStream, shared: &Shared) -> Result<(), GitServeError> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    // "git-upload-pack /NAME\0host=...\0[\0version=N\0]"
    let request = read_pkt(&mut rd)
        .await?
        .ok_or_else(|| bad("flush instead of a request"))?;
    let request = String::from_utf8_lossy(&request).into_owned();
    let command = request.split('\0').next().unwrap_or_default();
    let Some(path) = command.strip_prefix("git-upload-pack ") else {
        let mut out = Vec::new();
        pkt(
            &mut out,
            "ERR this server only serves fetches (git-upload-pack)\n",
        );
        wr.write_all(&out).await?;
        return Err(bad("not an upload-pack request"));
    };
    let dir = match resolve(&shared.base, path.trim()) {
        Ok(d) => d,
        Err(e) => {
            let mut out = Vec::new();
            pkt(&mut out, &format!("ERR {e}\n"));
            wr.write_all(&out).await?;
            return Err(e);
        }
    };
    // One open of the repository serves the advertisement, the want check and the haves
    // (object lookups in its index: cheap, so they run on this server's own thread).
    let d = dir.clone();
    let (repo, adv) = tokio::task::spawn_blocking(move || {
        let repo = git2::Repository::open(&d)?;
        let adv = advertise(&repo)?;
        Ok::<_, GitServeError>((repo, adv))
    })
    .await
    .map_err(|e| GitServeError::Repository(e.to_string()))??;
    wr.write_all(&adv).await?;

    // Wants, up to a flush. A client that is up to date sends only the flush.
    let mut wants = Vec::new();
    loop {
        match read_pkt(&mut rd).await {
            Ok(Some(line)) => {
                let line = String::from_utf8_lossy(&line);
                if let Some(oid) = parse_oid(&line, "want ") {
                    wants.push(oid);
                } else if line.starts_with("shallow ") || line.starts_with("deepen") {
                    return Err(bad("shallow fetches are not offered"));
                } else {
                    return Err(bad("expected want"));
                }
                if wants.len() > MAX_LINES {
                    return Err(bad("too many wants"));
                }
            }
            Ok(None) => break,
            // A client that only listed the refs (ls-remote) hangs up here.
            Err(GitServeError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
    if wants.is_empty() {
        return Ok(());
    }
    // Every want must be an object of this repository.
    let missing = {
        let odb = repo.odb()?;
        wants.iter().copied().find(|o| !odb.exists(*o))
    };
    if let Some(oid) = missing {
        let mut out = Vec::new();
        pkt(&mut out, &format!("ERR upload-pack: not our ref {oid}\n"));
        wr.write_all(&out).await?;
        return Err(GitServeError::NotOurRef(oid.to_string()));
    }

    // Haves, in batches ended by a flush, until "done" (multi_ack_detailed: each common
    // have is acknowledged at once, each flush answered with NAK).
    let mut common: Vec<git2::Oid> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut lines = 0usize;
    loop {
        let line = read_pkt(&mut rd).await?;
        lines += 1;
        if lines > MAX_LINES {
            return Err(bad("too many haves"));
        }
        let mut out = Vec::new();
        match line {
            None => pkt(&mut out, "NAK\n"),
            Some(l) => {
                let l = String::from_utf8_lossy(&l);
                if let Some(oid) = parse_oid(&l, "have ") {
                    let is_commit = repo
                        .find_object(oid, None)
                        .ok()
                        .and_then(|o| o.peel_to_commit().ok())
                        .map(|c| c.id());
                    if let Some(c) = is_commit {
                        if seen.insert(c) {
                            common.push(c);
                        }
                        pkt(&mut out, &format!("ACK {oid} common\n"));
                    }
                } else if l.trim_end() == "done" {
                    match common.last() {
                        Some(c) => pkt(&mut out, &format!("ACK {c}\n")),
                        None => pkt(&mut out, "NAK\n"),
                    }
                    wr.write_all(&out).await?;
                    break;
                } else {
                    return Err(bad("expected have or done"));
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
    }
    drop(repo);

    wants.sort();
    wants.dedup();
    common.sort();
    let pack = cached_pack(shared, (dir, wants, common)).await?;
    wr.write_all(&pack).await?;
    wr.shutdown().await?;
    lock(&shared.stats).fetches += 1;
    Ok(())
}

async fn cached_pack(shared: &Shared, key: PackKey) -> Result<Arc<Vec<u8>>, GitServeError> {
    let cell = lock(&shared.cache)
        .cells
        .entry(key.clone())
        .or_default()
        .clone();
    let mut built = false;
    let res = cell
        .get_or_init(|| {
            built = true;
            let k = key.clone();
            async move {
                tokio::task::spawn_blocking(move || build_pack(&k.0, &k.1, &k.2))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map(Arc::new)
            }
        })
        .await
        .clone();
    if built {
        let mut c = lock(&shared.cache);
        match &res {
            Ok(pack) => {
                lock(&shared.stats).packs_built += 1;
                c.bytes += pack.len();
                c.order.push_back((key, pack.len()));
                while c.bytes > shared.cache_limit && c.order.len() > 1 {
                    if let Some((old, n)) = c.order.pop_front() {
                        c.cells.remove(&old);
                        c.bytes -= n;
                    }
                }
            }
            // A failed build is not cached: the next fetch tries again.
            Err(_) => {
                c.cells.remove(&key);
            }
        }
    }
    res.map_err(GitServeError::Repository)
}

/// The pack of everything reachable from `wants` and not from `common`.
fn build_pack(
    dir: &Path,
    wants: &[git2::Oid],
    common: &[git2::Oid],
) -> Result<Vec<u8>, GitServeError> {
    let repo = git2::Repository::open(dir)?;
    let mut walk = repo.revwalk()?;
    let mut pb = repo.packbuilder()?;
    for w in wants {
        let obj = repo.find_object(*w, None)?;
        // An annotated tag goes in itself; the walk takes its commit.
        if obj.kind() == Some(git2::ObjectType::Tag) {
            pb.insert_object(*w, None)?;
        }
        match obj.peel_to_commit() {
            Ok(c) => walk.push(c.id())?,
            // A tag of a tree or blob: the object and what it holds.
            Err(_) => {
                let target = obj.peel(git2::ObjectType::Any)?;
                match target.kind() {
                    Some(git2::ObjectType::Tree) => pb.insert_tree(target.id())?,
                    _ => pb.insert_object(target.id(), None)?,
                }
            }
        }
    }
    for c in common {
        walk.hide(*c)?;
    }
    pb.insert_walk(&mut walk)?;
    let mut buf = git2::Buf::new();
    pb.write_buf(&mut buf)?;
    Ok(buf.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_only_names_directly_under_base() {
        let base = tempfile::tempdir().expect("test setup");
        std::fs::create_dir(base.path().join("fleet.git")).expect("test setup");
        assert!(resolve(base.path(), "/fleet.git").is_ok());
        for p in [
            "/../etc",
            "/.git",
            "/a/b",
            "/",
            "/fleet.git/../x",
            "/missing.git",
        ] {
            assert!(
                matches!(resolve(base.path(), p), Err(GitServeError::NoRepository(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn parse_oid_needs_forty_hex_digits() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            parse_oid(&format!("want {hex} ofs-delta\n"), "want ")
                .expect("test setup")
                .to_string(),
            hex
        );
        assert!(parse_oid("want 0123", "want ").is_none());
        assert!(parse_oid(&format!("have {hex}"), "want ").is_none());
    }
}

#[cfg(test)]
mod fetch_tests {
    use super::*;
    use std::collections::BTreeMap;

    fn commit(repo: &git2::Repository, name: &str, body: &str) -> String {
        let mut files = BTreeMap::new();
        files.insert(name.to_owned(), body.to_owned());
        crate::git::commit_files(repo, &files, body).expect("test setup")
    }

    fn server(base: &Path) -> GitServer {
        GitServer::start(GitServeConfig {
            base: base.to_owned(),
            listen: ([127, 0, 0, 1], 0).into(),
            cache_bytes: 1 << 20,
        })
        .expect("test setup")
    }

    fn fetch(dir: &Path, url: &str) -> Result<(), git2::Error> {
        let repo = match git2::Repository::open_bare(dir) {
            Ok(r) => r,
            Err(_) => git2::Repository::init_bare(dir)?,
        };
        let mut remote = repo.remote_anonymous(url)?;
        remote.fetch(
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            None,
            None,
        )
    }

    /// Fetches on a blocking thread, as the agent does.
    async fn fetch_blocking(dir: &Path, url: &str) -> Result<(), git2::Error> {
        let (d, u) = (dir.to_owned(), url.to_owned());
        tokio::task::spawn_blocking(move || fetch(&d, &u))
            .await
            .expect("fetch thread")
    }

    /// A temporary base directory with one repository, `fleet.git`, of one commit.
    fn fleet_repo() -> (tempfile::TempDir, PathBuf, git2::Repository, String) {
        let tmp = tempfile::tempdir().expect("test setup");
        let base = tmp.path().join("repos");
        let src = git2::Repository::init(base.join("fleet.git")).expect("test setup");
        let first = commit(&src, "a.yaml", "one");
        (tmp, base, src, first)
    }

    fn has(dir: &Path, rev: &str) -> bool {
        let repo = git2::Repository::open_bare(dir).expect("test setup");
        let found = repo
            .find_commit(git2::Oid::from_str(rev).expect("test setup"))
            .is_ok();
        found
    }

    /// libgit2 (what agents use) clones, then fetches only what is new; many clients of
    /// one revision share one pack build.
    #[tokio::test]
    async fn libgit2_clones_and_fetches_incrementally_from_one_cached_pack() {
        let (tmp, base, src, first) = fleet_repo();
        let s = server(&base);
        let url = s.url("fleet.git");
        let clients: Vec<PathBuf> = (0..5).map(|i| tmp.path().join(format!("c{i}"))).collect();
        for c in &clients {
            fetch_blocking(c, &url).await.expect("clone");
            assert!(has(c, &first));
        }
        assert_eq!(
            s.stats(),
            GitServeStats {
                fetches: 5,
                packs_built: 1
            }
        );

        // An annotated tag and a second commit: the clients already have the first.
        let second = commit(&src, "a.yaml", "two");
        let sig = git2::Signature::now("t", "t@example.com").expect("test setup");
        let obj = src.revparse_single(&second).expect("test setup");
        src.tag("v2", &obj, &sig, "two", false).expect("test setup");
        for c in &clients {
            fetch_blocking(c, &url).await.expect("fetch");
            assert!(has(c, &second));
            let repo = git2::Repository::open_bare(c).expect("test setup");
            assert!(repo.find_reference("refs/tags/v2").is_ok());
        }
        let st = s.stats();
        assert_eq!(st.fetches, 10);
        assert_eq!(st.packs_built, 2, "one incremental pack for every client");
        // Up to date: no pack at all.
        fetch_blocking(&clients[0], &url).await.expect("fetch");
        assert_eq!(s.stats().fetches, 10);
    }

    /// The git command line, an independent client, clones and fetches too.
    #[tokio::test]
    async fn git_cli_clones_and_fetches() {
        let (tmp, base, src, first) = fleet_repo();
        let s = server(&base);
        let url = s.url("fleet.git");
        let clone = tmp.path().join("clone");
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(args)
                .output()
                .expect("git is installed");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let c = clone.to_str().expect("test setup").to_owned();
        let u = url.clone();
        tokio::task::spawn_blocking(move || git(&["clone", "-q", &u, &c]))
            .await
            .expect("test setup");
        let second = commit(&src, "b.yaml", "two");
        let c = clone.to_str().expect("test setup").to_owned();
        let head = tokio::task::spawn_blocking(move || {
            git(&["-C", &c, "pull", "-q", "--ff-only"]);
            git(&["-C", &c, "rev-parse", "HEAD"])
        })
        .await
        .expect("test setup");
        assert_eq!(head, second);
        assert_ne!(first, second);
        assert_eq!(
            std::fs::read_to_string(clone.join("b.yaml")).expect("test setup"),
            "two"
        );
    }

    /// Unknown repositories, paths out of the base, pushes and unknown objects are refused.
    #[tokio::test]
    async fn refuses_what_it_does_not_serve() {
        let (tmp, base, _src, _) = fleet_repo();
        std::fs::create_dir_all(tmp.path().join("secret.git")).expect("test setup");
        let s = server(&base);
        for name in ["missing.git", "../secret.git"] {
            let e = fetch_blocking(&tmp.path().join("x"), &s.url(name)).await;
            assert!(e.is_err(), "{name}");
        }
        // A push is told why.
        let mut sock = TcpStream::connect(s.addr).await.expect("test setup");
        let mut req = Vec::new();
        pkt(&mut req, "git-receive-pack /fleet.git\0host=x\0");
        sock.write_all(&req).await.expect("test setup");
        let mut rd = BufReader::new(sock);
        let line = read_pkt(&mut rd)
            .await
            .expect("test setup")
            .expect("test setup");
        assert!(String::from_utf8_lossy(&line).starts_with("ERR "));
        // A want of an object the repository does not have.
        let mut sock = TcpStream::connect(s.addr).await.expect("test setup");
        let mut req = Vec::new();
        pkt(&mut req, "git-upload-pack /fleet.git\0host=x\0");
        sock.write_all(&req).await.expect("test setup");
        let (rd, mut wr) = sock.into_split();
        let mut rd = BufReader::new(rd);
        while read_pkt(&mut rd).await.expect("test setup").is_some() {}
        let mut req = Vec::new();
        pkt(&mut req, &format!("want {}\n", "ab".repeat(20)));
        req.extend_from_slice(FLUSH);
        wr.write_all(&req).await.expect("test setup");
        let line = read_pkt(&mut rd)
            .await
            .expect("test setup")
            .expect("test setup");
        assert!(String::from_utf8_lossy(&line).contains("not our ref"));
    }
}
