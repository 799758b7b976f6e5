//! A scripted OpenAI-compatible upstream on 127.0.0.1:0, for fault injection into remote
//! tiers: it streams what its script says (tokens at a pace, nothing, an error status, a
//! connection cut mid-stream) and counts requests and the clients that left early.
//! The real path is tested against a second tiergate process; this one misbehaves on cue.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub enum Script {
    /// Streams these pieces `gap` apart, then a finish chunk, usage and `[DONE]`.
    Tokens { pieces: Vec<String>, gap: Duration },
    /// Sends its headers and the role chunk, then nothing, forever.
    NoFirstToken,
    /// Answers this status with an OpenAI error body.
    Status(u16),
    /// Streams this many pieces, then cuts the connection without finishing.
    DropAfter(usize),
    /// Streams this many pieces, then ends with `finish_reason: "abort"` (vLLM's and
    /// SGLang's word for a reply they gave up on) and `[DONE]`.
    AbortAfter(usize),
    /// Streams `count` pieces `gap` apart, each the Unix time in nanoseconds at which it
    /// was sent (for measuring what a proxy adds to each chunk's latency).
    Stamped { count: usize, gap: Duration },
    /// Calls two tools the way OpenAI streams it: each call's first delta carries its
    /// `id`, `type` and name, later deltas pieces of its `arguments`; then
    /// `finish_reason: "tool_calls"`, usage and `[DONE]`. See [`TOOL_CALLS`].
    ToolCalls,
}

/// The calls [`Script::ToolCalls`] makes, whole.
pub const TOOL_CALLS: [(&str, &str, &str); 2] = [
    (
        "call_weather_1",
        "get_weather",
        r#"{"city": "Paris", "unit": "celsius"}"#,
    ),
    ("call_time_2", "get_time", r#"{"timezone": "Europe/Paris"}"#),
];

/// Nanoseconds since the Unix epoch: what [`Script::Stamped`] pieces carry.
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Script {
    /// `n` pieces `word0 `, `word1 `, ... sent `gap_ms` apart.
    pub fn tokens(n: usize, gap_ms: u64) -> Self {
        Script::Tokens {
            pieces: (0..n).map(|i| format!("word{i} ")).collect(),
            gap: Duration::from_millis(gap_ms),
        }
    }
}

#[derive(Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    /// Responses whose body was dropped before it was sent to its end: the client (the
    /// gateway) closed the connection.
    pub disconnects: AtomicUsize,
    pub health_checks: AtomicUsize,
    pub last_body: Mutex<Option<Value>>,
}

struct Shared {
    script: Mutex<Script>,
    healthy: AtomicBool,
    seen: Arc<Seen>,
}

pub struct ScriptedUpstream {
    /// `http://127.0.0.1:port/v1`, as a fleet's `endpoints` entry.
    pub url: String,
    pub seen: Arc<Seen>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedUpstream {
    pub async fn start(script: Script) -> Self {
        let seen = Arc::new(Seen::default());
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            healthy: AtomicBool::new(true),
            seen: seen.clone(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/health", get(health))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let url = format!("http://{}/v1", listener.local_addr().expect("address"));
        // As a real server would: each chunk leaves at once instead of after an ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            seen,
            shared,
            task,
        }
    }

    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().expect("script lock") = script;
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    pub fn disconnects(&self) -> usize {
        self.seen.disconnects.load(Ordering::SeqCst)
    }

    /// The body of the last chat request it received.
    pub fn last_body(&self) -> Option<Value> {
        self.seen.last_body.lock().expect("body lock").clone()
    }
}

/// [`Script::ToolCalls`]' chunks after the role chunk, each call's arguments in three parts.
fn tool_call_chunks() -> Vec<Bytes> {
    let mut chunks = Vec::new();
    for (index, (id, name, arguments)) in TOOL_CALLS.iter().enumerate() {
        chunks.push(chunk(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        let third = arguments.len() / 3;
        for part in [
            &arguments[..third],
            &arguments[third..2 * third],
            &arguments[2 * third..],
        ] {
            chunks.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": part}}]}),
                None,
            ));
        }
    }
    let usage = json!({"id": "chatcmpl-upstream", "object": "chat.completion.chunk",
        "created": 0, "model": "upstream-model", "choices": [],
        "usage": {"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70}});
    chunks.push(chunk(json!({}), Some("tool_calls")));
    chunks.push(Bytes::from(format!("data: {usage}\n\n")));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    chunks
}

/// A URL nothing listens on: a port bound and released at once.
pub async fn refused_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let address = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{address}/v1")
}

async fn health(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.seen.health_checks.fetch_add(1, Ordering::SeqCst);
    if shared.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn chunk(delta: Value, finish_reason: Option<&str>) -> Bytes {
    let data = json!({
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    Bytes::from(format!("data: {data}\n\n"))
}

/// Counts a disconnect when dropped before `finished` is set: hyper drops a response
/// body whose connection closed.
struct BodyGuard {
    seen: Arc<Seen>,
    finished: bool,
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.seen.disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn chat(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    shared.seen.requests.fetch_add(1, Ordering::SeqCst);
    *shared.seen.last_body.lock().expect("body lock") = Some(body);
    let script = shared.script.lock().expect("script lock").clone();
    let role = chunk(json!({"role": "assistant", "content": ""}), None);
    let mut guard = BodyGuard {
        seen: shared.seen.clone(),
        finished: false,
    };
    let stream = match script {
        Script::Status(status) => {
            guard.finished = true;
            let status = StatusCode::from_u16(status).expect("a status");
            let error = json!({"error": {"message": "scripted failure", "type": "server_error"}});
            return (status, Json(error)).into_response();
        }
        Script::NoFirstToken => futures::stream::once(async move { Ok(role) })
            .chain(futures::stream::pending())
            // The guard lives as long as the stream: dropped when the client leaves.
            .map(move |item: Result<Bytes, std::io::Error>| {
                let _ = &guard;
                item
            })
            .boxed(),
        Script::DropAfter(n) => {
            let pieces: Vec<Result<Bytes, std::io::Error>> = std::iter::once(Ok(role))
                .chain((0..n).map(|i| Ok(chunk(json!({"content": format!("word{i} ")}), None))))
                .chain(std::iter::once(Err(std::io::Error::other("scripted cut"))))
                .collect();
            guard.finished = true;
            // Paced, so each piece is flushed to the client before the cut.
            futures::stream::iter(pieces)
                .then(|item| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    item
                })
                .boxed()
        }
        Script::AbortAfter(n) => {
            guard.finished = true;
            let pieces: Vec<Result<Bytes, std::io::Error>> = std::iter::once(Ok(role))
                .chain((0..n).map(|i| Ok(chunk(json!({"content": format!("word{i} ")}), None))))
                .chain(std::iter::once(Ok(chunk(json!({}), Some("abort")))))
                .chain(std::iter::once(Ok(Bytes::from_static(b"data: [DONE]\n\n"))))
                .collect();
            futures::stream::iter(pieces)
                .then(|item| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    item
                })
                .boxed()
        }
        Script::ToolCalls => {
            guard.finished = true;
            let chunks: Vec<Result<Bytes, std::io::Error>> = std::iter::once(role)
                .chain(tool_call_chunks())
                .map(Ok)
                .collect();
            futures::stream::iter(chunks)
                .then(|item| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    item
                })
                .boxed()
        }
        Script::Stamped { count, gap } => {
            guard.finished = true;
            let pieces = futures::stream::iter(0..count).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                Ok(chunk(
                    json!({"content": format!("{} ", unix_nanos())}),
                    None,
                ))
            });
            let tail = Bytes::from(
                [
                    chunk(json!({}), Some("stop")),
                    Bytes::from_static(b"data: [DONE]\n\n"),
                ]
                .concat(),
            );
            futures::stream::once(async move { Ok(role) })
                .chain(pieces)
                .chain(futures::stream::once(async move { Ok(tail) }))
                .boxed()
        }
        Script::Tokens { pieces, gap } => {
            let count = pieces.len();
            futures::stream::unfold(
                (pieces.into_iter(), Some(role), guard, false),
                move |(mut pieces, role, mut guard, done)| async move {
                    if done {
                        return None;
                    }
                    if let Some(role) = role {
                        return Some((Ok::<_, std::io::Error>(role), (pieces, None, guard, false)));
                    }
                    match pieces.next() {
                        Some(piece) => {
                            tokio::time::sleep(gap).await;
                            let data = chunk(json!({"content": piece}), None);
                            Some((Ok(data), (pieces, None, guard, false)))
                        }
                        None => {
                            guard.finished = true;
                            let usage = json!({"id": "chatcmpl-upstream", "object": "chat.completion.chunk",
                                "created": 0, "model": "upstream-model", "choices": [],
                                "usage": {"prompt_tokens": 11, "completion_tokens": count, "total_tokens": 11 + count}});
                            let tail = [
                                chunk(json!({}), Some("stop")),
                                Bytes::from(format!("data: {usage}\n\n")),
                                Bytes::from_static(b"data: [DONE]\n\n"),
                            ]
                            .concat();
                            Some((Ok(Bytes::from(tail)), (pieces, None, guard, true)))
                        }
                    }
                },
            )
            .boxed()
        }
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("a response")
}

/// An endpoint that accepts each connection, reads the request and closes without a
/// word, as a server does to a kept-alive connection it has just timed out; with the
/// number of connections it has taken.
pub async fn closing_endpoint() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let url = format!("http://{}/v1", listener.local_addr().expect("address"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buffer = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buffer).await;
            drop(socket);
        }
    });
    (url, accepted)
}
