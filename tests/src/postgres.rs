//! A real PostgreSQL server for the tests: a cluster made by `initdb` in a temporary
//! directory and started with `pg_ctl` on a free loopback port, its Unix socket in that
//! directory (never the system's service). `initdb` refuses to run as root: as root (CI) the
//! cluster belongs to `nobody` and its tools run through `runuser`. Stopped (immediately)
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixtures::skip_unless_ci;

/// The directory of `initdb` and `pg_ctl`, or None when `test` may be skipped (absent, and
/// not under CI; `.ci/run` installs Debian's `postgresql`).
pub fn postgres_bin(test: &str) -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/local/bin")];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = dirs.flatten().map(|d| d.path().join("bin")).collect();
        v.sort();
        v.reverse(); // the newest first
        candidates.extend(v);
    }
    let found = candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    if found.is_none() {
        skip_unless_ci(
            &format!("PostgreSQL is not installed, and CI must run {test} (.ci/run installs it)"),
            &format!("SKIPPED {test}: PostgreSQL is not installed (apt-get install -y postgresql)"),
        );
    }
    found
}

fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// A PostgreSQL cluster of the test; its superuser is `roost`, trusted on loopback.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Postgres {
    /// `initdb` and `pg_ctl start` (blocking, a few seconds).
    pub fn start(bin: &Path) -> Postgres {
        let dir = tempfile::tempdir().expect("tmp");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown the cluster's directory to nobody");
        }
        let pg = Postgres {
            bin: bin.to_owned(),
            port: 0,
            dir,
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "roost",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let mut pg = pg;
        // A port taken between choosing it and the server's bind fails the start: try again.
        for attempt in 0..5 {
            let port = roost_broker::free_port().expect("port");
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
                pg.dir.path().display()
            );
            let log = pg.dir.path().join("postgres.log");
            let ok = pg.try_run(
                "pg_ctl",
                &[
                    "-D",
                    &data.display().to_string(),
                    "-o",
                    &opts,
                    "-l",
                    &log.display().to_string(),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            );
            if ok {
                pg.port = port;
                return pg;
            }
            eprintln!(
                "postgres start attempt {attempt} failed:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("PostgreSQL did not start");
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> bool {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if !out.status.success() {
            eprintln!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        assert!(self.try_run(tool, args), "{tool} failed");
    }

    /// The URL of database `db` (which [`Postgres::create`] made).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://roost@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (blocking: on a thread of its own, as the blocking client
    /// must not run on an async task).
    pub fn create(&self, name: &str) -> String {
        let admin = self.url("postgres");
        let sql = format!("CREATE DATABASE \"{name}\"");
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls).expect("connect");
            c.batch_execute(&sql).expect("create database");
        })
        .join()
        .expect("create database thread");
        self.url(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
