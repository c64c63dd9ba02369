//! `roost ca`: the fleet's certificate authority for mutual TLS (`init`), and certificates
//! for the identities that are not stores (`issue`: the controller, a broker).

use std::path::PathBuf;

use roost_fleet::{pki, seal};

/// `roost ca` subcommands.
#[derive(clap::Subcommand)]
pub enum CaCmd {
    /// Make a new CA: DIR/ca.pem (give it to brokers as `cafile` and to clients as their CA
    /// file) and DIR/ca.key (mode 0600; keep it offline: whoever has it can make identities),
    /// and the fleet's sealing key for sealed secrets: DIR/sealing-identity.txt (mode 0600)
    /// and DIR/sealing-recipient.txt. Refuses a directory that already holds a CA.
    Init(InitArgs),
    /// Issue a certificate and key (mode 0600) for an identity that is not a store:
    /// `roost-controller` for `roost fleet`/`rollout`, or a broker with `--server NAMES`.
    /// Stores get theirs from `roost store enroll`.
    Issue(IssueArgs),
}

/// Arguments of `roost ca init`.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Directory for ca.pem and ca.key (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// The CA's Common Name.
    #[arg(long, default_value = "roost fleet CA")]
    name: String,
}

/// Arguments of `roost ca issue`.
#[derive(clap::Args)]
pub struct IssueArgs {
    /// The Common Name: the identity the broker's ACL sees (`roost-controller`, or the
    /// broker's own name).
    name: String,
    /// The CA directory (`roost ca init --dir`).
    #[arg(long)]
    ca: PathBuf,
    /// Directory for NAME.pem and NAME.key (created if missing; existing files are not
    /// replaced).
    #[arg(long)]
    out: PathBuf,
    /// A server certificate for these DNS names and IP addresses (comma-separated) instead
    /// of a client certificate.
    #[arg(long, value_delimiter = ',')]
    server: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = pki::LEAF_DAYS)]
    days: u32,
}

pub fn run(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init(a) => {
            let cert = pki::init(&a.dir, &a.name)?;
            let recipient = seal::init_sealing_key(&a.dir)?;
            println!(
                "CA certificate {}\nCA key {} (mode 0600; keep it offline)\nsealing key {} (mode 0600; `roost secret reseal` needs it), recipient {recipient}",
                cert.display(),
                a.dir.join(pki::CA_KEY).display(),
                a.dir.join(seal::SEALING_IDENTITY).display(),
            );
        }
        CaCmd::Issue(a) => {
            // The name is also a file name.
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if a.name.is_empty() || a.name.starts_with('.') || !a.name.chars().all(plain) {
                anyhow::bail!("{:?}: a name of letters, digits, '-', '.' and '_'", a.name);
            }
            let ca = pki::Ca::open(&a.ca)?;
            let usage = if a.server.is_empty() {
                pki::Usage::Client
            } else {
                pki::Usage::Server(a.server)
            };
            let issued = ca.issue(&a.name, &usage, a.days)?;
            std::fs::create_dir_all(&a.out)?;
            let (cert, key) = pki::write_issued(&a.out, &a.name, &issued)?;
            println!(
                "certificate {}\nkey {} (mode 0600)",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}
