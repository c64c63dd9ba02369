//! Child processes of a demo or benchmark (brokers, bridges, Git servers).

/// A child process (a broker, a bridge, a Git server) that is killed and reaped when this
/// is dropped, so a benchmark or demo that fails half-way leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Spawns `cmd` with no stdin or stdout and its stderr into `log`.
    pub fn spawn(cmd: &mut std::process::Command, log: std::fs::File) -> std::io::Result<Self> {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(KillOnDrop(child))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
