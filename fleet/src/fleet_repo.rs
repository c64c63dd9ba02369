//! What enrollment and sealing read from a fleet repository: the inventory (`stores/*.yaml`,
//! parsed and validated by [`crate::inventory`]) with the file each store is in, and from
//! `roost.yaml` the groups defined centrally (by `stores:` or `selector:`) and the
//! deployments' source URLs and paths. Membership of a group is what the repository says:
//! listed stores and selector matches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use roost_schemas::inventory::StoreEntry;

use crate::inventory::{is_inventory_file, DIR};
use roost_schemas::selector::Selector;
use serde::Deserialize;

/// The fleet file.
pub const FLEET_FILE: &str = "roost.yaml";

/// The fleet repository could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The inventory is refused.
    #[error("inventory")]
    Inventory(#[from] crate::inventory::InventoryError),
    /// `roost.yaml` does not parse, or a group's selector is invalid.
    #[error("{file}: {message}")]
    Invalid {
        /// The file in the repository.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Reading a file of a checkout.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A group as `roost.yaml` defines it centrally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GroupDef {
    /// Stores named explicitly.
    #[serde(default)]
    pub stores: Vec<String>,
    /// Stores whose labels match.
    #[serde(default)]
    pub selector: Option<Selector>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Groups {
    /// The v1.1 list: names only, membership from the stores' own configuration.
    Names(Vec<String>),
    /// The v1.2 map: membership in the fleet repository.
    Defined(BTreeMap<String, Option<GroupDef>>),
}

#[derive(Deserialize)]
struct SourceOnly {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
struct DeploymentOnly {
    #[serde(default)]
    source: Option<SourceOnly>,
}

/// Only what the inventory needs of `roost.yaml` (the rest is the controller's to check).
#[derive(Deserialize)]
struct FleetOnly {
    #[serde(default)]
    groups: Option<Groups>,
    #[serde(default)]
    deployments: BTreeMap<String, DeploymentOnly>,
}

/// A deployment's source as `roost.yaml` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSource {
    /// The repository URL.
    pub url: String,
    /// The directory in it.
    pub path: String,
}

/// The inventory and the parts of `roost.yaml` it is read with.
#[derive(Debug, Clone, Default)]
pub struct FleetRepo {
    /// Every store, by name, with the file it is in.
    pub stores: BTreeMap<String, (String, StoreEntry)>,
    /// Groups defined with members (`stores:`/`selector:`), by name.
    pub groups: BTreeMap<String, GroupDef>,
    /// Groups named without members (v1.1 list form).
    pub named_groups: BTreeSet<String>,
    /// Each deployment's source, by deployment.
    pub deployments: BTreeMap<String, DeploymentSource>,
}

/// The YAML of one inventory file holding `entries`, with a comment line on top.
pub fn store_file_text(comment: &str, entries: &[StoreEntry]) -> Result<String, RepoError> {
    let mut out = format!("# {comment}\n");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(e).map_err(|e| RepoError::Invalid {
            file: DIR.into(),
            message: format!("cannot write YAML: {e}"),
        })?);
    }
    Ok(out)
}

impl FleetRepo {
    /// Reads the inventory from `files`: path → content of `roost.yaml` (if any) and of
    /// the inventory files (others are ignored).
    pub fn from_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<FleetRepo, RepoError> {
        let mut inv = FleetRepo::default();
        let mut all = BTreeMap::new();
        for (path, bytes) in files {
            if path == FLEET_FILE {
                inv.read_fleet_file(bytes)?;
            } else if is_inventory_file(path) {
                all.insert(path.to_owned(), bytes.to_vec());
            }
        }
        // The whole inventory is validated as the controller does (one entry per store);
        // each file alone says where a store is.
        crate::inventory::parse(&all)?;
        for (path, bytes) in all {
            let one = BTreeMap::from([(path.clone(), bytes)]);
            for (name, e) in crate::inventory::parse(&one)?.stores {
                inv.stores.insert(name, (path.clone(), e));
            }
        }
        Ok(inv)
    }

    /// Reads the inventory from a checkout's working tree (`roost secret seal`).
    pub fn from_dir(dir: &Path) -> Result<FleetRepo, RepoError> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| RepoError::Io { path, source }
        };
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let fleet = dir.join(FLEET_FILE);
        if fleet.exists() {
            files.push((
                FLEET_FILE.into(),
                std::fs::read(&fleet).map_err(io(&fleet))?,
            ));
        }
        let stores = dir.join(DIR);
        if stores.is_dir() {
            for entry in std::fs::read_dir(&stores).map_err(io(&stores))? {
                let entry = entry.map_err(io(&stores))?;
                let rel = format!("{DIR}/{}", entry.file_name().to_string_lossy());
                if is_inventory_file(&rel) && entry.path().is_file() {
                    files.push((rel, std::fs::read(entry.path()).map_err(io(&entry.path()))?));
                }
            }
        }
        files.sort();
        FleetRepo::from_files(files.iter().map(|(p, b)| (p.as_str(), b.as_slice())))
    }

    fn read_fleet_file(&mut self, bytes: &[u8]) -> Result<(), RepoError> {
        let invalid = |message: String| RepoError::Invalid {
            file: FLEET_FILE.into(),
            message,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))?;
        let f: FleetOnly =
            serde_saphyr::from_str(text).map_err(|e| invalid(format!("YAML: {e}")))?;
        match f.groups {
            None => {}
            Some(Groups::Names(n)) => self.named_groups.extend(n),
            Some(Groups::Defined(m)) => {
                for (name, def) in m {
                    match def {
                        Some(d) if !d.stores.is_empty() || d.selector.is_some() => {
                            if let Some(s) = &d.selector {
                                s.validate()
                                    .map_err(|e| invalid(format!("groups.{name}.selector: {e}")))?;
                            }
                            self.groups.insert(name, d);
                        }
                        _ => {
                            self.named_groups.insert(name);
                        }
                    }
                }
            }
        }
        for (name, d) in f.deployments {
            if let Some(SourceOnly {
                url: Some(url),
                path,
            }) = d.source
            {
                self.deployments.insert(
                    name,
                    DeploymentSource {
                        url,
                        path: path.unwrap_or_default(),
                    },
                );
            }
        }
        Ok(())
    }

    /// The stores in `group` (sorted), or `None` if `roost.yaml` does not define its members.
    pub fn members(&self, group: &str) -> Option<Vec<String>> {
        let def = self.groups.get(group)?;
        Some(
            self.stores
                .values()
                .filter(|(_, e)| is_member(def, e))
                .map(|(_, e)| e.name.clone())
                .collect(),
        )
    }

    /// The defined groups `entry` is a member of (by name).
    pub fn groups_of(&self, entry: &StoreEntry) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, d)| is_member(d, entry))
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// The stores whose labels `selector` matches (sorted).
    pub fn selected(&self, selector: &Selector) -> Vec<String> {
        self.stores
            .values()
            .filter(|(_, e)| selector.matches(&e.labels))
            .map(|(_, e)| e.name.clone())
            .collect()
    }

    /// The distinct source URLs of the deployments.
    pub fn source_urls(&self) -> Vec<String> {
        let urls: BTreeSet<&str> = self.deployments.values().map(|d| d.url.as_str()).collect();
        urls.into_iter().map(str::to_owned).collect()
    }
}

fn is_member(def: &GroupDef, e: &StoreEntry) -> bool {
    def.stores.contains(&e.name) || def.selector.as_ref().is_some_and(|s| s.matches(&e.labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "apiVersion: roost.dev/v1alpha1
kind: Fleet
groups:
  canary: {stores: [store-0001]}
  us-south: {selector: {region: us-south}}
  new-pos: {selector: {matchExpressions: [{key: pos, operator: In, values: [v7, v8]}]}}
  later:
deployments:
  kitchen-display:
    source: {url: git://h/apps, ref: main, path: apps/kitchen-display}
";

    fn store(name: &str, labels: &[(&str, &str)]) -> String {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: {name}\nlabels: {{{}}}\n",
            labels.join(", ")
        )
    }

    #[test]
    fn groups_by_list_and_selector() {
        let a = store("store-0001", &[("region", "us-east")]);
        let b = format!(
            "{}---\n{}",
            store("store-0002", &[("region", "us-south"), ("pos", "v7")]),
            store("store-0003", &[("region", "us-south")])
        );
        let inv = FleetRepo::from_files([
            ("roost.yaml", FLEET.as_bytes()),
            ("stores/a.yaml", a.as_bytes()),
            ("stores/b.yaml", b.as_bytes()),
            ("stores/sub/ignored.yaml", b"not: [yaml"),
        ])
        .expect("inventory");
        assert_eq!(inv.stores.len(), 3);
        assert_eq!(
            inv.members("us-south"),
            Some(vec!["store-0002".into(), "store-0003".into()])
        );
        assert_eq!(inv.members("canary"), Some(vec!["store-0001".into()]));
        assert_eq!(inv.members("new-pos"), Some(vec!["store-0002".into()]));
        assert_eq!(inv.members("later"), None, "named without members");
        assert!(inv.named_groups.contains("later"));
        assert_eq!(
            inv.groups_of(&inv.stores["store-0002"].1),
            vec!["new-pos".to_owned(), "us-south".to_owned()]
        );
        let sel: Selector = "region=us-south".parse().expect("selector");
        assert_eq!(inv.selected(&sel).len(), 2);
        assert_eq!(inv.source_urls(), vec!["git://h/apps".to_owned()]);
        assert_eq!(
            inv.deployments["kitchen-display"].path,
            "apps/kitchen-display"
        );
    }

    #[test]
    fn duplicates_and_invalid_entries_are_refused() {
        let a = store("store-0001", &[]);
        let e = FleetRepo::from_files([
            ("stores/a.yaml", a.as_bytes()),
            ("stores/b.yaml", a.as_bytes()),
        ])
        .expect_err("duplicate");
        let chain = roost_runtime::error_chain(&e);
        assert!(chain.contains("store-0001"), "{chain}");
        let bad = store("Store_1", &[]);
        assert!(FleetRepo::from_files([("stores/a.yaml", bad.as_bytes())]).is_err());
        let list = "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups: [canary]\n";
        let inv = FleetRepo::from_files([("roost.yaml", list.as_bytes())]).expect("v1.1 list");
        assert_eq!(inv.members("canary"), None);
    }

    #[test]
    fn store_files_round_trip() {
        let e: StoreEntry =
            serde_saphyr::from_str(&store("store-0042", &[("region", "x")])).expect("entry");
        let text = store_file_text("Enrolled by test.", std::slice::from_ref(&e)).expect("text");
        assert!(text.starts_with("# Enrolled by test.\n"));
        let back = crate::inventory::parse(&BTreeMap::from([(
            "stores/x.yaml".to_owned(),
            text.into_bytes(),
        )]))
        .expect("parse");
        assert_eq!(back.stores["store-0042"], e);
    }
}
