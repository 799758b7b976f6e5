//! Hot reload: a change to a policy file (or SIGHUP) rebuilds the policy. A policy with
//! problems is logged and counted and the one in force keeps serving.
//!
//! The directories holding the files are watched, not the files: an editor's save
//! (write a temporary file, rename it over the old one) and Kubernetes' ConfigMap update
//! (a new directory, then the `..data` symlink swapped to it) both replace the file
//! without touching it. Any event in a watched directory leads to reading the policy files
//! again; they are reloaded only when what they read changed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::PolicyStore;

/// Editors write a file in several events (truncate, write, rename); wait this long after
/// the first for the rest, then reload once.
const SETTLE: Duration = Duration::from_millis(200);

/// Reload outcomes, for the `policy_reloads_total` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    Rejected,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Rejected => "rejected",
        }
    }
}

/// Listens for SIGHUP and, with `watch_files`, changes to the policy files; runs until the
/// handle is aborted. `record` hears every outcome.
pub fn spawn(
    store: Arc<PolicyStore>,
    watch_files: bool,
    record: impl Fn(ReloadOutcome) + Send + 'static,
) -> notify::Result<JoinHandle<()>> {
    let dirs: HashSet<PathBuf> = store
        .watched_files()
        .iter()
        .filter_map(|f| watched_dir(f))
        .collect();
    // Unbounded is fine: the watcher thread only sends "something changed", and the task
    // drains everything pending on each reload.
    let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) {
            let _ = changed_tx.send(());
        }
    })?;
    if watch_files {
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
    }
    let mut seen = fingerprint(&store.watched_files());

    Ok(tokio::spawn(async move {
        // The watcher stops when dropped; this task owns it.
        let _watcher = watcher;
        let mut hangup = hangup_signal();
        loop {
            let reason = tokio::select! {
                Some(()) = changed_rx.recv() => "file changed",
                Some(()) = hangup.recv() => "SIGHUP",
                else => return,
            };
            tokio::time::sleep(SETTLE).await;
            while changed_rx.try_recv().is_ok() {}
            // Other files in the directory change too; reload only for the policy's own.
            let now = fingerprint(&store.watched_files());
            if reason == "file changed" && now == seen {
                continue;
            }
            seen = now;
            // Embedding new examples waits on the embedding thread: not on a worker.
            let reloading = store.clone();
            let reloaded = tokio::task::spawn_blocking(move || reloading.reload()).await;
            let Ok(reloaded) = reloaded else {
                tracing::error!(
                    reason,
                    "routing policy reload panicked; the previous one keeps serving"
                );
                record(ReloadOutcome::Rejected);
                continue;
            };
            match reloaded {
                Ok(()) => {
                    tracing::info!(reason, files = ?store.files(), "routing policy reloaded");
                    record(ReloadOutcome::Applied);
                }
                Err(problems) => {
                    tracing::error!(
                        reason,
                        "routing policy rejected, the previous one keeps serving:\n{problems}"
                    );
                    record(ReloadOutcome::Rejected);
                }
            }
        }
    }))
}

/// The directory a policy file is named in (not where a symlink leads: a ConfigMap swaps
/// the link inside this directory).
fn watched_dir(file: &Path) -> Option<PathBuf> {
    let dir = file.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    dir.canonicalize().ok()
}

/// What the policy files hold now, following symlinks; a file that cannot be read counts
/// as `None`, so its disappearance and return are changes too.
fn fingerprint(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}

/// SIGHUP as a channel; on other platforms a channel that never fires.
fn hangup_signal() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut hangups) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}
