//! The real `tiergate` binary on the fast model, for tests of process behaviour (signals,
//! log output) that an in-process server cannot show.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Kills the process if a test ends early.
pub struct BinaryServer {
    pub child: Child,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A free port: bind port 0, read it, let it go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn write_config(dir: &Path) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let path = dir.join("tiergate.toml");
    let mut file = std::fs::File::create(&path).expect("config file");
    write!(
        file,
        r#"
[server]
drain_timeout_s = 60

[router]
policies = ["{root}/tests/fixtures/fast-only.toml"]
watch = false

[[model]]
id = "smollm2-135m-instruct"
tier = "fast"
path = "{root}/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 4096
slots = 4
threads = 1
"#
    )
    .expect("write config");
    path
}

impl BinaryServer {
    /// Starts `tiergate serve` on a free port; `configure` adds arguments, environment and
    /// where stderr goes. Returns once `/ready` says 200.
    pub async fn start(configure: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path());
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        configure(&mut command);
        let mut server = Self {
            child: command.spawn().expect("start tiergate"),
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = client.get(format!("{}/ready", self.base)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "not ready within 120 s");
            assert!(
                self.child.try_wait().expect("status").is_none(),
                "exited early"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn sigterm(&self) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
    }

    /// Waits for the process to exit on its own.
    pub async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let exit_by = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("status") {
                return status;
            }
            assert!(Instant::now() < exit_by, "did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
