//! `roost secret seal` and `roost secret reseal`: Secret manifests encrypted with age to the
//! stores that may read them, written into the deployment's overlay paths
//! (`PATH/_stores/<store>/FILE.age`, `PATH/_groups/<group>/FILE.age`). Every file is also
//! sealed to the fleet's sealing key (made by `roost ca init`), which only `reseal` uses: to
//! open each file and seal it again to the stores the inventory names now.

use std::path::{Path, PathBuf};

use roost_runtime::sealed::{self, Identity, Recipient, SealedError};
use roost_schemas::selector::Selector;

use crate::fleet_repo::{FleetRepo, RepoError};
use crate::pki;

/// The fleet's sealing identity in the CA directory (mode 0600; `reseal` needs it).
pub const SEALING_IDENTITY: &str = "sealing-identity.txt";
/// Its recipient (`seal` needs only this).
pub const SEALING_RECIPIENT: &str = "sealing-recipient.txt";

/// Sealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Bad arguments, or an inventory that cannot say whom to seal to.
    #[error("{0}")]
    Usage(String),
    /// The inventory.
    #[error("inventory")]
    Inventory(#[from] RepoError),
    /// age.
    #[error("{what}")]
    Sealed {
        /// What was being done.
        what: String,
        /// Why (boxed: age's errors are large).
        #[source]
        source: Box<SealedError>,
    },
    /// The CA directory's sealing key files.
    #[error("sealing key")]
    Key(#[from] pki::PkiError),
    /// Reading or writing a file.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sealed_err(what: impl Into<String>) -> impl FnOnce(SealedError) -> SealError {
    let what = what.into();
    move |source| SealError::Sealed {
        what,
        source: Box::new(source),
    }
}

/// Makes the fleet's sealing key in `dir` (`roost ca init`): the identity (mode 0600) and
/// its recipient. Returns the recipient.
pub fn init_sealing_key(dir: &Path) -> Result<String, SealError> {
    let id = Identity::generate();
    pki::write_private(&dir.join(SEALING_IDENTITY), id.file_text().as_bytes())?;
    pki::write_public(
        &dir.join(SEALING_RECIPIENT),
        format!("{}\n", id.recipient()).as_bytes(),
    )?;
    Ok(id.recipient())
}

fn sealing_recipient(ca_dir: &Path) -> Result<Recipient, SealError> {
    let p = ca_dir.join(SEALING_RECIPIENT);
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    Recipient::parse(text.trim()).map_err(sealed_err(p.display().to_string()))
}

/// Whom to seal a file to.
#[derive(Debug, Clone)]
pub enum SealTo {
    /// One store: `PATH/_stores/<store>/FILE.age`.
    Store(String),
    /// The members of a group `roost.yaml` defines: `PATH/_groups/<group>/FILE.age`.
    Group(String),
    /// Every store the selector matches now, one file each under `_stores/<store>/`
    /// (a store that matches later gets nothing: seal to a group for that).
    Selector(Selector),
}

/// What to seal.
#[derive(Debug, Clone)]
pub struct SealSpec {
    /// The fleet repository checkout (`roost.yaml`, `stores/`).
    pub fleet: PathBuf,
    /// The checkout of the repository holding the deployment's path (often the same).
    pub apps: PathBuf,
    /// The deployment's directory in `apps` (from `roost.yaml` when not given).
    pub path: Option<String>,
    /// The deployment (its path from `roost.yaml`).
    pub deployment: Option<String>,
    /// Whom to seal to.
    pub to: SealTo,
    /// The plaintext Secret manifest.
    pub file: PathBuf,
    /// The CA directory holding the sealing key.
    pub ca_dir: PathBuf,
}

/// One sealed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFile {
    /// Its path in the apps checkout.
    pub path: String,
    /// The stores that can open it.
    pub stores: Vec<String>,
}

/// The recipients of `stores` from the inventory; an error names the stores without one.
fn recipients_of(inv: &FleetRepo, stores: &[String]) -> Result<Vec<Recipient>, SealError> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for s in stores {
        match inv
            .stores
            .get(s)
            .and_then(|(_, e)| e.age_recipient.as_deref())
        {
            Some(r) => out.push(Recipient::parse(r).map_err(sealed_err(s.clone()))?),
            None => missing.push(s.clone()),
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(SealError::Usage(format!(
            "no age_recipient in the inventory for {} (enroll with `roost store enroll`, or add it)",
            missing.join(", ")
        )))
    }
}

/// Checks that `plaintext` is YAML manifests (each a mapping with a `kind`), so the agent will
/// not refuse it after opening it. The error never quotes the content.
fn check_manifest(file: &Path, plaintext: &[u8]) -> Result<(), SealError> {
    let bad = || {
        SealError::Usage(format!(
            "{}: not YAML manifests with a kind (the content is not shown)",
            file.display()
        ))
    };
    let text = std::str::from_utf8(plaintext).map_err(|_| bad())?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|_| bad())?;
    let ok = !docs.is_empty()
        && docs
            .iter()
            .all(|d| d.get("kind").and_then(|k| k.as_str()).is_some());
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Writes `data` to `path` by a rename (never half a file), mode 0644: the content is sealed.
fn write_file(path: &Path, data: &[u8]) -> Result<(), SealError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })
}

fn safe_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

/// Seals `spec.file` into the overlay path(s); returns what it wrote.
pub fn seal(spec: &SealSpec) -> Result<Vec<SealedFile>, SealError> {
    let inv = FleetRepo::from_dir(&spec.fleet)?;
    let path = match (&spec.path, &spec.deployment) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => inv
            .deployments
            .get(d)
            .map(|s| s.path.clone())
            .ok_or_else(|| {
                SealError::Usage(format!(
                    "{d} has no source in {}/roost.yaml: give --path",
                    spec.fleet.display()
                ))
            })?,
        (None, None) => {
            return Err(SealError::Usage(
                "give --deployment (its path from roost.yaml) or --path".into(),
            ))
        }
    };
    let path = path.trim_matches('/').to_owned();
    if !path.is_empty() && path.split('/').any(|s| !safe_segment(s)) {
        return Err(SealError::Usage(format!(
            "{path:?} is not a path inside the repository"
        )));
    }
    let name = spec
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| safe_segment(n))
        .ok_or_else(|| SealError::Usage(format!("{}: not a file", spec.file.display())))?;
    let plaintext = std::fs::read(&spec.file).map_err(io(&spec.file))?;
    check_manifest(&spec.file, &plaintext)?;
    let sealer = sealing_recipient(&spec.ca_dir)?;
    let join = |kind: &str, who: &str| {
        let mut p = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        p.push_str(&format!("{kind}/{who}/{name}.age"));
        p
    };
    // (file, stores) pairs to write.
    let mut plan: Vec<(String, Vec<String>)> = Vec::new();
    match &spec.to {
        SealTo::Store(s) => {
            if !inv.stores.contains_key(s) {
                return Err(SealError::Usage(format!(
                    "{s} is not in the inventory (stores/*.yaml)"
                )));
            }
            plan.push((join("_stores", s), vec![s.clone()]));
        }
        SealTo::Group(g) => {
            let members = inv.members(g).ok_or_else(|| {
                SealError::Usage(format!(
                    "roost.yaml does not define the members of group {g} (groups: {{{g}: {{stores: [...]}}}} or a selector)"
                ))
            })?;
            if members.is_empty() {
                return Err(SealError::Usage(format!("group {g} has no members")));
            }
            plan.push((join("_groups", g), members));
        }
        SealTo::Selector(sel) => {
            let stores = inv.selected(sel);
            if stores.is_empty() {
                return Err(SealError::Usage(format!("no store matches {sel}")));
            }
            for s in stores {
                plan.push((join("_stores", &s), vec![s]));
            }
        }
    }
    let mut out = Vec::new();
    for (file, stores) in plan {
        let mut to = recipients_of(&inv, &stores)?;
        to.push(sealer.clone());
        let sealed = sealed::encrypt(&to, &plaintext).map_err(sealed_err(file.clone()))?;
        write_file(&spec.apps.join(&file), &sealed)?;
        out.push(SealedFile { path: file, stores });
    }
    Ok(out)
}

/// What `reseal` did with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resealed {
    /// Sealed again to these stores.
    Sealed(SealedFile),
    /// Left as it is, and why (the file needs the operator).
    Left {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
}

/// Every sealed file under `dir` with its overlay: (path relative to `dir`, `_stores` or
/// `_groups`, the store or group).
fn sealed_files(dir: &Path) -> Result<Vec<(String, &'static str, String)>, SealError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let entry = entry.map_err(io(&d))?;
            let p = entry.path();
            let ft = entry.file_type().map_err(io(&p))?;
            if ft.is_dir() && entry.file_name() != ".git" {
                stack.push(p);
            } else if ft.is_file() && p.extension().is_some_and(|e| e == "age") {
                let rel = p
                    .strip_prefix(dir)
                    .map(|r| r.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let parts: Vec<&str> = rel.split('/').collect();
                // The innermost overlay directory above the file names whom it is for.
                let overlay = parts[..parts.len().saturating_sub(1)]
                    .windows(2)
                    .rev()
                    .find_map(|w| match w[0] {
                        "_stores" => Some(("_stores", w[1].to_owned())),
                        "_groups" => Some(("_groups", w[1].to_owned())),
                        _ => None,
                    });
                if let Some((kind, who)) = overlay {
                    out.push((rel, kind, who));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Seals every `.age` file under the overlays of `apps` again to the stores the inventory of
/// `fleet` names now (a store joined or left a group, a key was rotated), opening each with
/// the fleet's sealing identity in `ca_dir`. Files it cannot reseal are left and reported.
pub fn reseal(fleet: &Path, apps: &Path, ca_dir: &Path) -> Result<Vec<Resealed>, SealError> {
    let inv = FleetRepo::from_dir(fleet)?;
    let id_path = ca_dir.join(SEALING_IDENTITY);
    let sealer = Identity::read(&id_path).map_err(sealed_err(id_path.display().to_string()))?;
    let sealer_recipient =
        Recipient::parse(&sealer.recipient()).map_err(sealed_err("the sealing key"))?;
    let mut out = Vec::new();
    for (path, kind, who) in sealed_files(apps)? {
        let left = |why: String| Resealed::Left {
            path: path.clone(),
            why,
        };
        let stores = if kind == "_stores" {
            if !inv.stores.contains_key(&who) {
                out.push(left(format!(
                    "{who} is not in the inventory (retired?): remove the file"
                )));
                continue;
            }
            vec![who.clone()]
        } else {
            match inv.members(&who) {
                Some(m) if !m.is_empty() => m,
                Some(_) => {
                    out.push(left(format!("group {who} has no members now")));
                    continue;
                }
                None => {
                    out.push(left(format!(
                        "roost.yaml does not define the members of group {who}"
                    )));
                    continue;
                }
            }
        };
        let mut to = match recipients_of(&inv, &stores) {
            Ok(r) => r,
            Err(e) => {
                out.push(left(e.to_string()));
                continue;
            }
        };
        to.push(sealer_recipient.clone());
        let full = apps.join(&path);
        let old = std::fs::read(&full).map_err(io(&full))?;
        let plaintext = match sealed::decrypt(&sealer, &old) {
            Ok(p) => p,
            Err(SealedError::NotForThisIdentity) => {
                out.push(left(
                    "not sealed to the fleet's sealing key (made outside roost secret seal): seal it again with roost secret seal".into(),
                ));
                continue;
            }
            Err(e) => return Err(sealed_err(path.clone())(e)),
        };
        let sealed = sealed::encrypt(&to, &plaintext).map_err(sealed_err(path.clone()))?;
        write_file(&full, &sealed)?;
        out.push(Resealed::Sealed(SealedFile { path, stores }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, region: &str, id: &Identity) -> String {
        format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: {name}\nlabels: {{region: {region}}}\nage_recipient: {}\n",
            id.recipient()
        )
    }

    const FLEET: &str = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups:
  us-south: {selector: {region: us-south}}
deployments:
  web:
    source: {url: git://h/apps, ref: main, path: apps/web}
";

    const SECRET: &str =
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n";

    #[test]
    fn seal_group_then_reseal_after_a_store_joins() {
        let dir = tempfile::tempdir().expect("tmp");
        let fleet = dir.path();
        let ca = dir.path().join("ca");
        std::fs::create_dir_all(fleet.join("stores")).expect("dir");
        std::fs::create_dir_all(&ca).expect("dir");
        init_sealing_key(&ca).expect("sealing key");
        std::fs::write(fleet.join("roost.yaml"), FLEET).expect("write");
        let (x, y) = (Identity::generate(), Identity::generate());
        std::fs::write(
            fleet.join("stores/store-x.yaml"),
            entry("store-x", "us-south", &x),
        )
        .expect("write");
        std::fs::write(
            fleet.join("stores/store-y.yaml"),
            entry("store-y", "us-east", &y),
        )
        .expect("write");
        let secret = fleet.join("secret.yaml");
        std::fs::write(&secret, SECRET).expect("write");
        let spec = SealSpec {
            fleet: fleet.into(),
            apps: fleet.into(),
            path: None,
            deployment: Some("web".into()),
            to: SealTo::Group("us-south".into()),
            file: secret.clone(),
            ca_dir: ca.clone(),
        };
        let done = seal(&spec).expect("seal");
        assert_eq!(
            done,
            vec![SealedFile {
                path: "apps/web/_groups/us-south/secret.yaml.age".into(),
                stores: vec!["store-x".into()],
            }]
        );
        let file = fleet.join(&done[0].path);
        let open = |id: &Identity| sealed::decrypt(id, &std::fs::read(&file).expect("read"));
        assert_eq!(open(&x).expect("x opens"), SECRET.as_bytes());
        assert!(matches!(open(&y), Err(SealedError::NotForThisIdentity)));

        // store-y moves to us-south: reseal seals the group file to both.
        std::fs::write(
            fleet.join("stores/store-y.yaml"),
            entry("store-y", "us-south", &y),
        )
        .expect("write");
        // A file for a store no longer in the inventory is left, and said so.
        std::fs::create_dir_all(fleet.join("apps/web/_stores/store-gone")).expect("dir");
        std::fs::write(
            fleet.join("apps/web/_stores/store-gone/old.yaml.age"),
            sealed::encrypt(
                &[Recipient::parse(&x.recipient()).expect("r")],
                b"kind: Secret\n",
            )
            .expect("seal"),
        )
        .expect("write");
        let again = reseal(fleet, fleet, &ca).expect("reseal");
        assert_eq!(again.len(), 2, "{again:?}");
        assert!(again.contains(&Resealed::Sealed(SealedFile {
            path: "apps/web/_groups/us-south/secret.yaml.age".into(),
            stores: vec!["store-x".into(), "store-y".into()],
        })));
        assert!(again
            .iter()
            .any(|r| matches!(r, Resealed::Left { path, .. } if path.contains("store-gone"))));
        assert_eq!(open(&x).expect("x opens"), SECRET.as_bytes());
        assert_eq!(open(&y).expect("y opens"), SECRET.as_bytes());

        // One file per store for a selector.
        let by_sel = seal(&SealSpec {
            to: SealTo::Selector("region=us-south".parse().expect("selector")),
            ..spec.clone()
        })
        .expect("seal");
        assert_eq!(by_sel.len(), 2);
        assert_eq!(by_sel[1].path, "apps/web/_stores/store-y/secret.yaml.age");

        // Not a manifest: refused without quoting it.
        std::fs::write(&secret, "password hunter2").expect("write");
        let e = seal(&spec).expect_err("not a manifest");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
