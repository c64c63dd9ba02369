//! Sealed secrets: manifests encrypted with age (v1 format, X25519 recipients) to the stores
//! that may read them. The cloud seals (`roost secret seal`), a store's agent opens them in
//! memory with the identity made at its enrollment; files interoperate with the reference `age`
//! CLI in both directions. Secrets never appear in `Debug` or error messages.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// ASCII-armored or binary output of [`encrypt_as`].
pub use age::armor::Format;

/// The file-name ending of a sealed file; the file inside is the name without it.
pub const SEALED_EXTENSION: &str = ".age";

/// Whether `path` names a sealed file (`….age`).
pub fn is_sealed(path: &str) -> bool {
    path.len() > SEALED_EXTENSION.len() && path.ends_with(SEALED_EXTENSION)
}

/// A sealing or opening step failed. No variant holds key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    /// A string that is not an age X25519 recipient (`age1…`).
    #[error("{recipient:?} is not an age X25519 recipient: {why}")]
    Recipient {
        /// The string given.
        recipient: String,
        /// age's reason.
        why: &'static str,
    },
    /// An identity file without a valid `AGE-SECRET-KEY-1…` line (the line is not shown).
    #[error("{origin}: {why}")]
    Identity {
        /// Where the identity came from (a path, or "identity").
        origin: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Reading an identity file.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sealing to no recipients.
    #[error("no recipients to seal to")]
    NoRecipients,
    /// age refused to encrypt.
    #[error("cannot seal")]
    Encrypt(#[source] age::EncryptError),
    /// The file is sealed, but not to this identity.
    #[error("not sealed to this identity")]
    NotForThisIdentity,
    /// The file is not an age file, or it is damaged.
    #[error("cannot open the sealed file")]
    Decrypt(#[source] age::DecryptError),
    /// Writing or reading the armored stream.
    #[error("age stream")]
    Stream(#[source] std::io::Error),
    /// An identity file that others than its owner can read (see [`Identity::read_private`]).
    #[error("{}: readable by group or others (mode {mode:o}); it must be 0600", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A store's age identity (its secret key). `Debug` does not show it.
pub struct Identity(age::x25519::Identity);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.recipient())
    }
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Identity {
        Identity(age::x25519::Identity::generate())
    }

    /// Its recipient (`age1…`): what the inventory lists and the cloud seals to.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }

    /// Its recipient, to seal to.
    pub fn to_recipient(&self) -> Recipient {
        Recipient(self.0.to_public())
    }

    /// A key for keyed digests derived from this identity (HMAC-SHA-256 of a fixed label under
    /// the secret key), so a digest of a decrypted manifest (the agent's inventory keeps one)
    /// cannot be used to test guesses of its content without the identity.
    pub fn digest_key(&self) -> DigestKey {
        let secret = self.0.to_string();
        DigestKey(hmac_sha256(
            secret.expose_secret().as_bytes(),
            b"roost/v1 inventory digest",
        ))
    }

    /// The identity file's text in `age-keygen`'s format (readable by `age -d -i`): two
    /// comment lines and the `AGE-SECRET-KEY-1…` line. Write it with mode 0600.
    pub fn file_text(&self) -> String {
        format!(
            "# created: {}\n# public key: {}\n{}\n",
            roost_schemas::now_rfc3339(),
            self.recipient(),
            self.0.to_string().expose_secret()
        )
    }

    /// Parses an identity file's text: the first `AGE-SECRET-KEY-1…` line (comments and
    /// blank lines skipped). `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Identity, SealedError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| SealedError::Identity {
                origin: origin.to_owned(),
                why: "no AGE-SECRET-KEY-1 line",
            })?;
        line.parse::<age::x25519::Identity>()
            .map(Identity)
            .map_err(|why| SealedError::Identity {
                origin: origin.to_owned(),
                why,
            })
    }

    /// Reads an identity file.
    pub fn read(path: &Path) -> Result<Identity, SealedError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealedError::Io {
            path: path.to_owned(),
            source,
        })?;
        Identity::parse(&text, &path.display().to_string())
    }

    /// Reads an identity file that only its owner can read (0600 or stricter), as a store's
    /// agent does; one that group or others can read is refused.
    pub fn read_private(path: &Path) -> Result<Identity, SealedError> {
        let meta = std::fs::metadata(path).map_err(|source| SealedError::Io {
            path: path.to_owned(),
            source,
        })?;
        check_private(path, &meta)?;
        Identity::read(path)
    }

    /// Writes [`Identity::file_text`] to a new file with mode 0600 (never over an existing
    /// file).
    pub fn write_file(&self, path: &Path) -> Result<(), SealedError> {
        let io = |source| SealedError::Io {
            path: path.to_owned(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(self.file_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), SealedError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealedError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), SealedError> {
    Ok(())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A key for [`DigestKey::digest`]. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey([u8; 32]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(<redacted>)")
    }
}

impl DigestKey {
    /// HMAC-SHA-256 of `data` under this key, hex.
    pub fn digest(&self, data: &[u8]) -> String {
        hmac_sha256(&self.0, data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A recipient to seal to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient(age::x25519::Recipient);

impl Recipient {
    /// Parses `age1…`.
    pub fn parse(s: &str) -> Result<Recipient, SealedError> {
        s.trim()
            .parse::<age::x25519::Recipient>()
            .map(Recipient)
            .map_err(|why| SealedError::Recipient {
                recipient: s.to_owned(),
                why,
            })
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Parses every recipient (`age1…`).
pub fn parse_recipients<'a>(
    all: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Recipient>, SealedError> {
    all.into_iter().map(Recipient::parse).collect()
}

/// Seals `plaintext` to every recipient, ASCII-armored (a text file for Git).
pub fn encrypt(recipients: &[Recipient], plaintext: &[u8]) -> Result<Vec<u8>, SealedError> {
    encrypt_as(recipients, plaintext, Format::AsciiArmor)
}

/// Seals `plaintext` to every recipient, ASCII-armored or binary (`format`).
pub fn encrypt_as(
    recipients: &[Recipient],
    plaintext: &[u8],
    format: Format,
) -> Result<Vec<u8>, SealedError> {
    if recipients.is_empty() {
        return Err(SealedError::NoRecipients);
    }
    let enc =
        age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
            .map_err(SealedError::Encrypt)?;
    let mut out = Vec::new();
    let armor =
        age::armor::ArmoredWriter::wrap_output(&mut out, format).map_err(SealedError::Stream)?;
    let mut w = enc.wrap_output(armor).map_err(SealedError::Stream)?;
    w.write_all(plaintext).map_err(SealedError::Stream)?;
    w.finish()
        .and_then(|armor| armor.finish())
        .map_err(SealedError::Stream)?;
    Ok(out)
}

/// Opens a sealed file (binary or ASCII-armored) with `identity`.
pub fn decrypt(identity: &Identity, sealed: &[u8]) -> Result<Vec<u8>, SealedError> {
    let d = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(sealed))
        .map_err(SealedError::Decrypt)?;
    let mut r = d
        .decrypt(std::iter::once(&identity.0 as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => SealedError::NotForThisIdentity,
            e => SealedError::Decrypt(e),
        })?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(SealedError::Stream)?;
    Ok(out)
}

/// The recipients a sealed file's header names cannot be read (X25519 stanzas are anonymous),
/// so whether a file is sealed to exactly a set of stores is checked by opening it with each
/// identity; this only says whether `sealed` looks like an age file (armored or binary).
pub fn looks_sealed(sealed: &[u8]) -> bool {
    sealed.starts_with(b"age-encryption.org/v1\n")
        || sealed.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_to_each_recipient_and_only_to_them() {
        let a = Identity::generate();
        let b = Identity::generate();
        let c = Identity::generate();
        let to =
            parse_recipients([a.recipient().as_str(), b.recipient().as_str()]).expect("recipients");
        let sealed = encrypt(&to, b"kind: Secret\n").expect("seal");
        assert!(sealed.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"));
        assert!(looks_sealed(&sealed));
        for id in [&a, &b] {
            assert_eq!(decrypt(id, &sealed).expect("open"), b"kind: Secret\n");
        }
        assert!(matches!(
            decrypt(&c, &sealed),
            Err(SealedError::NotForThisIdentity)
        ));
        assert!(matches!(encrypt(&[], b"x"), Err(SealedError::NoRecipients)));
        assert!(matches!(
            decrypt(&a, b"plain text"),
            Err(SealedError::Decrypt(_))
        ));
    }

    #[test]
    fn identity_files_round_trip_and_never_show_the_secret() {
        let id = Identity::generate();
        let text = id.file_text();
        let secret = text
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .expect("secret line");
        let back = Identity::parse(&text, "test").expect("parse");
        assert_eq!(back.recipient(), id.recipient());
        assert!(text.contains(&format!("# public key: {}", id.recipient())));
        assert!(!format!("{id:?}").contains(secret));
        let err = Identity::parse("AGE-SECRET-KEY-1NOTAKEY", "file").expect_err("bad");
        assert!(!err.to_string().contains("NOTAKEY"), "{err}");
        assert!(Recipient::parse("age1nope").is_err());
    }

    const SECRET: &[u8] =
        b"apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n";

    #[test]
    fn binary_and_armored_files_open_and_tampering_is_caught() {
        let (a, b) = (Identity::generate(), Identity::generate());
        for (format, armored) in [(Format::Binary, false), (Format::AsciiArmor, true)] {
            let sealed = encrypt_as(&[a.to_recipient()], SECRET, format).expect("seal");
            assert_eq!(
                sealed.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"),
                armored
            );
            assert!(looks_sealed(&sealed));
            assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
            assert_eq!(decrypt(&a, &sealed).expect("a"), SECRET);
            assert!(matches!(
                decrypt(&b, &sealed),
                Err(SealedError::NotForThisIdentity)
            ));
        }
        let mut sealed = encrypt_as(&[a.to_recipient()], SECRET, Format::Binary).expect("seal");
        let n = sealed.len();
        sealed[n - 5] ^= 1;
        assert!(decrypt(&a, &sealed).is_err(), "a flipped bit");
        sealed.truncate(n - 20);
        assert!(decrypt(&a, &sealed).is_err(), "truncated");
        let bad_armor =
            b"-----BEGIN AGE ENCRYPTED FILE-----\n!!!\n-----END AGE ENCRYPTED FILE-----\n";
        assert!(matches!(
            decrypt(&a, bad_armor),
            Err(SealedError::Decrypt(_))
        ));
        assert!(is_sealed("a/secret.yaml.age") && !is_sealed(".age") && !is_sealed("a.agex"));
    }

    #[test]
    fn an_agents_identity_file_is_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let id = Identity::generate();
        let path = dir.path().join("age-identity.txt");
        id.write_file(&path).expect("write");
        assert!(id.write_file(&path).is_err(), "never over an existing file");
        let back = Identity::read_private(&path).expect("read");
        assert_eq!(back.recipient(), id.recipient());
        assert_eq!(back.digest_key(), id.digest_key());
        assert_ne!(Identity::generate().digest_key(), id.digest_key());
        let key = id.digest_key();
        assert_eq!(key.digest(b"x"), key.digest(b"x"));
        assert_ne!(key.digest(b"x"), key.digest(b"y"));
        assert_eq!(key.digest(b"x").len(), 64);
        assert_eq!(format!("{key:?}"), "DigestKey(<redacted>)");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let err = Identity::read_private(&path).expect_err("group-readable");
            assert!(
                matches!(err, SealedError::Permissions { mode: 0o640, .. }),
                "{err}"
            );
            assert!(
                Identity::read(&path).is_ok(),
                "read does not check the mode"
            );
        }
    }

    /// The reference `age` CLI and `age-keygen`, or None when this test may be skipped:
    /// absent on a developer's machine; under CI (`CI=true`) their absence fails the test.
    fn age_cli(test: &str) -> Option<(PathBuf, PathBuf)> {
        let found = ["/usr/bin", "/usr/local/bin"]
            .into_iter()
            .map(Path::new)
            .find(|d| d.join("age").exists() && d.join("age-keygen").exists())
            .map(|d| (d.join("age"), d.join("age-keygen")));
        if found.is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the age CLI is not installed, and CI must run {test} (.ci/run installs it)"
            );
            eprintln!("SKIPPED {test}: the age CLI is not installed (apt-get install -y age)");
        }
        found
    }

    fn run(cmd: &mut std::process::Command, stdin: &[u8]) -> Vec<u8> {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn files_sealed_by_the_age_cli_open_here() {
        let Some((age, keygen)) = age_cli("files_sealed_by_the_age_cli_open_here") else {
            return;
        };
        let dir = tempfile::tempdir().expect("tmp");
        // An identity made by age-keygen (its file format, comments included) is read here.
        let key = dir.path().join("key.txt");
        run(std::process::Command::new(keygen).arg("-o").arg(&key), b"");
        let id = Identity::read(&key).expect("age-keygen identity");
        for armor in [false, true] {
            let mut cmd = std::process::Command::new(&age);
            cmd.arg("-r").arg(id.recipient());
            if armor {
                cmd.arg("-a");
            }
            let sealed = run(&mut cmd, SECRET);
            assert_eq!(
                decrypt(&id, &sealed).expect("open"),
                SECRET,
                "armor {armor}"
            );
            assert!(matches!(
                decrypt(&Identity::generate(), &sealed),
                Err(SealedError::NotForThisIdentity)
            ));
        }
    }

    #[test]
    fn files_sealed_here_open_with_the_age_cli() {
        let Some((age, _)) = age_cli("files_sealed_here_open_with_the_age_cli") else {
            return;
        };
        let dir = tempfile::tempdir().expect("tmp");
        let id = Identity::generate();
        let key = dir.path().join("age-identity.txt");
        id.write_file(&key).expect("write");
        let other = Identity::generate();
        for (format, armored) in [(Format::Binary, false), (Format::AsciiArmor, true)] {
            let sealed = encrypt_as(&[other.to_recipient(), id.to_recipient()], SECRET, format)
                .expect("seal");
            let plain = run(
                std::process::Command::new(&age)
                    .arg("-d")
                    .arg("-i")
                    .arg(&key),
                &sealed,
            );
            assert_eq!(plain, SECRET, "armored {armored}");
        }
    }
}
