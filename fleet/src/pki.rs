//! The fleet's certificate authority: `roost ca init` makes it (`ca.pem`, and `ca.key` mode
//! 0600), and it issues the certificates of mutual TLS: a store's client certificate (CN = the
//! store, the identity the shipped mosquitto ACL authorizes), the controller's, a broker's.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The CA certificate's file in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key's file in a CA directory (mode 0600).
pub const CA_KEY: &str = "ca.key";

/// Days a CA certificate is valid.
pub const CA_DAYS: u32 = 3650;
/// Days a certificate the CA issues is valid unless asked otherwise.
pub const LEAF_DAYS: u32 = 825;

/// A step of the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `roost ca init` into a directory that already holds a CA.
    #[error("{} already exists: a CA is there (remove it to start a new one)", path.display())]
    Exists {
        /// The CA file that exists.
        path: PathBuf,
    },
    /// Reading or writing a file.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not the PEM it should be, or a CA certificate and key that do not parse.
    #[error("{}: {what}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Making a key or a certificate.
    #[error("{what}")]
    Make {
        /// What was being made.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client (a store's bridge, the controller, an agent on the edge).
    Client,
    /// A TLS server (a broker) for these DNS names and IP addresses.
    Server(Vec<String>),
}

/// A certificate and its private key, as PEM. The key is never shown by `Debug`.
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The fleet's CA, loaded from its directory.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn make(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Make { what, source }
}

/// Writes a new file readable by its owner only (mode 0600 from the start, never wider for a
/// moment); refuses to replace an existing file.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_new(path, data, 0o600)
}

/// Writes a new public file (mode 0644); refuses to replace an existing file.
pub fn write_public(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_new(path, data, 0o644)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Valid from an hour ago (clocks differ) for `days`; a random positive serial number.
fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
}

/// `roost ca init`: a new CA in `dir` (created if missing) named `name`: `ca.pem` and
/// `ca.key` (mode 0600). Refuses a directory that already has either.
pub fn init(dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = common_name(name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, CA_DAYS);
    let key = KeyPair::generate().map_err(make("the CA key"))?;
    let cert = p.self_signed(&key).map_err(make("the CA certificate"))?;
    // The key first: a CA certificate without its key would block a second try.
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

impl Ca {
    /// Loads the CA of `dir` (`ca.pem`, `ca.key`).
    pub fn open(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Parse {
            path: key_path.clone(),
            what: "a PEM private key",
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::Parse {
                path: cert_path.clone(),
                what: "a PEM CA certificate matching ca.key",
                source,
            })?;
        Ok(Ca { cert_pem, issuer })
    }

    /// The CA certificate (PEM): what clients and brokers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and a certificate for `cn`, valid for `days`.
    pub fn issue(&self, cn: &str, usage: &Usage, days: u32) -> Result<Issued, PkiError> {
        let sans = match usage {
            Usage::Client => Vec::new(),
            Usage::Server(names) => names.clone(),
        };
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(make(format!("the certificate of {cn}")))?;
        for s in &sans {
            p.subject_alt_names
                .push(match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        s.clone()
                            .try_into()
                            .map_err(make(format!("the DNS name {s:?}")))?,
                    ),
                });
        }
        p.distinguished_name = common_name(cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server(_) => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, days);
        let key = KeyPair::generate().map_err(make(format!("the key of {cn}")))?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(make(format!("the certificate of {cn}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `issued` as `dir/STEM.pem` and `dir/STEM.key` (mode 0600); returns their paths.
pub fn write_issued(
    dir: &Path,
    stem: &str,
    issued: &Issued,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    write_private(&key, issued.key_pem.as_bytes())?;
    write_public(&cert, issued.cert_pem.as_bytes())?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_the_key_private_and_refuses_a_second_ca() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, "roost fleet CA").expect("init");
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca_dir.join(CA_CERT)), 0o644);
        assert!(matches!(
            init(&ca_dir, "again"),
            Err(PkiError::Exists { .. })
        ));
    }

    #[test]
    fn issues_client_and_server_certificates_the_ca_verifies() {
        let dir = tempfile::tempdir().expect("tmp");
        init(dir.path(), "roost fleet CA").expect("init");
        let ca = Ca::open(dir.path()).expect("open");
        let client = ca.issue("store-0042", &Usage::Client, 30).expect("client");
        let server = ca
            .issue(
                "broker",
                &Usage::Server(vec!["127.0.0.1".into(), "mqtt.example".into()]),
                30,
            )
            .expect("server");
        let (c, k) = write_issued(dir.path(), "store-0042", &client).expect("write");
        assert_eq!(mode(&k), 0o600);
        assert_eq!(mode(&c), 0o644);
        assert!(format!("{client:?}").contains("<redacted>"));
        assert!(!format!("{client:?}").contains("PRIVATE KEY"));

        // rustls verifies both against the CA: the client for client auth, the server for
        // its names.
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        roost_runtime::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der"))
            .expect("root");
        let roots = std::sync::Arc::new(roots);
        let now = UnixTime::now();
        let client_der = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).expect("der");
        rustls::server::WebPkiClientVerifier::builder(roots.clone())
            .build()
            .expect("verifier")
            .verify_client_cert(&client_der, &[], now)
            .expect("the client certificate verifies");
        let server_der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("der");
        let v = rustls::client::WebPkiServerVerifier::builder(roots)
            .build()
            .expect("verifier");
        for name in ["127.0.0.1", "mqtt.example"] {
            v.verify_server_cert(
                &server_der,
                &[],
                &ServerName::try_from(name).expect("name"),
                &[],
                now,
            )
            .expect("the server certificate verifies for its names");
        }
        assert!(v
            .verify_server_cert(
                &server_der,
                &[],
                &ServerName::try_from("other.example").expect("name"),
                &[],
                now
            )
            .is_err());
    }
}
