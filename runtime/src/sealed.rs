//! Sealed files: age v1 encryption to X25519 recipients and decryption with a store's identity,
//! in memory only, compatible with the reference `age` CLI in both directions. Shared by the
//! agent (decrypts a revision's `.age` files), enrollment (generates and writes the identity)
//! and `roost secret seal` (encrypts to the stores' recipients).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The file-name ending of a sealed file; the manifest inside is the name without it.
pub const SEALED_EXTENSION: &str = ".age";

/// Whether `path` names a sealed file (`….age`).
pub fn is_sealed(path: &str) -> bool {
    path.len() > SEALED_EXTENSION.len() && path.ends_with(SEALED_EXTENSION)
}

/// Errors of sealing and opening, and of identity files. No message ever holds a secret key
/// or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    /// The file is an age file, but not encrypted to this identity.
    #[error("not encrypted to this store's age identity")]
    NotForThisIdentity,
    /// The bytes are not a readable age v1 file (header, MAC, armor, truncated payload).
    #[error("not a valid age file")]
    Malformed(#[source] age::DecryptError),
    /// Encryption failed.
    #[error("age encryption")]
    Encrypt(#[source] age::EncryptError),
    /// Sealing needs at least one recipient.
    #[error("no recipients to seal to")]
    NoRecipients,
    /// A recipient is not an X25519 age recipient (`age1…`).
    #[error("{recipient:?} is not an age X25519 recipient ({why})")]
    InvalidRecipient {
        /// The recipient as given (public).
        recipient: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An identity file does not hold exactly one X25519 identity.
    #[error("{path}: {why}")]
    InvalidIdentity {
        /// The file (or `<text>`).
        path: PathBuf,
        /// What is wrong (never the key itself).
        why: String,
    },
    /// An identity file that others than its owner can read is refused.
    #[error("{path}: readable by group or others (mode {mode:o}); it must be 0600")]
    IdentityPermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing a file failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A store's age identity (X25519 secret key). `Debug` shows only its recipient.
#[derive(Clone)]
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

    /// Parses identity-file text as `age-keygen` writes it: `#` comments, blank lines and
    /// exactly one `AGE-SECRET-KEY-1…` line.
    pub fn parse(text: &str) -> Result<Identity, SealedError> {
        Self::parse_named(text, Path::new("<text>"))
    }

    fn parse_named(text: &str, path: &Path) -> Result<Identity, SealedError> {
        let invalid = |why: &str| SealedError::InvalidIdentity {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let mut keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let first = keys
            .next()
            .ok_or_else(|| invalid("no identity in the file"))?;
        if keys.next().is_some() {
            return Err(invalid("more than one identity (exactly one is supported)"));
        }
        first
            .parse::<age::x25519::Identity>()
            .map(Identity)
            .map_err(|why| invalid(&format!("not an age X25519 identity ({why})")))
    }

    /// Reads an identity file, refusing one that group or others can read (0600 or
    /// stricter).
    pub fn read_file(path: &Path) -> Result<Identity, SealedError> {
        let io = |what| {
            move |source| SealedError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        let meta = std::fs::metadata(path).map_err(io("read"))?;
        check_private(path, &meta)?;
        let text = std::fs::read_to_string(path).map_err(io("read"))?;
        Self::parse_named(&text, path)
    }

    /// Writes the identity to a new file (mode 0600, never over an existing file), in
    /// `age-keygen`'s format, so the reference `age -d -i FILE` reads it.
    pub fn write_file(&self, path: &Path) -> Result<(), SealedError> {
        let io = |what| {
            move |source| SealedError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(io("create"))?;
        let secret = self.0.to_string();
        let text = format!(
            "# created: {}\n# public key: {}\n{}\n",
            roost_schemas::now_rfc3339(),
            self.recipient(),
            secret.expose_secret()
        );
        f.write_all(text.as_bytes()).map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))
    }

    /// The public recipient of this identity (`age1…`).
    pub fn recipient(&self) -> Recipient {
        Recipient(self.0.to_public())
    }

    /// A key for keyed digests derived from this identity (HMAC-SHA-256 of a fixed label
    /// under the secret key), so a digest of a decrypted manifest cannot be used to test
    /// guesses of its content without the identity.
    pub fn digest_key(&self) -> DigestKey {
        let secret = self.0.to_string();
        DigestKey(hmac_sha256(
            secret.expose_secret().as_bytes(),
            b"roost/v1 inventory digest",
        ))
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), SealedError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealedError::IdentityPermissions {
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
        hex_string(&hmac_sha256(&self.0, data))
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store's public age recipient (`age1…`, X25519).
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient(age::x25519::Recipient);

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient({self})")
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Recipient {
    type Err = SealedError;

    fn from_str(s: &str) -> Result<Recipient, SealedError> {
        s.trim()
            .parse::<age::x25519::Recipient>()
            .map(Recipient)
            .map_err(|why| SealedError::InvalidRecipient {
                recipient: s.to_owned(),
                why,
            })
    }
}

/// Encrypts `plaintext` to every recipient: age v1, ASCII-armored when `armor` (the form to
/// commit to Git), binary otherwise.
pub fn seal(
    recipients: &[Recipient],
    plaintext: &[u8],
    armor: bool,
) -> Result<Vec<u8>, SealedError> {
    if recipients.is_empty() {
        return Err(SealedError::NoRecipients);
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
            .map_err(SealedError::Encrypt)?;
    let io = |source| SealedError::Encrypt(age::EncryptError::Io(source));
    let mut out = Vec::with_capacity(plaintext.len() + 512);
    let format = if armor {
        age::armor::Format::AsciiArmor
    } else {
        age::armor::Format::Binary
    };
    let armored = age::armor::ArmoredWriter::wrap_output(&mut out, format).map_err(io)?;
    let mut w = encryptor.wrap_output(armored).map_err(io)?;
    w.write_all(plaintext).map_err(io)?;
    w.finish().and_then(|a| a.finish()).map_err(io)?;
    Ok(out)
}

/// Decrypts an age v1 file (binary or ASCII-armored) with `identity`, in memory. A file for
/// other recipients only is [`SealedError::NotForThisIdentity`].
pub fn open(identity: &Identity, ciphertext: &[u8]) -> Result<Vec<u8>, SealedError> {
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(ciphertext))
        .map_err(SealedError::Malformed)?;
    let mut reader = decryptor
        .decrypt(std::iter::once(&identity.0 as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => SealedError::NotForThisIdentity,
            other => SealedError::Malformed(other),
        })?;
    // The plaintext is never longer than the ciphertext.
    let mut plaintext = Vec::with_capacity(ciphertext.len());
    reader
        .read_to_end(&mut plaintext)
        .map_err(|e| SealedError::Malformed(age::DecryptError::Io(e)))?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const SECRET: &[u8] =
        b"apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n";

    #[test]
    fn round_trips_binary_and_armored_to_several_recipients() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        for armor in [false, true] {
            let sealed = seal(&[a.recipient(), b.recipient()], SECRET, armor).expect("seal");
            assert_eq!(
                sealed.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----"),
                armor
            );
            assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
            assert_eq!(open(&a, &sealed).expect("a"), SECRET);
            assert_eq!(open(&b, &sealed).expect("b"), SECRET);
            assert!(matches!(
                open(&c, &sealed),
                Err(SealedError::NotForThisIdentity)
            ));
        }
        assert!(matches!(
            seal(&[], SECRET, true),
            Err(SealedError::NoRecipients)
        ));
    }

    #[test]
    fn garbage_and_tampering_are_malformed_not_foreign() {
        let a = Identity::generate();
        for bad in [
            &b""[..],
            b"not age",
            b"-----BEGIN AGE ENCRYPTED FILE-----\n!!!\n-----END AGE ENCRYPTED FILE-----\n",
        ] {
            assert!(
                matches!(open(&a, bad), Err(SealedError::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut sealed = seal(&[a.recipient()], SECRET, false).expect("seal");
        let n = sealed.len();
        sealed[n - 5] ^= 1;
        assert!(matches!(open(&a, &sealed), Err(SealedError::Malformed(_))));
        sealed.truncate(n - 20);
        assert!(open(&a, &sealed).is_err());
    }

    #[test]
    fn identity_files_are_private_and_parsed_strictly() {
        let dir = tempfile::tempdir().expect("tmp");
        let id = Identity::generate();
        let path = dir.path().join("age-identity.txt");
        id.write_file(&path).expect("write");
        assert!(id.write_file(&path).is_err(), "never over an existing file");
        let back = Identity::read_file(&path).expect("read");
        assert_eq!(back.recipient(), id.recipient());
        assert_eq!(back.digest_key(), id.digest_key());
        assert_ne!(Identity::generate().digest_key(), id.digest_key());
        // Debug shows the public half only.
        let text = std::fs::read_to_string(&path).expect("text");
        let secret_line = text.lines().last().expect("key line");
        assert!(secret_line.starts_with("AGE-SECRET-KEY-1"));
        assert!(!format!("{id:?} {:?}", id.digest_key()).contains(secret_line));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let err = Identity::read_file(&path).expect_err("group-readable");
            assert!(matches!(
                err,
                SealedError::IdentityPermissions { mode: 0o640, .. }
            ));
        }
        for (text, why) in [
            ("# nothing\n", "no identity"),
            (
                &format!("{secret_line}\n{secret_line}\n")[..],
                "more than one",
            ),
            ("AGE-SECRET-KEY-1NOPE\n", "not an age X25519 identity"),
        ] {
            let err = Identity::parse(text).expect_err(why).to_string();
            assert!(err.contains(why), "{err}");
            assert!(!err.contains(secret_line), "no key in messages: {err}");
        }
        let keyed = id.digest_key();
        assert_eq!(keyed.digest(b"x"), keyed.digest(b"x"));
        assert_ne!(keyed.digest(b"x"), keyed.digest(b"y"));
        assert_eq!(keyed.digest(b"x").len(), 64);
        let r: Recipient = id.recipient().to_string().parse().expect("recipient");
        assert_eq!(r, id.recipient());
        assert!("age1nope".parse::<Recipient>().is_err());
        assert!(secret_line.parse::<Recipient>().is_err());
    }

    /// The reference `age` CLI (Debian package `age`), or None when this test may be skipped:
    /// absent on a developer's machine; under CI (`CI=true`) its absence fails the test.
    fn age_cli(test: &str) -> Option<(&'static str, &'static str)> {
        let found = ["/usr/bin/age", "/usr/local/bin/age"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .map(|age| {
                (
                    age,
                    if age.starts_with("/usr/bin") {
                        "/usr/bin/age-keygen"
                    } else {
                        "/usr/local/bin/age-keygen"
                    },
                )
            });
        if found.is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the age CLI is not installed, and CI must run {test} (.ci/run installs it)"
            );
            eprintln!("SKIPPED {test}: the age CLI is not installed (apt-get install -y age)");
        }
        found
    }

    fn run(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
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
        run(Command::new(keygen).arg("-o").arg(&key), b"");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let id = Identity::read_file(&key).expect("age-keygen identity");
        let recipient = id.recipient().to_string();
        for armor in [false, true] {
            let mut cmd = Command::new(age);
            cmd.arg("-r").arg(&recipient);
            if armor {
                cmd.arg("-a");
            }
            let sealed = run(&mut cmd, SECRET);
            assert_eq!(open(&id, &sealed).expect("open"), SECRET, "armor {armor}");
            assert!(matches!(
                open(&Identity::generate(), &sealed),
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
        for armor in [false, true] {
            let sealed = seal(&[other.recipient(), id.recipient()], SECRET, armor).expect("seal");
            let plain = run(Command::new(age).arg("-d").arg("-i").arg(&key), &sealed);
            assert_eq!(plain, SECRET, "armor {armor}");
        }
    }
}
