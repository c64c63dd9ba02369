//! Sealed secrets: manifests encrypted with age (v1 format, X25519 recipients) to the stores
//! that may read them. The cloud seals (`roost secret seal`), a store's agent opens them with
//! the identity made at its enrollment. Secrets never appear in `Debug` or error messages.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret as _;

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
}

/// A recipient to seal to.
#[derive(Debug, Clone)]
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
    if recipients.is_empty() {
        return Err(SealedError::NoRecipients);
    }
    let enc =
        age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
            .map_err(SealedError::Encrypt)?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(SealedError::Stream)?;
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
}
