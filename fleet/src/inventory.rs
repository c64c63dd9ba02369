//! The store inventory of the fleet repository (`stores/*.yaml`, `kind: Store`): parsed,
//! validated as a whole (JSON Schema, the entry rules, time zones against the time zone
//! database, one entry per store across all files) and turned into each store's profile
//! content. Pure: the controller reads the files from Git and publishes what this returns;
//! an inventory that fails validation is refused whole, so the last good one stays in force.

use std::collections::{BTreeMap, BTreeSet};

use roost_schemas::inventory::StoreEntry;
use roost_schemas::Labels;

/// The directory of the fleet repository that holds the inventory.
pub const DIR: &str = "stores";

/// Largest inventory file.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Largest inventory in all.
pub const MAX_TOTAL_BYTES: usize = 256 << 20;

/// Most stores in one inventory.
pub const MAX_STORES: usize = 100_000;

/// Why an inventory is refused. Names the file (and document) so the commit's author can
/// find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {reason}", doc.map(|d| format!(" (document {d})")).unwrap_or_default())]
pub struct InventoryError {
    /// The file, relative to the repository.
    pub file: String,
    /// The document in it (1-based), when one document is at fault.
    pub doc: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

fn fail(file: &str, doc: Option<usize>, reason: impl Into<String>) -> InventoryError {
    InventoryError {
        file: file.to_owned(),
        doc,
        reason: reason.into(),
    }
}

/// The validated inventory: every store by name, with the file it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Stores by name.
    pub stores: BTreeMap<String, StoreEntry>,
}

/// Whether a repository path belongs to the inventory (`stores/NAME.yaml` or `.yml`,
/// directly under [`DIR`]).
pub fn is_inventory_file(path: &str) -> bool {
    path.strip_prefix(DIR)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|name| {
            !name.contains('/') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
}

/// YAML limits for inventory files: enough for 100,000 stores in one file, not enough for
/// an alias bomb or a nesting attack.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = Some(MAX_FILE_BYTES);
    budget.max_documents = MAX_STORES;
    budget.max_nodes = 20_000_000;
    budget.max_events = 40_000_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_depth = 16;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

fn schema() -> Option<&'static jsonschema::Validator> {
    static SCHEMA: std::sync::OnceLock<Option<jsonschema::Validator>> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let schema: serde_json::Value =
                serde_json::from_str(roost_schemas::json_schema::STORE).ok()?;
            jsonschema::draft202012::options().build(&schema).ok()
        })
        .as_ref()
}

/// Parses and validates the inventory from its files (path → content). Any problem refuses
/// the whole inventory.
pub fn parse(files: &BTreeMap<String, Vec<u8>>) -> Result<Inventory, InventoryError> {
    let total: usize = files.values().map(Vec::len).sum();
    if total > MAX_TOTAL_BYTES {
        return Err(fail(
            DIR,
            None,
            format!("{total} bytes of inventory: at most {MAX_TOTAL_BYTES}"),
        ));
    }
    let validator = schema().ok_or_else(|| fail(DIR, None, "store schema does not compile"))?;
    let mut stores: BTreeMap<String, StoreEntry> = BTreeMap::new();
    let mut from: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut zones: BTreeSet<String> = BTreeSet::new();
    for (file, bytes) in files {
        if bytes.len() > MAX_FILE_BYTES {
            return Err(fail(
                file,
                None,
                format!("{} bytes: at most {MAX_FILE_BYTES}", bytes.len()),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| fail(file, None, "not UTF-8"))?;
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple_with_options(text, yaml_options())
                .map_err(|e| fail(file, None, format!("YAML: {e}")))?;
        for (i, value) in docs.into_iter().enumerate() {
            let doc = Some(i + 1);
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            // The fast check first; the error walk only for a document that fails it.
            if !validator.is_valid(&value) {
                let reason = match validator.iter_errors(&value).next() {
                    Some(e) => {
                        let at = e.instance_path().to_string();
                        let at = if at.is_empty() { at } else { format!("{at}: ") };
                        format!("schema: {at}{e}")
                    }
                    None => "schema: invalid".to_owned(),
                };
                return Err(fail(file, doc, reason));
            }
            let entry: StoreEntry = serde_json::from_value(value)
                .map_err(|e| fail(file, doc, format!("schema: {e}")))?;
            entry
                .validate()
                .map_err(|e| fail(file, doc, format!("{}: {e}", entry.name)))?;
            if let Some(tz) = &entry.timezone {
                if !zones.contains(tz) {
                    jiff::tz::TimeZone::get(tz).map_err(|_| {
                        fail(
                            file,
                            doc,
                            format!("{}: timezone: unknown time zone {tz:?}", entry.name),
                        )
                    })?;
                    zones.insert(tz.clone());
                }
            }
            if let Some((first, d)) = from.get(&entry.name) {
                return Err(fail(
                    file,
                    doc,
                    format!(
                        "store {} is already defined in {first} (document {d})",
                        entry.name
                    ),
                ));
            }
            if stores.len() >= MAX_STORES {
                return Err(fail(file, doc, format!("at most {MAX_STORES} stores")));
            }
            from.insert(entry.name.clone(), (file.clone(), i + 1));
            stores.insert(entry.name.clone(), entry);
        }
    }
    Ok(Inventory { stores })
}

/// What the inventory says about one store, ready to be signed as its profile (without
/// sequence and time, which the publisher adds).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProfileContent {
    /// Labels.
    pub labels: Labels,
    /// Groups in precedence order; `None` when the fleet file does not define members.
    pub groups: Option<Vec<String>>,
    /// Time zone.
    pub timezone: Option<String>,
    /// Vars.
    pub vars: BTreeMap<String, String>,
}

impl ProfileContent {
    /// A digest of the content: equal content, equal digest (the maps are ordered).
    pub fn digest(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }

    /// The signed profile for `store` with `sequence`, issued now.
    pub fn profile(&self, store: &str, sequence: u64) -> roost_schemas::Profile {
        roost_schemas::Profile {
            store: store.to_owned(),
            sequence,
            issued_at: roost_schemas::now_rfc3339(),
            labels: self.labels.clone(),
            groups: self.groups.clone(),
            timezone: self.timezone.clone(),
            vars: self.vars.clone(),
        }
    }
}

/// A profile the controller must publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileChange {
    /// Store.
    pub store: String,
    /// What the profile says: the inventory's, or for a store that left the inventory the
    /// neutral profile (no labels, vars or time zone, and no groups, so the store's own
    /// configuration decides them again, as for a store never in the inventory).
    pub content: ProfileContent,
    /// Whether the store is in the inventory.
    pub in_inventory: bool,
}

/// Which profiles to publish, given what the inventory says now (`wanted`), the profile last
/// published per store (digest, whether in the inventory), and whether the record still
/// holds a store's profile topic (a retired store's was tombstoned: nothing goes back on
/// it). A store whose content is unchanged gets nothing; one that left the inventory gets
/// the neutral profile once. Pure.
pub fn profile_changes(
    wanted: &BTreeMap<String, ProfileContent>,
    published: &BTreeMap<String, crate::db::inventory::PublishedProfile>,
    holds_topic: impl Fn(&str) -> bool,
) -> Vec<ProfileChange> {
    let mut out: Vec<ProfileChange> = wanted
        .iter()
        .filter(|(store, content)| {
            published
                .get(*store)
                .is_none_or(|p| !p.in_inventory || p.digest != content.digest())
        })
        .map(|(store, content)| ProfileChange {
            store: store.clone(),
            content: content.clone(),
            in_inventory: true,
        })
        .collect();
    out.extend(
        published
            .iter()
            .filter(|(store, p)| {
                p.in_inventory && !wanted.contains_key(*store) && holds_topic(store)
            })
            .map(|(store, _)| ProfileChange {
                store: store.clone(),
                content: ProfileContent::default(),
                in_inventory: false,
            }),
    );
    out
}

impl Inventory {
    /// Each store's profile content, given each store's groups in precedence order (from
    /// the fleet file's group definitions; `None` when it defines no members).
    pub fn profiles(
        &self,
        groups_of: impl Fn(&str, &Labels) -> Option<Vec<String>>,
    ) -> BTreeMap<String, ProfileContent> {
        self.stores
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    ProfileContent {
                        labels: e.labels.clone(),
                        groups: groups_of(name, &e.labels),
                        timezone: e.timezone.clone(),
                        vars: e.vars.clone(),
                    },
                )
            })
            .collect()
    }

    /// The labels of a store (empty for a store outside the inventory).
    pub fn labels(&self, store: &str) -> Labels {
        self.stores
            .get(store)
            .map(|e| e.labels.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    const TWO: &str = "apiVersion: roost.dev/v1alpha1
kind: Store
name: store-0001
labels: {region: us-east, format: drive-thru}
timezone: America/New_York
vars: {store_number: \"0001\"}
---
apiVersion: roost.dev/v1alpha1
kind: Store
name: store-0002
labels: {region: us-south}
timezone: America/Chicago
";

    #[test]
    fn parses_several_files_and_documents() {
        let inv = parse(&files(&[
            ("stores/east.yaml", TWO),
            (
                "stores/west.yml",
                "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: store-0003\n---\n",
            ),
        ]))
        .expect("inventory");
        assert_eq!(
            inv.stores.keys().collect::<Vec<_>>(),
            ["store-0001", "store-0002", "store-0003"]
        );
        assert_eq!(inv.stores["store-0001"].vars["store_number"], "0001");
        assert_eq!(inv.labels("store-0002")["region"], "us-south");
        assert!(inv.labels("store-9999").is_empty());
        let profiles =
            inv.profiles(|_, l| Some(l.get("region").map(|r| vec![r.clone()]).unwrap_or_default()));
        assert_eq!(
            profiles["store-0002"].groups.as_deref(),
            Some(&["us-south".to_owned()][..])
        );
        assert_eq!(profiles["store-0003"].groups.as_deref(), Some(&[][..]));
    }

    #[test]
    fn refuses_what_must_publish_nothing() {
        let dup = parse(&files(&[
            ("stores/a.yaml", TWO),
            (
                "stores/b.yaml",
                "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: store-0002\n",
            ),
        ]))
        .expect_err("duplicate");
        assert_eq!(dup.file, "stores/b.yaml");
        assert!(dup
            .reason
            .contains("already defined in stores/a.yaml (document 2)"));

        let cases = [
            ("labels: {region: \"us\\nsouth\"}", "labels"),
            ("labels: {\"bad key\": x}", "labels"),
            ("timezone: Mars/Olympus_Mons", "unknown time zone"),
            ("timezone: America/Chicagoo", "unknown time zone"),
            ("vars: {n: 42}", "schema"),
            ("extra: 1", "schema"),
        ];
        for (line, want) in cases {
            let doc =
                format!("apiVersion: roost.dev/v1alpha1\nkind: Store\nname: store-0009\n{line}\n");
            let e = parse(&files(&[("stores/x.yaml", &doc)])).expect_err(line);
            assert!(e.reason.contains(want), "{line}: {e}");
            assert_eq!(e.doc, Some(1), "{line}");
        }
    }

    #[test]
    fn hostile_yaml_is_refused_without_blowing_up() {
        // A billion-laughs alias bomb.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            bomb.push_str(&format!(
                "{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n",
                n = (b'a' + i) as char,
                p = (b'a' + i - 1) as char
            ));
        }
        let e = parse(&files(&[("stores/bomb.yaml", &bomb)])).expect_err("bomb");
        assert_eq!(e.file, "stores/bomb.yaml");
        // Deep nesting.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(&files(&[("stores/deep.yaml", &deep)])).is_err());
        // 100,000 vars.
        let mut many =
            String::from("apiVersion: roost.dev/v1alpha1\nkind: Store\nname: store-0009\nvars:\n");
        for i in 0..100_000 {
            many.push_str(&format!("  v{i}: x\n"));
        }
        let e = parse(&files(&[("stores/many.yaml", &many)])).expect_err("vars");
        assert!(e.reason.contains("vars") || e.reason.contains("256"), "{e}");
        // Not UTF-8.
        let e = parse(&BTreeMap::from([(
            "stores/bin.yaml".to_owned(),
            vec![0xff, 0xfe],
        )]))
        .expect_err("utf8");
        assert_eq!(e.reason, "not UTF-8");
    }

    #[test]
    fn profiles_are_published_when_they_change_and_once_when_a_store_leaves() {
        use crate::db::inventory::PublishedProfile;
        let content = |region: &str| ProfileContent {
            labels: [("region".to_owned(), region.to_owned())].into(),
            groups: Some(vec![region.to_owned()]),
            ..ProfileContent::default()
        };
        let published = |c: &ProfileContent, in_inventory: bool| PublishedProfile {
            digest: c.digest(),
            sequence: 1,
            in_inventory,
        };
        let wanted: BTreeMap<String, ProfileContent> = [
            ("same".to_owned(), content("east")),
            ("moved".to_owned(), content("south")),
            ("new".to_owned(), content("east")),
            ("back".to_owned(), content("east")),
        ]
        .into();
        let had: BTreeMap<String, PublishedProfile> = [
            ("same".to_owned(), published(&content("east"), true)),
            ("moved".to_owned(), published(&content("east"), true)),
            (
                "back".to_owned(),
                published(&ProfileContent::default(), false),
            ),
            ("left".to_owned(), published(&content("east"), true)),
            ("retired".to_owned(), published(&content("east"), true)),
            (
                "gone".to_owned(),
                published(&ProfileContent::default(), false),
            ),
        ]
        .into();
        let changes = profile_changes(&wanted, &had, |s| s != "retired");
        let names: Vec<(&str, bool)> = changes
            .iter()
            .map(|c| (c.store.as_str(), c.in_inventory))
            .collect();
        assert_eq!(
            names,
            [
                ("back", true),
                ("moved", true),
                ("new", true),
                ("left", false)
            ]
        );
        assert_eq!(changes[1].content, content("south"));
        assert_eq!(changes[3].content, ProfileContent::default());
        assert_eq!(changes[3].content.profile("left", 9).groups, None);
        assert_ne!(content("east").digest(), content("south").digest());
    }

    #[test]
    fn inventory_paths() {
        assert!(is_inventory_file("stores/east.yaml"));
        assert!(is_inventory_file("stores/x.yml"));
        assert!(!is_inventory_file("stores/sub/x.yaml"));
        assert!(!is_inventory_file("stores/readme.md"));
        assert!(!is_inventory_file("storesx/a.yaml"));
        assert!(!is_inventory_file("roost.yaml"));
    }
}
