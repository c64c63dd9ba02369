//! The files target: a deployment's revision is written to `ROOT/DEPLOYMENT/REVISION/` and
//! switched in atomically by renaming a `current` symlink over the old one, so a reader of
//! `ROOT/DEPLOYMENT/current` sees either the old or the new revision, never a mix.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use roost_schemas::Policy;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{ApplyReport, DriftReport, Health, TargetError};
use crate::git::{digest_files, Rendered};

/// The files target.
#[derive(Debug)]
pub struct FilesTarget {
    root: PathBuf,
    hook: Option<Vec<String>>,
    /// Result of the last hook run per deployment (None = ok).
    hook_failures: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

fn io(ctx: &str, p: &Path, e: std::io::Error) -> TargetError {
    TargetError::Apply(format!("{ctx} {}: {e}", p.display()))
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

impl FilesTarget {
    /// A target writing under `root`, running `hook` after each switch.
    pub fn new(root: PathBuf, hook: Option<Vec<String>>) -> FilesTarget {
        FilesTarget {
            root,
            hook,
            hook_failures: Default::default(),
        }
    }

    fn dep_dir(&self, deployment: &str) -> PathBuf {
        self.root.join(deployment)
    }

    /// The live directory of a deployment (`ROOT/DEPLOYMENT/current`).
    pub fn current(&self, deployment: &str) -> PathBuf {
        self.dep_dir(deployment).join("current")
    }

    pub(crate) fn validate(
        &self,
        _deployment: &str,
        rendered: &Rendered,
    ) -> Result<(), TargetError> {
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
        Ok(())
    }

    fn write_revision(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<PathBuf, TargetError> {
        let dep = self.dep_dir(deployment);
        std::fs::create_dir_all(&dep).map_err(|e| io("create", &dep, e))?;
        let final_dir = dep.join(&rendered.revision);
        let tmp = dep.join(format!(".tmp-{}-{}", rendered.revision, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for f in &rendered.files {
            let p = tmp.join(&f.path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
            }
            let mut file = std::fs::File::create(&p).map_err(|e| io("write", &p, e))?;
            std::io::Write::write_all(&mut file, &f.data).map_err(|e| io("write", &p, e))?;
            file.sync_all().map_err(|e| io("sync", &p, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io("create", &tmp, e))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| io("replace", &final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| io("rename", &tmp, e))?;
        sync_dir(&dep).map_err(|e| io("sync", &dep, e))?;
        Ok(final_dir)
    }

    fn switch(&self, deployment: &str, revision: &str) -> Result<(), TargetError> {
        let dep = self.dep_dir(deployment);
        let link_tmp = dep.join(".current.tmp");
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(revision, &link_tmp).map_err(|e| io("symlink", &link_tmp, e))?;
        let cur = self.current(deployment);
        std::fs::rename(&link_tmp, &cur).map_err(|e| io("switch", &cur, e))?;
        sync_dir(&dep).map_err(|e| io("sync", &dep, e))?;
        Ok(())
    }

    async fn run_hook(&self, deployment: &str, revision: &str) -> Result<(), TargetError> {
        let Some(argv) = &self.hook else {
            return Ok(());
        };
        let Some((prog, args)) = argv.split_first() else {
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
            .map_err(|_| TargetError::Hook("hook did not finish within 300 s".into()))?
            .map_err(|e| TargetError::Hook(format!("cannot run {prog}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(TargetError::Hook(format!(
                "{prog} exited with {}: {}",
                out.status,
                stderr.trim().chars().take(500).collect::<String>()
            )))
        }
    }

    pub(crate) async fn apply(
        &self,
        deployment: &str,
        rendered: &Rendered,
        _policy: &Policy,
    ) -> Result<ApplyReport, TargetError> {
        self.validate(deployment, rendered)?;
        let before: Vec<(String, Vec<u8>)> =
            read_tree(&self.current(deployment)).unwrap_or_default();
        self.write_revision(deployment, rendered)?;
        self.switch(deployment, &rendered.revision)?;
        let changed: Vec<String> = rendered
            .files
            .iter()
            .filter(|f| !before.iter().any(|(p, d)| p == &f.path && d == &f.data))
            .map(|f| f.path.clone())
            .collect();
        let hook = self.run_hook(deployment, &rendered.revision).await;
        if let Ok(mut m) = self.hook_failures.lock() {
            match &hook {
                Ok(()) => m.remove(deployment),
                Err(e) => m.insert(deployment.to_owned(), e.to_string()),
            };
        }
        if let Err(error) = &hook {
            warn!(%deployment, %error, "hook failed");
        }
        Ok(ApplyReport {
            changed,
            inventory: rendered.files.iter().map(|f| f.path.clone()).collect(),
        })
    }

    pub(crate) async fn prune(
        &self,
        deployment: &str,
        rendered: &Rendered,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        let dep = self.dep_dir(deployment);
        let entries = match std::fs::read_dir(&dep) {
            Ok(e) => e,
            Err(_) => return Ok(Vec::new()),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == rendered.revision || name == "current" {
                continue;
            }
            let p = e.path();
            let res = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(|e| TargetError::Prune(format!("{}: {e}", p.display())))?;
        }
        Ok(previous
            .iter()
            .filter(|p| !rendered.files.iter().any(|f| &f.path == *p))
            .cloned()
            .collect())
    }

    pub(crate) async fn health(
        &self,
        deployment: &str,
        _rendered: &Rendered,
    ) -> Result<Health, TargetError> {
        let failure = self
            .hook_failures
            .lock()
            .ok()
            .and_then(|m| m.get(deployment).cloned());
        Ok(match failure {
            None => Health {
                ready: true,
                not_ready: Vec::new(),
            },
            Some(f) => Health {
                ready: false,
                not_ready: vec![f],
            },
        })
    }

    pub(crate) async fn drift(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Option<DriftReport>, TargetError> {
        let cur = self.current(deployment);
        let mut items = Vec::new();
        match std::fs::read_link(&cur) {
            Ok(t) if t == Path::new(&rendered.revision) => {}
            Ok(t) => items.push(format!(
                "current -> {} (want {})",
                t.display(),
                rendered.revision
            )),
            Err(_) => items.push("current: missing".into()),
        }
        let live = read_tree(&cur).unwrap_or_default();
        let want = digest_files(
            rendered
                .files
                .iter()
                .map(|f| (f.path.as_str(), f.data.as_slice())),
        );
        let have = digest_files(live.iter().map(|(p, d)| (p.as_str(), d.as_slice())));
        if want != have {
            for f in &rendered.files {
                match live.iter().find(|(p, _)| p == &f.path) {
                    None => items.push(format!("{}: missing", f.path)),
                    Some((_, d)) if d != &f.data => items.push(format!("{}: modified", f.path)),
                    Some(_) => {}
                }
            }
            for (p, _) in &live {
                if !rendered.files.iter().any(|f| &f.path == p) {
                    items.push(format!("{p}: unexpected"));
                }
            }
        }
        debug!(%deployment, drift = !items.is_empty(), "drift check");
        Ok(if items.is_empty() {
            None
        } else {
            items.dedup();
            Some(DriftReport { items })
        })
    }

    pub(crate) async fn remove(
        &self,
        deployment: &str,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        let dep = self.dep_dir(deployment);
        if dep.exists() {
            std::fs::remove_dir_all(&dep)
                .map_err(|e| TargetError::Prune(format!("{}: {e}", dep.display())))?;
            if let Some(parent) = dep.parent() {
                let _ = sync_dir(parent);
            }
        }
        Ok(previous.to_vec())
    }

    pub(crate) fn watch(&self, deployment: &str) -> Option<mpsc::Receiver<()>> {
        use notify::Watcher as _;
        let dep = self.dep_dir(deployment);
        std::fs::create_dir_all(&dep).ok()?;
        let (tx, rx) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
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
