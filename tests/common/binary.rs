//! The real `tiergate` binary on the fast model, for tests of process behaviour (signals,
//! log output) that an in-process server cannot show.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kills the process if a test ends early.
pub struct BinaryServer {
    pub child: Child,
    pub base: String,
    /// Every line the server wrote to stderr so far (its logs).
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// The address in the server's `listening` log line, text or JSON format.
fn listening_address(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    let at = line.find("address")? + "address".len();
    let rest = line[at..].trim_start_matches(['=', '"', ':']);
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
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
    /// Starts `tiergate serve` on port 0 and reads the bound address from its log;
    /// `configure` adds arguments and environment. Returns once `/ready` says 200.
    pub async fn start(configure: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path());
        let mut command = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null());
        configure(&mut command);
        command.stderr(Stdio::piped());
        let mut child = command.spawn().expect("start tiergate");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        // Reads stderr to its end (so the server never blocks on a full pipe) and hands
        // over the bound address once it is logged.
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = listening_address(&line) {
                    let _ = address_tx.send(address);
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs the address it listens on");
        let mut server = Self {
            child,
            base: format!("http://{address}"),
            log,
            reader: Some(reader),
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    /// Every stderr line, once the process has exited (waits for the reader to finish).
    pub fn log_lines(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log.lock().expect("log lock").clone()
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
