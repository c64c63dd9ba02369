//! `roost keygen`: an Ed25519 signing key pair.

use std::path::PathBuf;

use roost_fleet::cloud;

/// Arguments of `roost keygen`.
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Directory for KEYID.key and KEYID.pub.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

pub fn run(a: KeygenArgs) -> anyhow::Result<()> {
    let (id, public) = cloud::keygen(&a.dir)?;
    println!(
        "key id {id}\nprivate key {}\n",
        a.dir.join(format!("{id}.key")).display()
    );
    println!("# agent configuration:\n[[trusted_keys]]\nid = \"{id}\"\npublic_key = \"{public}\"");
    Ok(())
}
