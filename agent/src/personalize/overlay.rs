//! Overlays: files under `_stores/<store>/` of a deployment's path apply only to that store,
//! files under `_groups/<group>/` only to the group's members; other stores' and groups'
//! directories are dropped. For Kubernetes an overlay object replaces the base object with the
//! same apiVersion, kind, namespace and name; for the files target an overlay file replaces
//! the base file with the same relative path. Precedence: the store's overlay, then its groups
//! in their order, then the base.

use std::collections::HashMap;

use serde_json::Value;

use crate::git::{is_manifest, parse_documents, write_documents, GitError, ManifestFile};

/// The directory of per-store overlays, at the top of a deployment's path.
pub const STORES_DIR: &str = "_stores";
/// The directory of per-group overlays, at the top of a deployment's path.
pub const GROUPS_DIR: &str = "_groups";

/// Where a file applies, highest precedence first: the store's overlay, a group's (by the
/// group's position in the store's list), the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// `_stores/<this store>/`.
    Store,
    /// `_groups/<group>/`, the group's index in the store's groups.
    Group(usize),
    /// Everything else.
    Base,
}

/// A file of the revision that applies to this store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layered {
    /// Its layer.
    pub layer: Layer,
    /// Its path inside the layer (`_stores/s/etc/a.conf` → `etc/a.conf`; a base file's path).
    pub rel: String,
    /// The file, with its path in the revision.
    pub file: ManifestFile,
}

/// Why overlays cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A manifest does not parse.
    #[error("overlay")]
    Parse(#[source] GitError),
    /// A file whose objects were partly replaced cannot be written back.
    #[error("{0}: cannot be written back without its replaced objects")]
    Write(String),
}

/// The files that apply to `store` (member of `groups`, in precedence order), with their
/// layers. Files of other stores' and groups' directories are dropped, and so are files
/// right under `_stores/` or `_groups/` (a README, say): they belong to nobody.
pub fn select(files: Vec<ManifestFile>, store: &str, groups: &[String]) -> Vec<Layered> {
    files
        .into_iter()
        .filter_map(|file| {
            let (layer, rel) = match file.path.split_once('/') {
                Some((STORES_DIR, rest)) => {
                    let (name, rel) = rest.split_once('/')?;
                    (name == store).then_some((Layer::Store, rel.to_owned()))?
                }
                Some((GROUPS_DIR, rest)) => {
                    let (name, rel) = rest.split_once('/')?;
                    let i = groups.iter().position(|g| g == name)?;
                    (Layer::Group(i), rel.to_owned())
                }
                _ => (Layer::Base, file.path.clone()),
            };
            Some(Layered { layer, rel, file })
        })
        .collect()
}

/// Files by relative path, the highest layer winning (the files target): the result's
/// paths are the relative paths.
pub fn merge_files(files: Vec<Layered>) -> Vec<ManifestFile> {
    let mut best: HashMap<String, Layered> = HashMap::new();
    for f in files {
        match best.get(&f.rel) {
            Some(have) if have.layer <= f.layer => {}
            _ => {
                best.insert(f.rel.clone(), f);
            }
        }
    }
    best.into_values()
        .map(|l| ManifestFile {
            path: l.rel,
            data: l.file.data,
        })
        .collect()
}

/// A Kubernetes object's identity as written: apiVersion, kind, namespace (empty when not
/// given) and name; None for a document without them (the target refuses it later).
fn identity(doc: &Value) -> Option<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    Some((
        s(&doc["apiVersion"])?,
        s(&doc["kind"])?,
        doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        s(&doc["metadata"]["name"])?,
    ))
}

/// Objects by identity, the highest layer winning (the Kubernetes target): every file keeps
/// its path in the revision; a file that loses some of its objects is written back without
/// them (or dropped when none is left), the others keep their bytes.
pub fn merge_objects(files: Vec<Layered>) -> Result<Vec<ManifestFile>, OverlayError> {
    if files.iter().all(|f| f.layer == Layer::Base) {
        return Ok(files.into_iter().map(|l| l.file).collect());
    }
    type Id = (String, String, String, String);
    type Docs = Vec<(Option<Id>, Value)>;
    let mut parsed: Vec<(Layered, Option<Docs>)> = Vec::new();
    let mut winner: HashMap<Id, Layer> = HashMap::new();
    for l in files {
        if !is_manifest(&l.file.path) {
            parsed.push((l, None));
            continue;
        }
        let docs: Docs = parse_documents(&l.file)
            .map_err(OverlayError::Parse)?
            .into_iter()
            .map(|d| (identity(&d), d))
            .collect();
        for id in docs.iter().filter_map(|(id, _)| id.clone()) {
            let w = winner.entry(id).or_insert(l.layer);
            *w = (*w).min(l.layer);
        }
        parsed.push((l, Some(docs)));
    }
    let mut out = Vec::new();
    for (l, docs) in parsed {
        let Some(docs) = docs else {
            out.push(l.file);
            continue;
        };
        let n = docs.len();
        let kept: Vec<Value> = docs
            .into_iter()
            .filter(|(id, _)| {
                id.as_ref()
                    .is_none_or(|id| winner.get(id) == Some(&l.layer))
            })
            .map(|(_, d)| d)
            .collect();
        if kept.len() == n {
            out.push(l.file);
        } else if !kept.is_empty() {
            let data = write_documents(&l.file.path, &kept)
                .ok_or_else(|| OverlayError::Write(l.file.path.clone()))?;
            out.push(ManifestFile {
                path: l.file.path,
                data,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, text: &str) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            data: text.as_bytes().to_vec(),
        }
    }

    fn cm(name: &str, ns: Option<&str>, value: &str) -> String {
        let ns = ns
            .map(|n| format!("  namespace: {n}\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n{ns}data:\n  v: {value}\n"
        )
    }

    fn groups() -> Vec<String> {
        vec!["canary".into(), "us-south".into()]
    }

    /// The manifests' documents by path, sorted.
    fn docs(files: &[ManifestFile]) -> Vec<(String, Vec<Value>)> {
        let mut v: Vec<_> = files
            .iter()
            .filter(|f| is_manifest(&f.path))
            .map(|f| (f.path.clone(), parse_documents(f).expect("parses")))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn other_stores_and_groups_are_dropped() {
        let files = vec![
            f("base.yaml", "a: 1\n"),
            f("_stores/store-1/x.yaml", "a: 1\n"),
            f("_stores/store-2/x.yaml", "a: 2\n"),
            f("_stores/README.md", "notes\n"),
            f("_groups/canary/sub/y.yaml", "a: 1\n"),
            f("_groups/us-south/y.yaml", "a: 1\n"),
            f("_groups/eu/y.yaml", "a: 1\n"),
            f("sub/_stores/store-2/deep.yaml", "a: 1\n"),
        ];
        let sel = select(files, "store-1", &groups());
        let got: Vec<(Layer, &str, &str)> = sel
            .iter()
            .map(|l| (l.layer, l.rel.as_str(), l.file.path.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Layer::Base, "base.yaml", "base.yaml"),
                (Layer::Store, "x.yaml", "_stores/store-1/x.yaml"),
                (Layer::Group(0), "sub/y.yaml", "_groups/canary/sub/y.yaml"),
                (Layer::Group(1), "y.yaml", "_groups/us-south/y.yaml"),
                // Only the top of the deployment's path holds overlays.
                (
                    Layer::Base,
                    "sub/_stores/store-2/deep.yaml",
                    "sub/_stores/store-2/deep.yaml"
                ),
            ]
        );
    }

    #[test]
    fn files_are_replaced_by_path_store_over_groups_over_base() {
        let files = vec![
            f("etc/a.conf", "base\n"),
            f("etc/b.conf", "base\n"),
            f("etc/c.conf", "base\n"),
            f("_groups/us-south/etc/a.conf", "us-south\n"),
            f("_groups/us-south/etc/b.conf", "us-south\n"),
            f("_groups/canary/etc/a.conf", "canary\n"),
            f("_stores/store-1/etc/a.conf", "store\n"),
            f("_stores/store-1/secret.env.age", "ciphertext\n"),
        ];
        let mut out = merge_files(select(files, "store-1", &groups()));
        out.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|f| (f.path.as_str(), std::str::from_utf8(&f.data).expect("utf8")))
            .collect();
        assert_eq!(
            got,
            vec![
                ("etc/a.conf", "store\n"),
                ("etc/b.conf", "us-south\n"),
                ("etc/c.conf", "base\n"),
                ("secret.env.age", "ciphertext\n"),
            ]
        );
        // A store in neither group sees the base only.
        let mut out = merge_files(select(
            vec![
                f("etc/a.conf", "base\n"),
                f("_groups/us-south/etc/a.conf", "x\n"),
            ],
            "store-9",
            &[],
        ));
        out.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(out, vec![f("etc/a.conf", "base\n")]);
    }

    #[test]
    fn objects_are_replaced_by_identity_with_precedence() {
        let base = format!(
            "{}---\n{}---\n{}",
            cm("menu", Some("shop"), "base"),
            cm("hours", Some("shop"), "base"),
            cm("menu", Some("other"), "base"),
        );
        let files = vec![
            f("all.yaml", &base),
            f("notes.txt", "kept\n"),
            f(
                "_groups/us-south/menu.yaml",
                &cm("menu", Some("shop"), "us-south"),
            ),
            f(
                "_groups/canary/menu.yaml",
                &cm("menu", Some("shop"), "canary"),
            ),
            f(
                "_groups/canary/hours.yaml",
                &cm("hours", Some("shop"), "canary"),
            ),
            f(
                "_stores/store-1/menu.yaml",
                &cm("menu", Some("shop"), "store"),
            ),
            f("_stores/store-1/extra.yaml", &cm("extra", None, "store")),
            f(
                "_stores/store-2/menu.yaml",
                &cm("menu", Some("shop"), "store-2"),
            ),
        ];
        let out = merge_objects(select(files, "store-1", &groups())).expect("merges");
        let all = docs(&out);
        let values: Vec<(String, String, String)> = all
            .iter()
            .flat_map(|(p, ds)| {
                ds.iter().map(move |d| {
                    (
                        p.clone(),
                        format!(
                            "{}/{}",
                            d["metadata"]["namespace"].as_str().unwrap_or(""),
                            d["metadata"]["name"].as_str().unwrap_or("")
                        ),
                        d["data"]["v"].as_str().unwrap_or("").to_owned(),
                    )
                })
            })
            .collect();
        let want = |p: &str, id: &str, v: &str| (p.to_owned(), id.to_owned(), v.to_owned());
        assert_eq!(
            values,
            vec![
                // The base keeps what no overlay replaces (the same name in another namespace
                // is another object).
                want("_groups/canary/hours.yaml", "shop/hours", "canary"),
                want("_stores/store-1/extra.yaml", "/extra", "store"),
                want("_stores/store-1/menu.yaml", "shop/menu", "store"),
                want("all.yaml", "other/menu", "base"),
            ]
        );
        assert!(
            out.iter().any(|f| f.path == "notes.txt"),
            "other files stay"
        );
        // Without overlays every file keeps its bytes.
        let files = vec![f("all.yaml", &base)];
        let out = merge_objects(select(files.clone(), "store-1", &groups())).expect("merges");
        assert_eq!(out, files);
        // A file that loses all of its objects goes.
        let files = vec![
            f("menu.yaml", &cm("menu", None, "base")),
            f("_stores/store-1/menu.yaml", &cm("menu", None, "store")),
        ];
        let out = merge_objects(select(files, "store-1", &[])).expect("merges");
        assert_eq!(
            out.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            vec!["_stores/store-1/menu.yaml"]
        );
    }

    #[test]
    fn an_overlay_that_does_not_parse_is_refused() {
        let files = vec![
            f("menu.yaml", &cm("menu", None, "base")),
            f("_stores/store-1/menu.yaml", "a: [unclosed\n"),
        ];
        assert!(matches!(
            merge_objects(select(files, "store-1", &[])),
            Err(OverlayError::Parse(_))
        ));
    }
}
