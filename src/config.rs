//! `config/tiergate.toml`: raw serde structs that reject unknown keys, then a validated
//! [`Config`]. Every problem is reported in one run, each naming the file and the key.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "config/tiergate.toml";

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub body_limit_bytes: usize,
    /// The tier that `model: "auto"` resolves to.
    pub default_tier: String,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default, rename = "model")]
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    body_limit_bytes: u64,
    default_tier: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            body_limit_bytes: 1 << 20,
            default_tier: "fast".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    tier: String,
    path: PathBuf,
    #[serde(default = "defaults::n_ctx")]
    n_ctx: u32,
    #[serde(default = "defaults::slots")]
    slots: u32,
    #[serde(default = "defaults::batch")]
    batch: u32,
    #[serde(default)]
    n_gpu_layers: u32,
    #[serde(default)]
    threads: Option<u32>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default = "defaults::max_tokens")]
    max_tokens_default: u32,
    #[serde(default = "defaults::queue_capacity")]
    queue_capacity: u32,
    #[serde(default)]
    kv_unified: bool,
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
    pub fn max_tokens() -> u32 {
        1024
    }
    pub fn queue_capacity() -> u32 {
        256
    }
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{file}: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|problems| ConfigError {
            file: path.to_owned(),
            problems,
        })
    }

    /// Parses config text; relative model paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, Vec<String>> {
        // toml's message already carries line, column and the offending key.
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        raw.validate(base_dir)
    }

    pub fn threads_available() -> u32 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    }
}

impl RawConfig {
    fn validate(self, base_dir: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();

        let listen = self
            .server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problems.push(format!(
                    "server.listen: `{}` is not an address like 127.0.0.1:8080 ({e})",
                    self.server.listen
                ))
            })
            .ok();
        if self.server.body_limit_bytes < 1024 {
            problems.push("server.body_limit_bytes: must be at least 1024".into());
        }
        if self.models.is_empty() {
            problems.push("model: at least one [[model]] is required".into());
        }

        let mut ids = HashSet::new();
        let mut models = Vec::new();
        for (i, raw) in self.models.into_iter().enumerate() {
            let key = |field: &str| format!("model[{i}].{field}");
            if raw.id.trim().is_empty() || raw.id == "auto" {
                problems.push(format!(
                    "{}: must be a non-empty name other than `auto`",
                    key("id")
                ));
            } else if !ids.insert(raw.id.clone()) {
                problems.push(format!(
                    "{}: `{}` is used by another model",
                    key("id"),
                    raw.id
                ));
            }
            if raw.tier.trim().is_empty() || raw.tier == "auto" {
                problems.push(format!(
                    "{}: must be a non-empty name other than `auto`",
                    key("tier")
                ));
            }
            if raw.n_ctx < 64 {
                problems.push(format!("{}: must be at least 64", key("n_ctx")));
            }
            if !(1..=256).contains(&raw.slots) {
                problems.push(format!("{}: must be between 1 and 256", key("slots")));
            }
            if raw.batch < raw.slots.max(1) {
                problems.push(format!(
                    "{}: must be at least `slots` ({}), so every generating sequence fits one step",
                    key("batch"),
                    raw.slots
                ));
            }
            if !raw.kv_unified && raw.slots > 0 && raw.n_ctx / raw.slots < 64 {
                problems.push(format!(
                    "{}: {} cells over {} slots leaves each slot {} (at least 64 needed; raise n_ctx or set kv_unified)",
                    key("n_ctx"),
                    raw.n_ctx,
                    raw.slots,
                    raw.n_ctx / raw.slots
                ));
            }
            if raw.threads == Some(0) {
                problems.push(format!(
                    "{}: must be at least 1 (leave it out to use every core)",
                    key("threads")
                ));
            }
            if raw.max_tokens_default == 0 {
                problems.push(format!("{}: must be at least 1", key("max_tokens_default")));
            }
            if raw.queue_capacity == 0 {
                problems.push(format!("{}: must be at least 1", key("queue_capacity")));
            }
            if raw
                .chat_template
                .as_deref()
                .is_some_and(|t| t.trim().is_empty())
            {
                problems.push(format!(
                    "{}: must name a template or be left out",
                    key("chat_template")
                ));
            }
            let path = if raw.path.is_absolute() {
                raw.path
            } else {
                base_dir.join(raw.path)
            };
            models.push(ModelConfig {
                id: raw.id,
                tier: raw.tier,
                path,
                n_ctx: raw.n_ctx,
                slots: raw.slots,
                batch: raw.batch,
                n_gpu_layers: raw.n_gpu_layers,
                threads: raw.threads.unwrap_or_else(Config::threads_available),
                chat_template: raw.chat_template,
                max_tokens_default: raw.max_tokens_default,
                queue_capacity: raw.queue_capacity as usize,
                kv_unified: raw.kv_unified,
            });
        }

        if !models.is_empty() && !models.iter().any(|m| m.tier == self.server.default_tier) {
            let tiers: Vec<_> = models.iter().map(|m| m.tier.as_str()).collect();
            problems.push(format!(
                "server.default_tier: `{}` is not the tier of any model (tiers: {})",
                self.server.default_tier,
                tiers.join(", ")
            ));
        }

        match listen {
            Some(listen) if problems.is_empty() => Ok(Config {
                server: ServerConfig {
                    listen,
                    body_limit_bytes: self.server.body_limit_bytes as usize,
                    default_tier: self.server.default_tier,
                },
                models,
            }),
            _ => Err(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
default_tier = "fast"

[[model]]
id = "small"
tier = "fast"
path = "small.gguf"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths_against_the_file() {
        let config = Config::parse(MINIMAL, Path::new("/etc/tiergate")).expect("valid");
        let model = &config.models[0];
        assert_eq!(model.path, Path::new("/etc/tiergate/small.gguf"));
        assert_eq!(model.slots, 8);
        assert_eq!(model.threads, Config::threads_available());
        assert_eq!(config.server.listen.port(), 8080);
    }

    #[test]
    fn unknown_key_is_an_error_naming_key_and_line() {
        let text = MINIMAL.replace("tier = \"fast\"\npath", "tier = \"fast\"\nslot = 3\npath");
        let problems = Config::parse(&text, Path::new(".")).expect_err("unknown key");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("unknown field `slot`"),
            "{}",
            problems[0]
        );
        assert!(problems[0].contains("line 8"), "{}", problems[0]);
    }

    #[test]
    fn every_bad_value_is_reported_in_one_run() {
        let text = r#"
[server]
listen = "nowhere"
default_tier = "huge"

[[model]]
id = "a"
tier = "fast"
path = "a.gguf"
slots = 0
threads = 0
"#;
        let problems = Config::parse(text, Path::new(".")).expect_err("invalid");
        let joined = problems.join("\n");
        for key in [
            "server.listen",
            "model[0].slots",
            "model[0].threads",
            "server.default_tier",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn duplicate_model_ids_are_rejected() {
        let text =
            format!("{MINIMAL}\n[[model]]\nid = \"small\"\ntier = \"full\"\npath = \"b.gguf\"\n");
        let problems = Config::parse(&text, Path::new(".")).expect_err("duplicate");
        assert!(problems[0].contains("model[1].id"), "{problems:?}");
    }

    #[test]
    fn error_display_prefixes_each_problem_with_the_file() {
        let err = ConfigError {
            file: PathBuf::from("config/x.toml"),
            problems: vec!["a: bad".into(), "b: worse".into()],
        };
        assert_eq!(
            err.to_string(),
            "config/x.toml: a: bad\nconfig/x.toml: b: worse"
        );
    }
}
