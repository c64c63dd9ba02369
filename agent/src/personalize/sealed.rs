//! Sealed files of a revision (`*.age`: age v1, binary or ASCII-armored, X25519 recipients):
//! decrypted in memory with the store's age identity, never written anywhere. The identity is
//! read once at start from `[secrets] identity_file` (default `STATE/age-identity.txt`); the
//! agent refuses one that group or others can read, and never creates one (enrollment does).

use std::path::PathBuf;

use roost_runtime::sealed::{self, Identity, SealedError};
use roost_schemas::reason::detail;

use crate::config::AgentConfig;
use crate::git::ManifestFile;

/// The identity file's name in the state directory when `[secrets] identity_file` is unset.
pub const DEFAULT_IDENTITY_FILE: &str = "age-identity.txt";

/// Why a sealed file cannot be used. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SealedFileError {
    /// Not encrypted to this store's identity (`secret_not_for_this_store`).
    #[error("{path}: not sealed for this store (not encrypted to its age identity)")]
    NotForThisStore {
        /// The sealed file.
        path: String,
    },
    /// The store has no identity, so no sealed file is for it (`secret_not_for_this_store`).
    #[error("{path}: sealed, and this store has no age identity ([secrets] identity_file)")]
    NoIdentity {
        /// The sealed file.
        path: String,
    },
    /// Not a readable age file (bad header, MAC, armor, truncated).
    #[error("{path}: not a valid age file")]
    Malformed {
        /// The sealed file.
        path: String,
        /// Cause.
        #[source]
        source: Box<SealedError>,
    },
    /// A sealed file decrypts to a path another file of the revision already has.
    #[error("{path}: given twice (as {path} and as {path}.age)")]
    Duplicate {
        /// The path.
        path: String,
    },
}

impl SealedFileError {
    /// The stable `data.detail` code, if any.
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            SealedFileError::NotForThisStore { .. } | SealedFileError::NoIdentity { .. } => {
                Some(detail::SECRET_NOT_FOR_THIS_STORE)
            }
            _ => None,
        }
    }
}

/// Whether a file of a revision is sealed.
pub fn is_sealed(path: &str) -> bool {
    sealed::is_sealed(path)
}

/// The path a sealed file's content takes (`secret.yaml.age` → `secret.yaml`).
pub fn plain_path(path: &str) -> &str {
    path.strip_suffix(sealed::SEALED_EXTENSION).unwrap_or(path)
}

/// Decrypts a sealed file in memory with the store's identity.
pub fn open(f: &ManifestFile, identity: Option<&Identity>) -> Result<Vec<u8>, SealedFileError> {
    let Some(identity) = identity else {
        return Err(SealedFileError::NoIdentity {
            path: f.path.clone(),
        });
    };
    sealed::decrypt(identity, &f.data).map_err(|e| match e {
        SealedError::NotForThisIdentity => SealedFileError::NotForThisStore {
            path: f.path.clone(),
        },
        source => SealedFileError::Malformed {
            path: f.path.clone(),
            source: Box::new(source),
        },
    })
}

/// The identity file of the configuration: `[secrets] identity_file`, else
/// `STATE/age-identity.txt`.
pub fn identity_path(cfg: &AgentConfig) -> PathBuf {
    cfg.file
        .secrets
        .identity_file
        .clone()
        .unwrap_or_else(|| cfg.file.state_dir.join(DEFAULT_IDENTITY_FILE))
}

/// The store's identity, read at start. `None` when the file is absent and was not named in
/// the configuration (a store without secrets); an error when a configured file is missing,
/// or a file is readable by group or others, or holds no single X25519 identity.
pub fn load_identity(cfg: &AgentConfig) -> Result<Option<Identity>, SealedError> {
    let path = identity_path(cfg);
    if cfg.file.secrets.identity_file.is_none() && !path.exists() {
        return Ok(None);
    }
    Identity::read_private(&path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_the_right_identity_and_names_the_file() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let plain = b"kind: Secret\n";
        for format in [
            roost_runtime::sealed::Format::Binary,
            roost_runtime::sealed::Format::AsciiArmor,
        ] {
            let f = ManifestFile {
                path: "secret.yaml.age".into(),
                data: sealed::encrypt_as(&[a.to_recipient()], plain, format).expect("seal"),
            };
            assert_eq!(open(&f, Some(&a)).expect("a"), plain);
            let e = open(&f, Some(&b)).expect_err("b");
            assert_eq!(e.detail(), Some(detail::SECRET_NOT_FOR_THIS_STORE));
            assert!(e
                .to_string()
                .starts_with("secret.yaml.age: not sealed for this store"));
            let e = open(&f, None).expect_err("none");
            assert_eq!(e.detail(), Some(detail::SECRET_NOT_FOR_THIS_STORE));
        }
        let junk = ManifestFile {
            path: "x.age".into(),
            data: b"kind: Secret\n".to_vec(),
        };
        let e = open(&junk, Some(&a)).expect_err("junk");
        assert_eq!(e.detail(), None);
        assert!(e.to_string().contains("not a valid age file"));
        assert_eq!(plain_path("a/b.yaml.age"), "a/b.yaml");
        assert!(is_sealed("a.age") && !is_sealed(".age") && !is_sealed("a.agex"));
    }

    /// A valid configuration on `state`, with `extra` TOML at the end.
    fn config(state: &std::path::Path, extra: &str) -> AgentConfig {
        use base64::Engine as _;
        let k = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
        let text = format!(
            "store = \"s1\"\nstate_dir = {:?}\n[broker]\nport = 1883\n[[trusted_keys]]\nid = \"{}\"\npublic_key = \"{}\"\n[git]\nallowed_sources = [\"file:///\"]\n{extra}",
            state.display().to_string(),
            k.key_id(),
            base64::engine::general_purpose::STANDARD.encode(k.public_key()),
        );
        AgentConfig::from_file(toml::from_str(&text).expect("toml")).expect("valid")
    }

    #[test]
    fn the_identity_is_loaded_from_the_state_directory_or_the_configured_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = config(dir.path(), "");
        assert_eq!(identity_path(&cfg), dir.path().join(DEFAULT_IDENTITY_FILE));
        assert!(
            load_identity(&cfg).expect("none yet").is_none(),
            "no file: no identity"
        );
        assert!(!identity_path(&cfg).exists(), "the agent creates none");
        let id = Identity::generate();
        id.write_file(&identity_path(&cfg))
            .expect("enrollment writes it");
        let loaded = load_identity(&cfg).expect("loads").expect("some");
        assert_eq!(loaded.recipient(), id.recipient());
        std::fs::set_permissions(identity_path(&cfg), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = load_identity(&cfg).expect_err("world-readable");
        assert!(matches!(e, SealedError::Permissions { .. }), "{e}");
        // A configured file must exist.
        let other = dir.path().join("elsewhere/key.txt");
        let cfg = config(
            dir.path(),
            &format!(
                "[secrets]\nidentity_file = {:?}\n",
                other.display().to_string()
            ),
        );
        assert_eq!(identity_path(&cfg), other);
        assert!(matches!(load_identity(&cfg), Err(SealedError::Io { .. })));
    }
}
