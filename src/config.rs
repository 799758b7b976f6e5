//! `config/tiergate.toml`: raw serde structs, then a validated [`Config`]. Every problem
//! (unknown keys included) is reported in one run, each with file, line and key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tomlfile::{Problem, Problems, TomlFile};

pub const DEFAULT_CONFIG_PATH: &str = "config/tiergate.toml";

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub router: RouterConfig,
    pub cache: CacheConfig,
    /// Empty: the API is open. Otherwise every request needs one of these keys.
    pub api_keys: Vec<ApiKeyConfig>,
    pub models: Vec<ModelConfig>,
    /// The sentence-embedding model for `similar_to` rules and `cache = "semantic"`;
    /// `None`: neither is available.
    pub embedding: Option<EmbeddingConfig>,
}

/// Bounds of the reply cache; when either is reached the least recently used go first.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Bounds of the semantic index (questions of `cache = "semantic"` routes).
    pub semantic_max_entries: usize,
    pub semantic_max_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct EmbeddingConfig {
    /// A sentence-transformers export: config.json, tokenizer.json, model.safetensors.
    pub model_dir: PathBuf,
    /// Texts embedded together in one forward pass at most.
    pub max_batch: usize,
}

#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    /// The secret itself (from `key`, or read from the variable `key_env` names).
    pub key: String,
    /// Shown to routing rules (`when.tenants`) and logs instead of the key.
    pub tenant: Option<String>,
    pub requests_per_minute: Option<u32>,
    /// Prompt tokens plus the completion tokens a request may generate.
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Policy files in order, resolved against the config's directory: their rules are
    /// tried in this order, later files' `[defaults]` override earlier ones.
    pub policies: Vec<PathBuf>,
    /// Reload the policies when a file changes (SIGHUP always reloads).
    pub watch: bool,
    /// Header a client may set to ask for a route (`when.hint` in a rule).
    pub hint_header: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub body_limit_bytes: usize,
    /// On SIGTERM, how long in-flight responses may take to finish before the process exits.
    pub drain_timeout_s: u64,
    /// A client must send a request's headers within this many seconds of starting it, or
    /// of the previous response on a kept-alive connection (which closes an idle one).
    pub header_read_timeout_s: u64,
    /// And its whole body within this many seconds.
    pub body_read_timeout_s: u64,
    /// Open connections at most; the next waits to be accepted until one closes.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The model id clients name in `model` and see in every response.
    pub id: String,
    pub tier: String,
    /// Absolute, or resolved against the directory of the config file.
    pub path: PathBuf,
    /// KV cells shared by all of this model's sequences.
    pub n_ctx: u32,
    /// Sequences decoded together in one step.
    pub slots: u32,
    /// Largest number of tokens in one decode call.
    pub batch: u32,
    /// Most prompt tokens one decode call carries while other sequences are generating:
    /// a long prefill in the same step delays every running stream's next token.
    pub prefill_chunk: u32,
    /// Keep a finished sequence's KV cells and reuse them for a prompt that starts with
    /// the same tokens (off by itself for unified KV). Sliding-window models reuse a
    /// prefix only while the slot still holds the window before the cut.
    pub prefix_cache: bool,
    pub n_gpu_layers: u32,
    /// CPU threads for decoding; defaults to the cores available.
    pub threads: u32,
    /// A llama.cpp built-in template name (e.g. `gemma`, `chatml`) used instead of the
    /// file's own template; required when the file has none.
    pub chat_template: Option<String>,
    /// Completion length when a request sets no `max_tokens`.
    pub max_tokens_default: u32,
    /// Requests accepted but not yet admitted; beyond this a request is refused with 503.
    pub queue_capacity: usize,
    /// One KV pool shared by every slot (a sequence may use all of `n_ctx`) instead of
    /// `n_ctx / slots` cells per slot. Shared pools make every token attend over every
    /// sequence's cells, which costs throughput at high concurrency.
    pub kv_unified: bool,
    /// Fault injection: sleep this long before every decode step that serves requests
    /// (not the start-up measurement), to drill degradation: a tier that stalls after
    /// start-up. 0 in production.
    pub fault_step_delay_ms: u64,
    /// Fault injection: the model thread panics on this decode step that serves requests
    /// (counting from 1), to drill a tier going down under traffic. 0 (off) in production.
    pub fault_panic_after_steps: u64,
    /// Fault injection for tests, not read from files: reuse a cached prefix even when the
    /// sliding window before the cut is gone, to show that the tests catch the damage.
    pub fault_reuse_past_window: bool,
    /// `Some`: a fleet of OpenAI-compatible endpoints serves this model, not llama.cpp in
    /// this process. Validation refuses the local-only keys on such a model, and `path`
    /// is empty.
    pub remote: Option<RemoteConfig>,
}

/// A model served by OpenAI-compatible engines elsewhere (llama-server, vLLM, SGLang,
/// another tiergate): `endpoints = [...]` in a `[[model]]` instead of `path`.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Base URLs that `/chat/completions` is appended to, e.g. `http://10.0.0.5:8000/v1`.
    pub endpoints: Vec<String>,
    /// The `model` sent upstream (what the engines call it); the `[[model]]` id by default.
    pub upstream_model: String,
    /// Sent as `Authorization: Bearer` (read from the variable `api_key_env` names).
    pub api_key: Option<String>,
    /// A GGUF whose vocabulary and template match the upstream model: prompt tokens are
    /// then counted exactly (its weights are not loaded). Without it they are estimated.
    pub tokenizer: Option<PathBuf>,
    /// Positions one request may use upstream, for refusing oversized prompts here;
    /// `None`: the upstream decides.
    pub context: Option<u32>,
    pub connect_timeout_ms: u64,
    /// One attempt's wait for its first token when the request's budget gives no sooner
    /// deadline; then the attempt is abandoned and another endpoint tried.
    pub first_token_timeout_ms: u64,
    /// Longest silence between two chunks once a reply is streaming.
    pub idle_timeout_ms: u64,
    /// Requests one endpoint may have in flight; when every endpoint has this many, the
    /// tier is full (503 or degrade, like a full local queue).
    pub max_outstanding: u32,
    /// Requests one endpoint runs at once (llama-server's `--parallel`, vLLM's
    /// `max_num_seqs`), if known: one with a free slot is preferred, even over prefix
    /// affinity, since beyond its slots a request waits a whole reply in its queue.
    pub slots: Option<u32>,
    /// GET this path on each endpoint's origin every `health_interval_ms` (empty: no
    /// active checks, passive ones only).
    pub health_path: String,
    pub health_interval_ms: u64,
    /// Consecutive failures that eject an endpoint (open its circuit breaker).
    pub failure_threshold: u32,
    /// How long an ejected endpoint gets no traffic before one trial request (half-open).
    pub eject_ms: u64,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    cache: RawCache,
    #[serde(default, rename = "api_key")]
    api_keys: Vec<RawApiKey>,
    #[serde(default, rename = "model")]
    models: Vec<RawModel>,
    embedding: Option<RawEmbedding>,
}

#[derive(Debug, Deserialize)]
struct RawEmbedding {
    model_dir: PathBuf,
    #[serde(default = "default_embed_batch")]
    max_batch: u64,
}

fn default_embed_batch() -> u64 {
    32
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawServer {
    listen: String,
    body_limit_bytes: u64,
    drain_timeout_s: u64,
    header_read_timeout_s: u64,
    body_read_timeout_s: u64,
    max_connections: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            body_limit_bytes: 1 << 20,
            drain_timeout_s: 30,
            header_read_timeout_s: 10,
            body_read_timeout_s: 30,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawCache {
    max_entries: u64,
    max_bytes: u64,
    semantic_max_entries: u64,
    semantic_max_bytes: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 64 << 20,
            semantic_max_entries: 10_000,
            semantic_max_bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawApiKey {
    key: Option<String>,
    key_env: Option<String>,
    tenant: Option<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawRouter {
    policies: Vec<PathBuf>,
    watch: bool,
    hint_header: String,
}

impl Default for RawRouter {
    fn default() -> Self {
        Self {
            policies: vec![PathBuf::from("../router-policies/default.toml")],
            watch: true,
            hint_header: "x-tiergate-route-hint".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawModel {
    id: String,
    tier: String,
    // Local models: a GGUF file run by llama.cpp in this process. Options, so that a
    // remote model setting one is told it has no effect there.
    path: Option<PathBuf>,
    n_ctx: Option<u32>,
    batch: Option<u32>,
    prefill_chunk: Option<u32>,
    prefix_cache: Option<bool>,
    n_gpu_layers: Option<u32>,
    threads: Option<u32>,
    queue_capacity: Option<u32>,
    kv_unified: Option<bool>,
    fault_step_delay_ms: Option<u64>,
    fault_panic_after_steps: Option<u64>,
    // Both kinds. `slots`: sequences decoded together here, or the endpoints' own.
    slots: Option<u32>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default = "defaults::max_tokens")]
    max_tokens_default: u32,
    // Remote models: a fleet of OpenAI-compatible endpoints.
    endpoints: Option<Vec<String>>,
    upstream_model: Option<String>,
    api_key_env: Option<String>,
    tokenizer: Option<PathBuf>,
    context: Option<u32>,
    connect_timeout_ms: Option<u64>,
    first_token_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_outstanding: Option<u32>,
    health_path: Option<String>,
    health_interval_ms: Option<u64>,
    failure_threshold: Option<u32>,
    eject_ms: Option<u64>,
}

mod defaults {
    pub fn n_ctx() -> u32 {
        8192
    }
    pub fn slots() -> u32 {
        8
    }
    pub fn batch() -> u32 {
        512
    }
    /// About half a second of prefill on a 2-core CPU (~280 prompt tokens/s with a small
    /// model), so streams keep flowing while a burst of prompts is admitted.
    pub fn prefill_chunk() -> u32 {
        128
    }
    pub fn enabled() -> bool {
        true
    }
    pub fn max_tokens() -> u32 {
        1024
    }
    pub fn queue_capacity() -> u32 {
        256
    }
}

impl ModelConfig {
    /// The most positions one sequence may use: its slot's share of `n_ctx` (all of it
    /// with a unified KV pool), capped by the context the model was trained on.
    pub fn context_per_sequence(&self, trained: u32) -> u32 {
        let cells = if self.kv_unified {
            self.n_ctx
        } else {
            self.n_ctx / self.slots
        };
        cells.min(trained)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, Problems> {
        let (raw, file) = TomlFile::load::<RawConfig>(path).map_err(Problems)?;
        raw.validate(&file).map_err(Problems)
    }

    /// Parses config text as if read from `path`; relative paths resolve against its directory.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Problems> {
        let (raw, file) = TomlFile::parse::<RawConfig>(path, text).map_err(Problems)?;
        raw.validate(&file).map_err(Problems)
    }

    /// Every tier some model serves, in config order.
    pub fn tiers(&self) -> Vec<String> {
        let mut tiers: Vec<String> = Vec::new();
        for model in &self.models {
            if !tiers.contains(&model.tier) {
                tiers.push(model.tier.clone());
            }
        }
        tiers
    }

    pub fn threads_available() -> u32 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    }
}

/// Problems found while validating, each with the file and line of its key.
struct Found<'a> {
    file: &'a TomlFile,
    problems: Vec<Problem>,
}

impl Found<'_> {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems
            .push(self.file.problem(key.into(), message.into()));
    }
}

impl RawConfig {
    /// Every section is checked, so one run reports every problem in the file.
    fn validate(self, file: &TomlFile) -> Result<Config, Vec<Problem>> {
        let base_dir = file.path.parent().unwrap_or(Path::new("."));
        let mut found = Found {
            file,
            problems: Vec::new(),
        };
        let server = self.server.validate(&mut found);
        let router = self.router.validate(base_dir, &mut found);
        let cache = self.cache.validate(&mut found);
        let api_keys = validate_api_keys(self.api_keys, &mut found);
        let models = validate_models(self.models, base_dir, &mut found);
        let embedding = self.embedding.map(|raw| {
            if raw.max_batch == 0 {
                found.add("embedding.max_batch", "must be at least 1");
            }
            EmbeddingConfig {
                model_dir: resolve(base_dir, raw.model_dir),
                max_batch: raw.max_batch as usize,
            }
        });
        match server {
            Some(server) if found.problems.is_empty() => Ok(Config {
                server,
                cache,
                api_keys,
                router,
                models,
                embedding,
            }),
            _ => Err(found.problems),
        }
    }
}

impl RawServer {
    fn validate(self, found: &mut Found<'_>) -> Option<ServerConfig> {
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                found.add(
                    "server.listen",
                    format!(
                        "`{}` is not an address like 127.0.0.1:8080 ({e})",
                        self.listen
                    ),
                )
            })
            .ok();
        if self.body_limit_bytes < 1024 {
            found.add("server.body_limit_bytes", "must be at least 1024");
        }
        for (key, value) in [
            ("server.header_read_timeout_s", self.header_read_timeout_s),
            ("server.body_read_timeout_s", self.body_read_timeout_s),
            ("server.max_connections", self.max_connections),
        ] {
            if value == 0 {
                found.add(key, "must be at least 1");
            }
        }
        Some(ServerConfig {
            listen: listen?,
            body_limit_bytes: self.body_limit_bytes as usize,
            drain_timeout_s: self.drain_timeout_s,
            header_read_timeout_s: self.header_read_timeout_s,
            body_read_timeout_s: self.body_read_timeout_s,
            max_connections: self.max_connections as usize,
        })
    }
}

impl RawRouter {
    fn validate(self, base_dir: &Path, found: &mut Found<'_>) -> RouterConfig {
        if self.policies.is_empty() {
            found.add("router.policies", "name at least one policy file");
        }
        if !self.hint_header.is_empty()
            && axum::http::HeaderName::from_bytes(self.hint_header.as_bytes()).is_err()
        {
            found.add(
                "router.hint_header",
                format!("`{}` is not a valid header name", self.hint_header),
            );
        }
        RouterConfig {
            policies: self
                .policies
                .into_iter()
                .map(|p| resolve(base_dir, p))
                .collect(),
            watch: self.watch,
            hint_header: self.hint_header.to_ascii_lowercase(),
        }
    }
}

impl RawCache {
    fn validate(self, found: &mut Found<'_>) -> CacheConfig {
        if self.max_entries == 0 {
            found.add(
                "cache.max_entries",
                "must be at least 1 (policies turn caching off with cache = \"off\")",
            );
        }
        CacheConfig {
            max_entries: self.max_entries as usize,
            max_bytes: self.max_bytes as usize,
            semantic_max_entries: self.semantic_max_entries as usize,
            semantic_max_bytes: self.semantic_max_bytes as usize,
        }
    }
}

fn validate_api_keys(raw_keys: Vec<RawApiKey>, found: &mut Found<'_>) -> Vec<ApiKeyConfig> {
    let mut api_keys = Vec::new();
    for (i, raw) in raw_keys.into_iter().enumerate() {
        let key = |field: &str| format!("api_key[{i}].{field}");
        let secret = match (raw.key, raw.key_env) {
            (Some(secret), None) => Some(secret),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(secret) => Some(secret),
                Err(_) => {
                    found.add(key("key_env"), format!("the variable `{var}` is not set"));
                    None
                }
            },
            _ => {
                found.add(key("key"), "set exactly one of `key` and `key_env`");
                None
            }
        };
        let Some(secret) = secret else { continue };
        if secret.trim().is_empty() {
            found.add(key("key"), "must not be empty");
        } else if api_keys
            .iter()
            .any(|k: &ApiKeyConfig| k.key == secret.trim())
        {
            found.add(key("key"), "the same key is listed twice");
        }
        for (field, value) in [
            ("requests_per_minute", raw.requests_per_minute),
            ("tokens_per_minute", raw.tokens_per_minute),
        ] {
            if value == Some(0) {
                found.add(key(field), "must be at least 1 (leave it out for no limit)");
            }
        }
        api_keys.push(ApiKeyConfig {
            key: secret.trim().to_owned(),
            tenant: raw.tenant,
            requests_per_minute: raw.requests_per_minute,
            tokens_per_minute: raw.tokens_per_minute,
        });
    }
    api_keys
}

fn validate_models(
    raw_models: Vec<RawModel>,
    base_dir: &Path,
    found: &mut Found<'_>,
) -> Vec<ModelConfig> {
    if raw_models.is_empty() {
        found.add("model", "at least one [[model]] is required");
    }
    let mut ids = HashSet::new();
    let mut models = Vec::new();
    for (i, raw) in raw_models.into_iter().enumerate() {
        let key = |field: &str| format!("model[{i}].{field}");
        if raw.id.trim().is_empty() || raw.id == "auto" {
            found.add(key("id"), "must be a non-empty name other than `auto`");
        } else if !ids.insert(raw.id.clone()) {
            found.add(key("id"), format!("`{}` is used by another model", raw.id));
        }
        if raw.tier.trim().is_empty() || raw.tier == "auto" {
            found.add(key("tier"), "must be a non-empty name other than `auto`");
        }
        if raw.max_tokens_default == 0 {
            found.add(key("max_tokens_default"), "must be at least 1");
        }
        if raw
            .chat_template
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            found.add(key("chat_template"), "must name a template or be left out");
        }
        let model = match (raw.path.is_some(), raw.endpoints.is_some()) {
            (true, false) => validate_local(raw, &key, base_dir, found),
            (false, true) => validate_remote(raw, &key, base_dir, found),
            _ => {
                found.add(
                    key("path"),
                    "set exactly one of `path` (a GGUF run here) and `endpoints` (OpenAI-compatible servers)",
                );
                continue;
            }
        };
        models.push(model);
    }
    models
}

impl RawModel {
    /// The keys only a local model takes, each with whether it is set.
    fn local_keys(&self) -> [(&'static str, bool); 10] {
        [
            ("n_ctx", self.n_ctx.is_some()),
            ("batch", self.batch.is_some()),
            ("prefill_chunk", self.prefill_chunk.is_some()),
            ("prefix_cache", self.prefix_cache.is_some()),
            ("n_gpu_layers", self.n_gpu_layers.is_some()),
            ("threads", self.threads.is_some()),
            ("queue_capacity", self.queue_capacity.is_some()),
            ("kv_unified", self.kv_unified.is_some()),
            ("fault_step_delay_ms", self.fault_step_delay_ms.is_some()),
            (
                "fault_panic_after_steps",
                self.fault_panic_after_steps.is_some(),
            ),
        ]
    }

    /// The keys only a remote model takes, each with whether it is set.
    fn remote_keys(&self) -> [(&'static str, bool); 12] {
        [
            ("upstream_model", self.upstream_model.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("tokenizer", self.tokenizer.is_some()),
            ("context", self.context.is_some()),
            ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
            (
                "first_token_timeout_ms",
                self.first_token_timeout_ms.is_some(),
            ),
            ("idle_timeout_ms", self.idle_timeout_ms.is_some()),
            ("max_outstanding", self.max_outstanding.is_some()),
            ("health_path", self.health_path.is_some()),
            ("health_interval_ms", self.health_interval_ms.is_some()),
            ("failure_threshold", self.failure_threshold.is_some()),
            ("eject_ms", self.eject_ms.is_some()),
        ]
    }
}

/// Reports each of `keys` that is set as a problem: it belongs to the other kind of model.
fn refuse_keys(
    found: &mut Found<'_>,
    key: &dyn Fn(&str) -> String,
    keys: &[(&'static str, bool)],
    why: &str,
) {
    for (field, _) in keys.iter().filter(|(_, set)| *set) {
        found.add(key(field), why);
    }
}

/// A GGUF run by llama.cpp in this process.
fn validate_local(
    raw: RawModel,
    key: &dyn Fn(&str) -> String,
    base_dir: &Path,
    found: &mut Found<'_>,
) -> ModelConfig {
    refuse_keys(
        found,
        key,
        &raw.remote_keys(),
        "applies to remote models (`endpoints`) only; this one has a `path`",
    );
    let n_ctx = raw.n_ctx.unwrap_or_else(defaults::n_ctx);
    let slots = raw.slots.unwrap_or_else(defaults::slots);
    let batch = raw.batch.unwrap_or_else(defaults::batch);
    let prefill_chunk = raw.prefill_chunk.unwrap_or_else(defaults::prefill_chunk);
    let queue_capacity = raw.queue_capacity.unwrap_or_else(defaults::queue_capacity);
    let kv_unified = raw.kv_unified.unwrap_or(false);
    if n_ctx < 64 {
        found.add(key("n_ctx"), "must be at least 64");
    }
    if !(1..=256).contains(&slots) {
        found.add(key("slots"), "must be between 1 and 256");
    }
    if batch < slots.max(1) {
        found.add(
            key("batch"),
            format!(
                "must be at least `slots` ({slots}), so every generating sequence fits one step"
            ),
        );
    }
    if prefill_chunk == 0 {
        found.add(key("prefill_chunk"), "must be at least 1");
    }
    if !kv_unified && slots > 0 && n_ctx / slots < 64 {
        found.add(
            key("n_ctx"),
            format!(
                "{n_ctx} cells over {slots} slots leaves each slot {} (at least 64 needed; raise n_ctx or set kv_unified)",
                n_ctx / slots
            ),
        );
    }
    if raw.threads == Some(0) {
        found.add(
            key("threads"),
            "must be at least 1 (leave it out to use every core)",
        );
    }
    if queue_capacity == 0 {
        found.add(key("queue_capacity"), "must be at least 1");
    }
    ModelConfig {
        id: raw.id,
        tier: raw.tier,
        path: resolve(base_dir, raw.path.unwrap_or_default()),
        n_ctx,
        slots,
        batch,
        prefill_chunk,
        prefix_cache: raw.prefix_cache.unwrap_or_else(defaults::enabled),
        n_gpu_layers: raw.n_gpu_layers.unwrap_or(0),
        threads: raw.threads.unwrap_or_else(Config::threads_available),
        chat_template: raw.chat_template,
        max_tokens_default: raw.max_tokens_default,
        queue_capacity: queue_capacity as usize,
        kv_unified,
        fault_step_delay_ms: raw.fault_step_delay_ms.unwrap_or(0),
        fault_panic_after_steps: raw.fault_panic_after_steps.unwrap_or(0),
        fault_reuse_past_window: false,
        remote: None,
    }
}

/// A fleet of OpenAI-compatible endpoints.
fn validate_remote(
    raw: RawModel,
    key: &dyn Fn(&str) -> String,
    base_dir: &Path,
    found: &mut Found<'_>,
) -> ModelConfig {
    refuse_keys(
        found,
        key,
        &raw.local_keys(),
        "applies to local models (`path`) only; the endpoints' servers set their own",
    );
    let mut endpoints = Vec::new();
    for url in raw.endpoints.unwrap_or_default() {
        let trimmed = url.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&trimmed) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {
                if endpoints.contains(&trimmed) {
                    found.add(key("endpoints"), format!("`{url}` is listed twice"));
                }
                endpoints.push(trimmed);
            }
            Ok(_) => found.add(
                key("endpoints"),
                format!("`{url}` is not an http(s) URL like http://10.0.0.5:8000/v1"),
            ),
            Err(e) => found.add(
                key("endpoints"),
                format!("`{url}` is not a URL like http://10.0.0.5:8000/v1 ({e})"),
            ),
        }
    }
    if endpoints.is_empty() && !found.problems.iter().any(|p| p.key == key("endpoints")) {
        found.add(key("endpoints"), "list at least one endpoint");
    }
    let api_key = raw.api_key_env.and_then(|var| match std::env::var(&var) {
        Ok(secret) if !secret.trim().is_empty() => Some(secret.trim().to_owned()),
        _ => {
            found.add(
                key("api_key_env"),
                format!("the variable `{var}` is not set (or empty)"),
            );
            None
        }
    });
    // Bounded above too: a deadline a day away is no deadline, and a larger one would
    // overflow the clock's arithmetic.
    let positive = |found: &mut Found<'_>, field: &str, value: Option<u64>, default: u64| {
        let value = value.unwrap_or(default);
        if !(1..=86_400_000).contains(&value) {
            found.add(key(field), "must be between 1 and 86400000");
        }
        value
    };
    let connect_timeout_ms = positive(found, "connect_timeout_ms", raw.connect_timeout_ms, 2_000);
    let first_token_timeout_ms = positive(
        found,
        "first_token_timeout_ms",
        raw.first_token_timeout_ms,
        60_000,
    );
    let idle_timeout_ms = positive(found, "idle_timeout_ms", raw.idle_timeout_ms, 60_000);
    let health_interval_ms = positive(found, "health_interval_ms", raw.health_interval_ms, 5_000);
    let eject_ms = positive(found, "eject_ms", raw.eject_ms, 10_000);
    let max_outstanding = positive(
        found,
        "max_outstanding",
        raw.max_outstanding.map(u64::from),
        1024,
    ) as u32;
    let failure_threshold = positive(
        found,
        "failure_threshold",
        raw.failure_threshold.map(u64::from),
        3,
    ) as u32;
    if raw.slots == Some(0) {
        found.add(
            key("slots"),
            "must be at least 1 (leave it out when not known)",
        );
    }
    if raw.context == Some(0) {
        found.add(
            key("context"),
            "must be at least 1 (leave it out to let the upstream decide)",
        );
    }
    let health_path = raw.health_path.unwrap_or_else(|| "/health".into());
    if !health_path.is_empty() && !health_path.starts_with('/') {
        found.add(
            key("health_path"),
            "must start with `/` (it is joined to each endpoint's origin), or be empty for no active checks",
        );
    }
    let upstream_model = raw.upstream_model.unwrap_or_else(|| raw.id.clone());
    ModelConfig {
        id: raw.id,
        tier: raw.tier,
        path: PathBuf::new(),
        n_ctx: 0,
        slots: 0,
        batch: 0,
        prefill_chunk: 0,
        prefix_cache: false,
        n_gpu_layers: 0,
        threads: 0,
        chat_template: raw.chat_template,
        max_tokens_default: raw.max_tokens_default,
        queue_capacity: 0,
        kv_unified: false,
        fault_step_delay_ms: 0,
        fault_panic_after_steps: 0,
        fault_reuse_past_window: false,
        remote: Some(RemoteConfig {
            endpoints,
            upstream_model,
            api_key,
            tokenizer: raw.tokenizer.map(|path| resolve(base_dir, path)),
            context: raw.context,
            connect_timeout_ms,
            first_token_timeout_ms,
            idle_timeout_ms,
            max_outstanding,
            slots: raw.slots,
            health_path,
            health_interval_ms,
            failure_threshold,
            eject_ms,
        }),
    }
}

/// Relative paths in config are relative to the config file, not the working directory.
/// `dir/..` pairs are folded so messages show `router-policies/x.toml`, not
/// `config/../router-policies/x.toml` (lexically: the default paths hold no symlinks).
fn resolve(base_dir: &Path, path: PathBuf) -> PathBuf {
    use std::path::Component;
    let joined = if path.is_absolute() {
        path
    } else {
        base_dir.join(path)
    };
    let mut folded = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::ParentDir
                if matches!(folded.components().next_back(), Some(Component::Normal(_))) =>
            {
                folded.pop();
            }
            Component::CurDir => {}
            other => folded.push(other),
        }
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[model]]
id = "small"
tier = "fast"
path = "small.gguf"
"#;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(Path::new("/etc/tiergate/tiergate.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths_against_the_file() {
        let config = parse(MINIMAL).expect("valid");
        let model = &config.models[0];
        assert_eq!(model.path, Path::new("/etc/tiergate/small.gguf"));
        assert_eq!(model.slots, 8);
        assert_eq!(model.threads, Config::threads_available());
        assert_eq!(config.server.listen.port(), 8080);
        assert_eq!(
            config.router.policies,
            [Path::new("/etc/router-policies/default.toml")]
        );
        assert_eq!(config.tiers(), ["fast"]);
    }

    #[test]
    fn unknown_key_is_an_error_naming_key_and_line() {
        let text = MINIMAL.replace("tier = \"fast\"\npath", "tier = \"fast\"\nslot = 3\npath");
        let problems = parse(&text).expect_err("unknown key").0;
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].to_string(),
            "/etc/tiergate/tiergate.toml:5: model[0].slot: unknown key"
        );
    }

    #[test]
    fn every_bad_value_is_reported_in_one_run_with_lines() {
        let text = r#"
[server]
listen = "nowhere"

[[model]]
id = "a"
tier = "fast"
path = "a.gguf"
slots = 0
threads = 0
"#;
        let problems = parse(text).expect_err("invalid").0;
        let shown: Vec<(Option<usize>, &str)> =
            problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            shown,
            [
                (Some(3), "server.listen"),
                (Some(9), "model[0].slots"),
                (Some(10), "model[0].threads"),
            ]
        );
    }

    #[test]
    fn api_keys_take_their_secret_from_the_file_or_the_environment() {
        let text = format!(
            "{MINIMAL}\n[[api_key]]\nkey = \"sk-a\"\ntenant = \"acme\"\nrequests_per_minute = 60\n\n[[api_key]]\nkey_env = \"TIERGATE_TEST_UNSET_KEY_VAR\"\n"
        );
        let problems = parse(&text).expect_err("unset variable").0;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "api_key[1].key_env");
        assert_eq!(problems[0].line, Some(13));

        let text = format!("{MINIMAL}\n[[api_key]]\nkey = \"sk-a\"\ntenant = \"acme\"\n");
        let config = parse(&text).expect("valid");
        assert_eq!(config.api_keys[0].key, "sk-a");
        assert_eq!(config.api_keys[0].tenant.as_deref(), Some("acme"));
    }

    #[test]
    fn keys_that_differ_only_by_surrounding_whitespace_are_duplicates() {
        let text =
            format!("{MINIMAL}\n[[api_key]]\nkey = \"sk-a\"\n\n[[api_key]]\nkey = \" sk-a \"\n");
        let problems = parse(&text).expect_err("duplicate").0;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "api_key[1].key");
        assert_eq!(problems[0].message, "the same key is listed twice");
    }

    #[test]
    fn duplicate_model_ids_are_rejected() {
        let text =
            format!("{MINIMAL}\n[[model]]\nid = \"small\"\ntier = \"full\"\npath = \"b.gguf\"\n");
        let problems = parse(&text).expect_err("duplicate").0;
        assert_eq!(problems[0].key, "model[1].id", "{problems:?}");
    }

    const REMOTE: &str = r#"
[[model]]
id = "big"
tier = "full"
endpoints = ["http://10.0.0.5:8000/v1/", "https://gpu-2.internal/v1"]
"#;

    #[test]
    fn a_remote_model_gets_its_endpoints_and_defaults() {
        let config = parse(&format!("{MINIMAL}{REMOTE}")).expect("valid");
        assert_eq!(config.tiers(), ["fast", "full"]);
        assert!(config.models[0].remote.is_none());
        let remote = config.models[1].remote.as_ref().expect("remote");
        assert_eq!(
            remote.endpoints,
            ["http://10.0.0.5:8000/v1", "https://gpu-2.internal/v1"]
        );
        assert_eq!(remote.upstream_model, "big");
        assert_eq!(remote.health_path, "/health");
        assert_eq!(remote.failure_threshold, 3);
        assert!(remote.tokenizer.is_none() && remote.context.is_none());
    }

    #[test]
    fn a_model_is_local_or_remote_and_takes_only_its_own_keys() {
        let both = REMOTE.replace("tier = \"full\"", "tier = \"full\"\npath = \"x.gguf\"");
        let problems = parse(&both).expect_err("both").0;
        assert_eq!(problems[0].key, "model[0].path", "{problems:?}");

        let batch_on_remote = format!("{REMOTE}batch = 4\n");
        let problems = parse(&batch_on_remote).expect_err("local key").0;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "model[0].batch");
        assert_eq!(problems[0].line, Some(6));

        let endpoint_key_on_local = format!("{MINIMAL}eject_ms = 5\n");
        let problems = parse(&endpoint_key_on_local).expect_err("remote key").0;
        assert_eq!(problems[0].key, "model[0].eject_ms", "{problems:?}");
    }

    #[test]
    fn endpoints_must_be_http_urls_listed_once() {
        let text = r#"
[[model]]
id = "big"
tier = "full"
endpoints = ["10.0.0.5:8000", "ftp://x/v1", "http://a/v1", "http://a/v1/"]
health_path = "health"
"#;
        let problems = parse(text).expect_err("bad endpoints").0;
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(problems.len(), 4, "{messages:?}");
        assert!(messages[0].contains("`10.0.0.5:8000`"), "{messages:?}");
        assert!(messages[1].contains("`ftp://x/v1` is not an http(s) URL"));
        assert!(messages[2].contains("listed twice"));
        assert_eq!(problems[3].key, "model[0].health_path");
    }
}
