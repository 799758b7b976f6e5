//! The `tiergate` binary as a child process of a benchmark: a process of its own, so that
//! its CPU time reads apart from the client's, and stopped when the handle is dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct GatewayProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// `tiergate serve --config CONFIG` on a free local port, its output discarded.
    /// `log_filter` sets `RUST_LOG`; `None` leaves the environment's (or the default).
    pub fn spawn(config: &Path, log_filter: Option<&str>) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(filter) = log_filter {
            command.env("RUST_LOG", filter);
        }
        Ok(Self {
            child: command.spawn()?,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Waits until `/ready` answers 200, polling every 50 ms.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let ready = client.get(format!("{}/ready", self.base)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the gateway was not ready within {within:?}")
    }

    /// CPU time (user and system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and
        // 13th of them, in USER_HZ (100 a second on Linux).
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }
}
