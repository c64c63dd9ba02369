//! The files target: a deployment's revision is written to `ROOT/DEPLOYMENT/REVISION/` and
//! switched in atomically by renaming a `current` symlink over the old one, so a reader of
//! `ROOT/DEPLOYMENT/current` sees either the old or the new revision, never a mix. The hook's
//! result is kept next to it (`.roost-hook.json`), so a failed hook is still reported after
//! a restart. All file-system work runs on blocking threads.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use roost_schemas::{Policy, Reason};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{ApplyReport, DriftReport, Health, InventoryEntry, ObjectRef, TargetError};
use crate::git::{ManifestFile, Rendered};

/// File name of the persisted hook result in a deployment's directory.
const HOOK_STATE: &str = ".roost-hook.json";

/// The files target.
#[derive(Debug)]
pub struct FilesTarget {
    root: PathBuf,
    hook: Option<Vec<String>>,
}

/// A revision ready to be written.
#[derive(Debug, Clone)]
pub struct FilesPlan {
    /// Deployment.
    pub deployment: String,
    /// Commit.
    pub revision: String,
    /// Files, sorted by path.
    pub files: Vec<ManifestFile>,
    /// The rollout's policy.
    pub policy: Policy,
}

/// The hook's last result, persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HookState {
    revision: String,
    /// None while running (a crash mid-hook leaves it so).
    ok: Option<bool>,
    #[serde(default)]
    message: String,
}

fn io<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> TargetError + 'a {
    move |source| TargetError::Io {
        what,
        path: p.to_owned(),
        source,
    }
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

/// Reads every regular file under `dir`, sorted by relative path.
fn read_tree(dir: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn rec(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let ft = e.file_type()?;
            let p = e.path();
            if ft.is_dir() {
                rec(base, &p, out)?;
            } else {
                let rel = p
                    .strip_prefix(base)
                    .map(|r| r.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                let data = if ft.is_symlink() {
                    format!("symlink:{}", std::fs::read_link(&p)?.display()).into_bytes()
                } else {
                    std::fs::read(&p)?
                };
                out.push((rel, data));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    rec(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Whether `f` has the same bytes at the same path in `tree` (from [`read_tree`]: sorted by
/// path).
fn unchanged_in(tree: &[(String, Vec<u8>)], f: &ManifestFile) -> bool {
    tree.binary_search_by(|(path, _)| path.as_str().cmp(&f.path))
        .is_ok_and(|i| tree[i].1 == f.data)
}

fn digest_bytes(d: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    hex::encode(Sha256::digest(d))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f).await?
}

impl FilesTarget {
    /// A target writing under `root`, running `hook` after each switch.
    pub fn new(root: PathBuf, hook: Option<Vec<String>>) -> FilesTarget {
        FilesTarget { root, hook }
    }

    fn dep_dir(&self, deployment: &str) -> PathBuf {
        self.root.join(deployment)
    }

    /// The live directory of a deployment (`ROOT/DEPLOYMENT/current`).
    pub fn current(&self, deployment: &str) -> PathBuf {
        self.dep_dir(deployment).join("current")
    }

    /// Checks file names; the plan owns the files.
    pub async fn build(
        &self,
        deployment: &str,
        rendered: Rendered,
        policy: &Policy,
    ) -> Result<FilesPlan, TargetError> {
        for f in &rendered.files {
            if f.path
                .split('/')
                .any(|s| s == ".." || s.is_empty() || s.starts_with(".roost"))
            {
                return Err(TargetError::InvalidManifest(format!(
                    "{}: unusable file name",
                    f.path
                )));
            }
        }
        Ok(FilesPlan {
            deployment: deployment.to_owned(),
            revision: rendered.revision,
            files: rendered.files,
            policy: policy.clone(),
        })
    }

    /// One entry per file, with its content digest.
    pub fn entries(&self, plan: &FilesPlan) -> Vec<InventoryEntry> {
        plan.files
            .iter()
            .map(|f| InventoryEntry {
                object: ObjectRef::File {
                    path: f.path.clone(),
                },
                digest: digest_bytes(&f.data),
            })
            .collect()
    }

    /// Writes the revision's directory. A file whose bytes are those of the same path in the
    /// live revision (`before`, read from `cur`) is hard-linked from it instead of written:
    /// no new inode, no data to write or fsync (it was fsynced when first written), so a
    /// rollout that changes one file of many costs one file. Only regular files are linked
    /// (`before` never descends through a symlinked directory, and the live entry is checked
    /// again right before); anything else, or a failed link, is written as usual.
    fn write_revision(
        dep: &Path,
        plan: &FilesPlan,
        cur: &Path,
        before: &[(String, Vec<u8>)],
    ) -> Result<(), TargetError> {
        std::fs::create_dir_all(dep).map_err(io("create", dep))?;
        let final_dir = dep.join(&plan.revision);
        let tmp = dep.join(format!(".tmp-{}-{}", plan.revision, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        // Write a chunk of files first, then fsync each: the first fsync commits the file
        // system's journal with all of them (ext4 and xfs flush the data of every file in that
        // commit), so the others cost little, where write+fsync per file paid one commit per
        // file. Chunks bound the descriptors held open. Every file is still on disk before
        // the directory is renamed into place.
        for chunk in plan.files.chunks(64) {
            let mut written = Vec::with_capacity(chunk.len());
            for f in chunk {
                let p = tmp.join(&f.path);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
                }
                if unchanged_in(before, f) {
                    let live = cur.join(&f.path);
                    let regular = std::fs::symlink_metadata(&live).is_ok_and(|m| m.is_file());
                    if regular && std::fs::hard_link(&live, &p).is_ok() {
                        continue;
                    }
                }
                let mut file = std::fs::File::create(&p).map_err(io("write", &p))?;
                std::io::Write::write_all(&mut file, &f.data).map_err(io("write", &p))?;
                written.push((p, file));
            }
            for (p, file) in &written {
                file.sync_all().map_err(io("sync", p))?;
            }
        }
        std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io("replace", &final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io("rename", &tmp))?;
        sync_dir(dep).map_err(io("sync", dep))?;
        Ok(())
    }

    fn switch(dep: &Path, revision: &str) -> Result<(), TargetError> {
        let link_tmp = dep.join(".current.tmp");
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(revision, &link_tmp).map_err(io("symlink", &link_tmp))?;
        let cur = dep.join("current");
        std::fs::rename(&link_tmp, &cur).map_err(io("switch", &cur))?;
        sync_dir(dep).map_err(io("sync", dep))?;
        Ok(())
    }

    fn write_hook_state(dep: &Path, st: &HookState) -> Result<(), TargetError> {
        let p = dep.join(HOOK_STATE);
        let tmp = dep.join(".roost-hook.json.tmp");
        let body = serde_json::to_vec(st).unwrap_or_default();
        let mut f = std::fs::File::create(&tmp).map_err(io("write", &tmp))?;
        std::io::Write::write_all(&mut f, &body).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &p).map_err(io("rename", &tmp))?;
        sync_dir(dep).map_err(io("sync", dep))
    }

    fn read_hook_state(dep: &Path) -> Option<HookState> {
        let body = std::fs::read(dep.join(HOOK_STATE)).ok()?;
        serde_json::from_slice(&body).ok()
    }

    async fn run_hook(&self, deployment: &str, revision: &str) -> Result<(), String> {
        let Some((prog, args)) = self.hook.as_deref().and_then(|h| h.split_first()) else {
            return Ok(());
        };
        let out = tokio::process::Command::new(prog)
            .args(args)
            .env("ROOST_DEPLOYMENT", deployment)
            .env("ROOST_REVISION", revision)
            .env("ROOST_DIR", self.current(deployment))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(300), out)
            .await
            .map_err(|_| "hook did not finish within 300 s".to_owned())?
            .map_err(|e| format!("cannot run {prog}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(format!(
                "{prog} exited with {}: {}",
                out.status,
                stderr.trim().chars().take(500).collect::<String>()
            ))
        }
    }

    /// Writes the revision, switches `current` to it and runs the hook (its result is
    /// persisted and read by `health`).
    pub async fn apply(
        &self,
        plan: &FilesPlan,
        _inventory: &[InventoryEntry],
    ) -> Result<ApplyReport, TargetError> {
        let dep = self.dep_dir(&plan.deployment);
        let cur = self.current(&plan.deployment);
        let owned = plan.clone();
        let hooked = self.hook.is_some();
        let (changed, unchanged) = blocking(move || {
            let before = read_tree(&cur).unwrap_or_default();
            Self::write_revision(&dep, &owned, &cur, &before)?;
            if hooked {
                // Persisted before the switch: a crash from here on reads "hook not finished".
                Self::write_hook_state(
                    &dep,
                    &HookState {
                        revision: owned.revision.clone(),
                        ok: None,
                        message: String::new(),
                    },
                )?;
            }
            Self::switch(&dep, &owned.revision)?;
            let mut changed = Vec::new();
            let mut unchanged = 0;
            for f in &owned.files {
                if unchanged_in(&before, f) {
                    unchanged += 1;
                } else {
                    changed.push(ObjectRef::File {
                        path: f.path.clone(),
                    });
                }
            }
            Ok((changed, unchanged))
        })
        .await?;
        if self.hook.is_some() {
            let res = self.run_hook(&plan.deployment, &plan.revision).await;
            if let Err(error) = &res {
                warn!(deployment = %plan.deployment, %error, "hook failed");
            }
            let st = HookState {
                revision: plan.revision.clone(),
                ok: Some(res.is_ok()),
                message: res.err().unwrap_or_default(),
            };
            let dep = self.dep_dir(&plan.deployment);
            blocking(move || Self::write_hook_state(&dep, &st)).await?;
        }
        Ok(ApplyReport { changed, unchanged })
    }

    /// Removes revision directories other than the current one; the stale files went with
    /// the switch, so they are reported as pruned.
    pub async fn prune(
        &self,
        deployment: &str,
        stale: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let dep = self.dep_dir(deployment);
        let stale = stale.to_vec();
        blocking(move || {
            let current = std::fs::read_link(dep.join("current")).ok();
            let Ok(entries) = std::fs::read_dir(&dep) else {
                return Ok(stale);
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "current"
                    || name == HOOK_STATE
                    || current.as_deref() == Some(Path::new(&name))
                {
                    continue;
                }
                let p = e.path();
                let res = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                res.map_err(io("prune", &p))?;
            }
            Ok(stale)
        })
        .await
    }

    /// Ready unless the hook failed (or never finished) for this revision.
    pub async fn health(&self, plan: &FilesPlan) -> Result<Health, TargetError> {
        if self.hook.is_none() {
            return Ok(Health::ready());
        }
        let dep = self.dep_dir(&plan.deployment);
        let st = blocking(move || Ok(Self::read_hook_state(&dep))).await?;
        Ok(match st {
            Some(HookState {
                revision,
                ok: Some(true),
                ..
            }) if revision == plan.revision => Health::ready(),
            Some(HookState {
                revision,
                ok: Some(false),
                message,
            }) if revision == plan.revision => Health {
                ready: false,
                not_ready: vec![format!("hook failed: {message}")],
                reason: Some(Reason::HookFailed),
            },
            _ => Health {
                ready: false,
                not_ready: vec!["hook has not finished for this revision".into()],
                reason: None,
            },
        })
    }

    /// Differences between `current` and the plan's files.
    pub async fn drift(&self, plan: &FilesPlan) -> Result<Option<DriftReport>, TargetError> {
        let cur = self.current(&plan.deployment);
        let files: Vec<(String, Vec<u8>)> = plan
            .files
            .iter()
            .map(|f| (f.path.clone(), f.data.clone()))
            .collect();
        let revision = plan.revision.clone();
        let items = blocking(move || {
            let mut items = Vec::new();
            match std::fs::read_link(&cur) {
                Ok(t) if t == Path::new(&revision) => {}
                Ok(t) => items.push(format!("current -> {} (want {revision})", t.display())),
                Err(_) => items.push("current: missing".into()),
            }
            let live = read_tree(&cur).unwrap_or_default();
            for (path, data) in &files {
                match live.iter().find(|(p, _)| p == path) {
                    None => items.push(format!("{path}: missing")),
                    Some((_, d)) if d != data => items.push(format!("{path}: modified")),
                    Some(_) => {}
                }
            }
            for (p, _) in &live {
                if !files.iter().any(|(f, _)| f == p) {
                    items.push(format!("{p}: unexpected"));
                }
            }
            items.dedup();
            Ok(items)
        })
        .await?;
        debug!(deployment = %plan.deployment, drift = !items.is_empty(), "drift check");
        Ok((!items.is_empty()).then_some(DriftReport { items }))
    }

    /// The files under `current`.
    pub async fn recover(
        &self,
        deployment: &str,
        _plan: Option<&FilesPlan>,
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let cur = self.current(deployment);
        blocking(move || {
            Ok(read_tree(&cur)
                .unwrap_or_default()
                .into_iter()
                .map(|(path, _)| ObjectRef::File { path })
                .collect())
        })
        .await
    }

    /// Removes the deployment's directory (every revision and `current`).
    pub async fn remove(
        &self,
        deployment: &str,
        inventory: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let dep = self.dep_dir(deployment);
        let inventory = inventory.to_vec();
        blocking(move || {
            if dep.exists() {
                std::fs::remove_dir_all(&dep).map_err(io("remove", &dep))?;
                if let Some(parent) = dep.parent() {
                    let _ = sync_dir(parent);
                }
            }
            Ok(inventory)
        })
        .await
    }

    /// File-system changes under the deployment's directory.
    pub fn watch(&self, plan: &FilesPlan) -> Option<mpsc::Receiver<()>> {
        use notify::Watcher as _;
        let dep = self.dep_dir(&plan.deployment);
        std::fs::create_dir_all(&dep).ok()?;
        let (tx, rx) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // An error may mean lost events: check. Opens and reads are not changes, and the
            // drift check itself opens every file: counting them made an idle agent re-check
            // its files four times a second, woken by its own reads.
            if res.as_ref().map_or(true, |e| is_change(&e.kind)) {
                let _ = tx.try_send(());
            }
        })
        .ok()?;
        watcher.watch(&dep, notify::RecursiveMode::Recursive).ok()?;
        // The watcher lives as long as the receiver is polled: keep it alive in a task that
        // ends when the receiver side is dropped (the sender fails then).
        let (keep_tx, rx_out) = mpsc::channel(1);
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut rx = rx;
            while rx.recv().await.is_some() {
                if keep_tx.send(()).await.is_err() {
                    break;
                }
            }
        });
        Some(rx_out)
    }
}

/// Whether a file-system event can mean drift: a create, modify or remove (or one the
/// platform does not classify), never an access (open, read, close).
fn is_change(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn plan(revision: &str, files: &[(&str, &str)]) -> FilesPlan {
        FilesPlan {
            deployment: "web".into(),
            revision: revision.into(),
            files: files
                .iter()
                .map(|(p, d)| ManifestFile {
                    path: (*p).into(),
                    data: d.as_bytes().to_vec(),
                })
                .collect(),
            policy: Policy::default(),
        }
    }

    fn inode(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).expect("stat").ino()
    }

    #[tokio::test]
    async fn unchanged_files_are_linked_from_the_live_revision_and_drifted_ones_rewritten() {
        let root = tempfile::tempdir().expect("tmp");
        let t = FilesTarget::new(root.path().to_owned(), None);
        let cur = t.current("web");
        let r1 = plan("r1", &[("a.yaml", "a: 1\n"), ("sub/b.yaml", "b: 1\n")]);
        t.apply(&r1, &[]).await.expect("r1");
        let (a1, b1) = (inode(&cur.join("a.yaml")), inode(&cur.join("sub/b.yaml")));
        // r2 changes b only: a is the same file (no new inode, nothing written), b is new.
        let r2 = plan("r2", &[("a.yaml", "a: 1\n"), ("sub/b.yaml", "b: 2\n")]);
        let report = t.apply(&r2, &[]).await.expect("r2");
        assert_eq!(report.unchanged, 1);
        t.prune("web", &[]).await.expect("prune");
        assert_eq!(inode(&cur.join("a.yaml")), a1, "linked");
        assert_ne!(inode(&cur.join("sub/b.yaml")), b1, "written");
        assert_eq!(std::fs::read(cur.join("sub/b.yaml")).expect("b"), b"b: 2\n");
        // Someone edits a in place (drift): the next apply writes the desired bytes to a new
        // file instead of linking the edited one.
        std::fs::write(cur.join("a.yaml"), "a: edited\n").expect("edit");
        let r3 = plan("r3", &[("a.yaml", "a: 1\n"), ("sub/b.yaml", "b: 2\n")]);
        t.apply(&r3, &[]).await.expect("r3");
        assert_ne!(inode(&cur.join("a.yaml")), a1);
        assert_eq!(std::fs::read(cur.join("a.yaml")).expect("a"), b"a: 1\n");
        // A live symlink is never linked, even when its rendering matches the file's bytes.
        let outside = root.path().join("outside.txt");
        std::fs::write(&outside, "secret").expect("outside");
        let live = std::fs::read_link(&cur).expect("current");
        let link = t.dep_dir("web").join(live).join("c.txt");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let text = format!("symlink:{}", outside.display());
        let r4 = plan("r4", &[("a.yaml", "a: 1\n"), ("c.txt", &text)]);
        t.apply(&r4, &[]).await.expect("r4");
        let c = std::fs::symlink_metadata(cur.join("c.txt")).expect("c");
        assert!(
            c.is_file(),
            "a regular file, not a link to {}",
            outside.display()
        );
        assert_eq!(
            std::fs::read(cur.join("c.txt")).expect("c"),
            text.as_bytes()
        );
    }

    #[test]
    fn only_changes_wake_the_drift_check() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind,
        };
        use notify::EventKind as K;
        let table = [
            (K::Access(AccessKind::Open(AccessMode::Any)), false),
            (K::Access(AccessKind::Read), false),
            (K::Access(AccessKind::Close(AccessMode::Read)), false),
            (K::Access(AccessKind::Close(AccessMode::Write)), false),
            (K::Create(CreateKind::File), true),
            (K::Modify(ModifyKind::Data(DataChange::Content)), true),
            (
                K::Modify(ModifyKind::Metadata(MetadataKind::Permissions)),
                true,
            ),
            (K::Remove(RemoveKind::File), true),
            (K::Any, true),
            (K::Other, true),
        ];
        for (kind, want) in table {
            assert_eq!(super::is_change(&kind), want, "{kind:?}");
        }
    }
}
