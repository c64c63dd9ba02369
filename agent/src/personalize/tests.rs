//! The whole personalization of a revision: overlays, sealed files and substitution together,
//! for both layouts, and the context seam.

use std::collections::BTreeMap;

use roost_runtime::sealed::{encrypt_as, Identity};
use roost_schemas::reason::detail;

use super::*;
use crate::git::parse_documents;

const LIMITS: RenderLimits = RenderLimits {
    max_bytes: 1 << 20,
    max_files: 100,
    max_file_bytes: 1 << 19,
};

fn ctx(store: &str) -> StoreContext {
    StoreContext {
        store: store.into(),
        groups: vec!["canary".into()],
        labels: BTreeMap::from([("region".into(), "us-south".into())]),
        vars: BTreeMap::new(),
        timezone: None,
    }
}

fn file(path: &str, data: &[u8]) -> ManifestFile {
    ManifestFile {
        path: path.into(),
        data: data.to_vec(),
    }
}

fn rendered(files: Vec<ManifestFile>) -> Rendered {
    Rendered {
        revision: "r".into(),
        files,
        sealed: SealedFiles::default(),
    }
}

fn secret(name: &str, password: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: shop\nstringData:\n  password: \"{password}\"\n  store: \"${{roost.store}}\"\n")
}

fn cm() -> String {
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n  namespace: shop\ndata:\n  store: ${roost.store}\n  region: ${roost.labels.region}\n  literal: $${roost.store}\n".into()
}

/// `text` sealed to `to`, ASCII-armored or binary.
fn seal(
    to: &Identity,
    text: &[u8],
    armor: bool,
) -> Result<Vec<u8>, roost_runtime::sealed::SealedError> {
    let format = if armor {
        roost_runtime::sealed::Format::AsciiArmor
    } else {
        roost_runtime::sealed::Format::Binary
    };
    encrypt_as(&[to.to_recipient()], text, format)
}

struct Stores {
    a: Identity,
    b: Identity,
}

impl Stores {
    fn new() -> Stores {
        Stores {
            a: Identity::generate(),
            b: Identity::generate(),
        }
    }
}

fn run(
    files: Vec<ManifestFile>,
    store: &str,
    identity: Option<&Identity>,
    layout: Layout,
    substitute: bool,
) -> Result<Rendered, PersonalizeError> {
    personalize(
        rendered(files),
        &Input {
            context: &ctx(store),
            identity,
            layout,
            substitute,
            limits: LIMITS,
        },
    )
}

fn doc(r: &Rendered, path: &str) -> serde_json::Value {
    let f = r
        .files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} in {:?}", r.files));
    parse_documents(f).expect("parses").remove(0)
}

#[test]
fn a_plain_revision_passes_unchanged() {
    let files = vec![file("a.yaml", cm().as_bytes()), file("b.txt", b"${x}")];
    for layout in [Layout::Objects, Layout::Files] {
        let r = run(files.clone(), "store-a", None, layout, false).expect("plain");
        assert_eq!(
            r,
            rendered(files.clone()),
            "{layout:?}: bytes kept, tokens literal"
        );
    }
}

#[test]
fn a_secret_sealed_for_one_store_is_applied_there_only() {
    let s = Stores::new();
    for armor in [false, true] {
        let sealed = seal(&s.a, secret("db", "hunter2").as_bytes(), armor).expect("seal");
        let files = vec![
            file("config.yaml", cm().as_bytes()),
            file("secret.yaml.age", &sealed),
        ];
        // Store A: decrypted in memory, substituted, marked sealed with a keyed digest.
        let r = run(files.clone(), "store-a", Some(&s.a), Layout::Objects, true).expect("a");
        assert_eq!(
            r.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            vec!["config.yaml", "secret.yaml"]
        );
        let d = doc(&r, "secret.yaml");
        assert_eq!(d["stringData"]["password"], "hunter2");
        assert_eq!(d["stringData"]["store"], "store-a");
        assert_eq!(doc(&r, "config.yaml")["data"]["store"], "store-a");
        assert_eq!(doc(&r, "config.yaml")["data"]["region"], "us-south");
        assert_eq!(doc(&r, "config.yaml")["data"]["literal"], "${roost.store}");
        assert_eq!(r.sealed.paths, BTreeSet::from(["secret.yaml".to_owned()]));
        let key = r.sealed.digest_key.clone().expect("a key");
        assert_eq!(key, s.a.digest_key());
        assert!(r.sealed.digest("secret.yaml", b"x").is_some());
        assert!(r.sealed.digest("config.yaml", b"x").is_none());
        assert!(
            !format!("{r:?}").contains("hunter2"),
            "Debug shows no content"
        );
        // Store B: its copy of the same file is not for it.
        for (identity, what) in [(Some(&s.b), "another identity"), (None, "no identity")] {
            let e = run(files.clone(), "store-b", identity, Layout::Objects, true).expect_err(what);
            assert_eq!(e.reason(), Reason::InvalidManifest, "{what}");
            assert_eq!(
                e.detail(),
                Some(detail::SECRET_NOT_FOR_THIS_STORE),
                "{what}"
            );
            let msg = roost_runtime::error_chain(&e);
            assert!(msg.contains("secret.yaml.age"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }
}

#[test]
fn the_files_target_gets_ciphertext_checked_for_this_store() {
    let s = Stores::new();
    let sealed = seal(&s.a, b"PASSWORD=hunter2\n", true).expect("seal");
    let files = vec![
        file("app.env.age", &sealed),
        file("_stores/store-a/only-a.env.age", &sealed),
        file("cm.yaml", cm().as_bytes()),
    ];
    let r = run(files.clone(), "store-a", Some(&s.a), Layout::Files, true).expect("a");
    assert_eq!(
        r.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        vec!["app.env.age", "cm.yaml", "only-a.env.age"]
    );
    for f in r.files.iter().filter(|f| f.path.ends_with(".age")) {
        assert_eq!(f.data, sealed, "{}: the ciphertext, unchanged", f.path);
    }
    assert!(r.sealed.paths.is_empty() && r.sealed.digest_key.is_none());
    assert_eq!(doc(&r, "cm.yaml")["data"]["store"], "store-a");
    // Store B does not get A's overlay, and its copy of the base file is not for it.
    let e = run(files, "store-b", Some(&s.b), Layout::Files, false).expect_err("b");
    assert_eq!(e.detail(), Some(detail::SECRET_NOT_FOR_THIS_STORE));
    assert!(roost_runtime::error_chain(&e).contains("app.env.age"));
}

#[test]
fn each_store_gets_its_own_sealed_overlay() {
    let s = Stores::new();
    let seal_for =
        |id: &Identity, pw: &str| seal(id, secret("db", pw).as_bytes(), false).expect("seal");
    let files = vec![
        file("secret.yaml", secret("db", "placeholder").as_bytes()),
        file("_stores/store-a/secret.yaml.age", &seal_for(&s.a, "for-a")),
        file("_stores/store-b/secret.yaml.age", &seal_for(&s.b, "for-b")),
    ];
    for (store, id, pw) in [("store-a", &s.a, "for-a"), ("store-b", &s.b, "for-b")] {
        let r = run(files.clone(), store, Some(id), Layout::Objects, true).expect(store);
        let paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        // The overlay's Secret replaced the base one (same identity): the base file is gone.
        assert_eq!(paths, vec![format!("_stores/{store}/secret.yaml").as_str()]);
        let d = doc(&r, paths[0]);
        assert_eq!(d["stringData"]["password"], pw);
        assert_eq!(d["stringData"]["store"], store);
    }
    // A store with neither overlay applies the base.
    let r = run(files, "store-c", None, Layout::Objects, false).expect("c");
    assert_eq!(r.files.len(), 1);
    assert_eq!(
        doc(&r, "secret.yaml")["stringData"]["password"],
        "placeholder"
    );
}

#[test]
fn a_sealed_file_may_not_shadow_a_plain_one() {
    let s = Stores::new();
    let sealed = seal(&s.a, b"kind: A\n", true).expect("seal");
    let files = vec![file("x.yaml", b"kind: B\n"), file("x.yaml.age", &sealed)];
    let e = run(files, "store-a", Some(&s.a), Layout::Objects, false).expect_err("dup");
    assert!(
        roost_runtime::error_chain(&e).contains("given twice"),
        "{e}"
    );
    assert_eq!(e.reason(), Reason::InvalidManifest);
}

#[test]
fn substitution_errors_and_limits_reject_the_revision() {
    let unresolved = vec![file(
        "apps/cm.yaml",
        b"kind: A\ndata:\n  x: ${roost.vars.printer}\n",
    )];
    let e = run(unresolved.clone(), "store-a", None, Layout::Objects, true).expect_err("x");
    assert_eq!(e.reason(), Reason::InvalidManifest);
    assert_eq!(
        roost_runtime::error_chain(&e),
        "substitution: apps/cm.yaml:3: unresolved variable ${roost.vars.printer}"
    );
    // Without policy.substitute the same file is applied as written.
    assert!(run(unresolved, "store-a", None, Layout::Objects, false).is_ok());
    // The result must stay within the render limits.
    let mut c = ctx("store-a");
    c.vars.insert("big".into(), "z".repeat(4000));
    let text = "a:\n".to_owned() + &"  - ${roost.vars.big}\n".repeat(200);
    let r = personalize(
        rendered(vec![file("big.yaml", text.as_bytes())]),
        &Input {
            context: &c,
            identity: None,
            layout: Layout::Files,
            substitute: true,
            limits: RenderLimits {
                max_file_bytes: 64 * 1024,
                ..LIMITS
            },
        },
    );
    let e = r.expect_err("over the per-file limit");
    assert_eq!(e.reason(), Reason::InvalidManifest);
    assert!(e.to_string().contains("limit 65536 per file"), "{e}");
    // 100,000 vars are refused before anything is substituted.
    let mut c = ctx("store-a");
    c.vars = (0..100_000)
        .map(|i| (format!("v{i}"), "x".into()))
        .collect();
    let e = personalize(
        rendered(vec![file("a.yaml", b"a: 1\n")]),
        &Input {
            context: &c,
            identity: None,
            layout: Layout::Objects,
            substitute: true,
            limits: LIMITS,
        },
    )
    .expect_err("too many vars");
    assert!(roost_runtime::error_chain(&e).contains("100000 vars, at most 256"));
}

#[test]
fn a_profile_gives_labels_vars_and_maybe_groups() {
    let file: crate::config::AgentFile = toml::from_str(
        "store = \"store-a\"\ngroups = [\"canary\"]\nstate_dir = \"/tmp/x\"\n[broker]\nport = 1883\n",
    )
    .expect("toml");
    let mut profile = roost_schemas::profile::Profile {
        store: "store-a".into(),
        sequence: 1,
        issued_at: "2026-11-26T10:00:00Z".into(),
        labels: BTreeMap::from([("region".into(), "us-south".into())]),
        groups: None,
        timezone: Some("America/Chicago".into()),
        vars: BTreeMap::from([("menu".into(), "lunch".into())]),
    };
    let c = StoreContext::from_profile(&profile, &file);
    assert_eq!(c.groups, vec!["canary".to_owned()], "the configured groups");
    assert_eq!(c.vars["menu"], "lunch");
    assert_eq!(c.labels["region"], "us-south");
    assert_eq!(c.timezone.as_deref(), Some("America/Chicago"));
    profile.groups = Some(vec![]);
    assert!(StoreContext::from_profile(&profile, &file)
        .groups
        .is_empty());
    assert_eq!(
        StoreContext::from_config(&file).groups,
        vec!["canary".to_owned()]
    );
}

#[tokio::test]
async fn a_new_context_applies_to_the_next_build() {
    let p = Personalizer::new(ctx("store-a"), None);
    let changes = p.subscribe();
    let files = vec![file("cm.yaml", b"v: ${roost.vars.menu:=breakfast}\n")];
    let r = p
        .run(rendered(files.clone()), Layout::Objects, true, LIMITS)
        .await
        .expect("default");
    assert_eq!(doc(&r, "cm.yaml")["v"], "breakfast");
    // What the store profile will do once it is verified.
    let mut c = ctx("store-a");
    c.vars.insert("menu".into(), "lunch".into());
    p.set_context(c);
    assert!(changes.has_changed().expect("open"));
    let r = p
        .run(rendered(files), Layout::Objects, true, LIMITS)
        .await
        .expect("from the profile");
    assert_eq!(doc(&r, "cm.yaml")["v"], "lunch");
    assert!(!p.has_identity());
}
