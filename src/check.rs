//! Offline tools for operators: `tiergate check` (validate config and policies) and
//! `tiergate route` (explain a routing decision without a server).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use crate::api::types::parse_chat_request;
use crate::chat::{ChatMessage, ChatRequest, Role};
use crate::config::{Config, ModelConfig};
use crate::engine::prompt::Prompter;
use crate::engine::{
    Engine, EngineError, Forecast, GenerationRequest, Health, ModelInfo, PromptLimits, TokenStream,
};
use crate::gateway::{self, Explained};
use crate::router::{Caller, Policy};
use crate::tiers::Tiers;
use crate::tomlfile::{Problem, Problems};

/// Validates the config, the model files it names and every policy file; all problems at
/// once. On success, a one-line summary.
pub fn check(config_path: &Path) -> Result<String, Problems> {
    let config = Config::load(config_path)?;
    let mut problems = Vec::new();
    for (i, model) in config.models.iter().enumerate() {
        if let Some(remote) = &model.remote {
            if let Some(tokenizer) = remote.tokenizer.as_ref().filter(|p| !p.is_file()) {
                problems.push(Problem {
                    file: config_path.to_owned(),
                    line: None,
                    key: format!("model[{i}].tokenizer"),
                    message: format!("{} does not exist", tokenizer.display()),
                });
            }
            continue;
        }
        if !model.path.is_file() {
            problems.push(Problem {
                file: config_path.to_owned(),
                line: None,
                key: format!("model[{i}].path"),
                message: format!(
                    "{} does not exist (run `just models` for the defaults)",
                    model.path.display()
                ),
            });
        }
    }
    if let Some(embedding) = &config.embedding {
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !embedding.model_dir.join(file).is_file() {
                problems.push(Problem {
                    file: config_path.to_owned(),
                    line: None,
                    key: "embedding.model_dir".into(),
                    message: format!(
                        "{} has no {file} (run `just models` for the default)",
                        embedding.model_dir.display()
                    ),
                });
            }
        }
    }
    let policy = Policy::load(&config.router.policies, &config.tiers());
    if let (Ok(policy), None) = (&policy, &config.embedding) {
        problems.extend(crate::router::meaning_without_embedder(policy));
    }
    match policy {
        Ok(policy) if problems.is_empty() => {
            let mut summary = format!(
                "ok: {} model(s) in {} tier(s); {} rule(s) in {} policy file(s)",
                config.models.len(),
                config.tiers().len(),
                policy.rules.len(),
                policy.files.len()
            );
            for model in &config.models {
                let vocab = match &model.remote {
                    Some(_) => crate::remote::load_tokenizer(model).map_err(|e| e.to_string()),
                    None => Prompter::load_vocab(model).map(Some),
                };
                let counting = match vocab {
                    Ok(Some(prompter)) => match prompter.counter() {
                        Ok(_) => "the Rust tokenizer (matched llama.cpp on the probe)".to_owned(),
                        Err(why) => format!("llama.cpp's tokenizer ({why})"),
                    },
                    Ok(None) => "an estimate of 4 bytes a token (set `tokenizer` to count exactly)"
                        .to_owned(),
                    Err(e) => format!("nothing: the vocabulary does not load ({e})"),
                };
                if let Some(remote) = &model.remote {
                    let _ = write!(
                        summary,
                        "\n{}: remote, {} endpoint(s): {}",
                        model.id,
                        remote.endpoints.len(),
                        remote.endpoints.join(", ")
                    );
                }
                let _ = write!(
                    summary,
                    "\n{}: prompt tokens counted by {counting}",
                    model.id
                );
            }
            Ok(summary)
        }
        Ok(_) => Err(Problems(problems)),
        Err(mut found) => {
            problems.append(&mut found);
            Err(Problems(problems))
        }
    }
}

/// A model loaded for counting only: its vocabulary and template, no weights. `tiergate
/// route` registers these as the tiers' backends, so it resolves models and counts prompt
/// tokens exactly as the server does; it never generates.
pub struct VocabOnly {
    info: ModelInfo,
    /// `None` for a remote model without a `tokenizer`: its prompts are estimated.
    prompter: Option<Prompter>,
    /// What the served model's sequences will hold, from its config and training context.
    context: Option<u32>,
}

/// Every configured model, vocabulary only, in config order.
pub fn vocab_models(config: &Config) -> anyhow::Result<Vec<Arc<VocabOnly>>> {
    config
        .models
        .iter()
        .map(|model| VocabOnly::load(model).map(Arc::new))
        .collect()
}

/// The tiers registry over vocabulary-only models: resolution and exact counts, no generation.
pub fn vocab_tiers(models: &[Arc<VocabOnly>]) -> Tiers {
    Tiers::new(
        models
            .iter()
            .map(|m| m.clone() as Arc<dyn Engine>)
            .collect(),
    )
}

impl VocabOnly {
    pub fn prompter(&self) -> Option<&Prompter> {
        self.prompter.as_ref()
    }

    pub fn load(model: &ModelConfig) -> anyhow::Result<Self> {
        let info = ModelInfo {
            id: model.id.clone(),
            tier: model.tier.clone(),
        };
        if let Some(remote) = &model.remote {
            return Ok(Self {
                info,
                prompter: crate::remote::load_tokenizer(model)?,
                context: remote.context,
            });
        }
        let prompter =
            Prompter::load_vocab(model).map_err(|e| anyhow::anyhow!("model {}: {e}", model.id))?;
        Ok(Self {
            info,
            context: Some(model.context_per_sequence(prompter.model().n_ctx_train())),
            prompter: Some(prompter),
        })
    }
}

impl Engine for VocabOnly {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn submit(&self, _request: GenerationRequest) -> Result<TokenStream, EngineError> {
        Err(EngineError::Unavailable {
            model: self.info.id.clone(),
            reason: "loaded for counting prompt tokens only".into(),
        })
    }

    fn health(&self) -> Health {
        Health::Down("loaded for counting prompt tokens only".into())
    }

    /// As the served model reports them (a remote one only with a tokenizer and a context).
    fn limits(&self) -> Option<PromptLimits> {
        Some(PromptLimits {
            context: self.context?,
            max_token_bytes: self.prompter.as_ref()?.max_token_bytes(),
        })
    }

    fn forecast(&self, _prompt_tokens: u32) -> Forecast {
        Forecast::default()
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        match &self.prompter {
            Some(prompter) => prompter.count(messages),
            None => Ok(crate::remote::estimate_prompt_tokens(messages)),
        }
    }
}

pub struct RouteOptions {
    pub config: PathBuf,
    /// Overrides the config's policy files when not empty.
    pub policies: Vec<PathBuf>,
    pub prompt: Option<String>,
    /// A chat request body (JSON), used instead of `prompt`.
    pub request: Option<PathBuf>,
    pub caller: Caller,
}

/// The config at `config_path` and its policy, or the `policies` given instead of the
/// config's own when there are any (the tools' `--policy`).
pub fn load_policy(config_path: &Path, policies: &[PathBuf]) -> anyhow::Result<(Config, Policy)> {
    let config = Config::load(config_path).map_err(|p| anyhow::anyhow!("{p}"))?;
    let files = if policies.is_empty() {
        &config.router.policies
    } else {
        policies
    };
    let policy =
        Policy::load(files, &config.tiers()).map_err(|p| anyhow::anyhow!("{}", Problems(p)))?;
    Ok((config, policy))
}

/// The explanation `tiergate route` prints: the same routing call as `/v1/route`.
pub fn explain(options: &RouteOptions) -> anyhow::Result<Explained> {
    let (config, mut policy) = load_policy(&options.config, &options.policies)?;
    // The embedding model loads only for a policy that asks `similar_to`.
    let embedder = match policy.needs_meaning() {
        true => Some(crate::evaluate::load_embedder(&config)?),
        false => None,
    };
    if let (Some(examples), Some(embedder)) = (policy.examples.as_mut(), &embedder) {
        examples.embed(embedder)?;
    }
    let request = match (&options.request, &options.prompt) {
        (Some(path), _) => {
            let body =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            parse_chat_request(&body)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?
        }
        (None, Some(prompt)) => ChatRequest::user(prompt.clone()),
        (None, None) => anyhow::bail!("give a prompt or --request FILE"),
    };
    let meaning = match (
        &embedder,
        request.messages.iter().rev().find(|m| m.role == Role::User),
    ) {
        (Some(embedder), Some(last_user)) => Some(embedder.embed_blocking(&last_user.content)?),
        _ => None,
    };
    let tiers = vocab_tiers(&vocab_models(&config)?);
    gateway::explain(
        &tiers,
        &policy,
        options.caller.clone(),
        &request,
        meaning.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The explanation as text for a terminal.
pub fn render(explained: &Explained) -> String {
    let e = &explained.explanation;
    let f = &e.features;
    let yes = |b: bool| if b { "yes" } else { "no" };
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let mut out = String::new();
    let files: Vec<String> = e.policy.iter().map(|p| p.display().to_string()).collect();
    let _ = writeln!(out, "policy: {}", files.join(", "));
    let _ = writeln!(out, "features:");
    let _ = writeln!(
        out,
        "  turns {}, system prompt {} ({} chars), max_tokens {}, last user message {} chars, script {}",
        f.turns,
        yes(f.system_prompt),
        f.system_prompt_chars,
        f.requested_max_tokens
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        f.last_user_chars,
        f.script
    );
    let _ = writeln!(
        out,
        "  code {} (fences {}, syntax lines {}, terms {}); math {} (terms {}, symbols {}, expressions {}); reasoning {} (cues {})",
        yes(f.code),
        f.code_fences,
        f.code_syntax_lines,
        f.code_terms,
        yes(f.math),
        f.math_terms,
        f.math_symbols,
        f.math_expressions,
        yes(f.reasoning),
        f.reasoning_cues
    );
    let _ = writeln!(
        out,
        "  api key {}, tenant {}, hint {}",
        or_dash(f.api_key.as_deref().map(|_| "set")),
        or_dash(f.tenant.as_deref()),
        or_dash(f.hint.as_deref())
    );
    if let Some(similar) = &f.similar {
        let _ = writeln!(
            out,
            "  nearest examples vote {}:",
            similar
                .class
                .as_deref()
                .unwrap_or("nothing (none similar enough)")
        );
        for n in &similar.nearest {
            let _ = writeln!(out, "    {:.3} {:<10} {}", n.similarity, n.class, n.example);
        }
    }
    for (tier, tokens) in &e.prompt_tokens {
        let _ = writeln!(out, "  prompt tokens on {tier}: {tokens}");
    }
    for (tier, score) in &e.complexity {
        let _ = writeln!(out, "  complexity for {tier}: {score:.2}");
    }
    let _ = writeln!(out, "rules:");
    for rule in &e.rules {
        let place = match rule.line {
            Some(line) => format!("{}:{line}", rule.file.display()),
            None => rule.file.display().to_string(),
        };
        match &rule.reason {
            None => {
                let _ = writeln!(out, "  match    {} ({place}) -> {}", rule.rule, rule.tier);
            }
            Some(reason) => {
                let _ = writeln!(
                    out,
                    "  no match {} ({place}) -> {}: {reason}",
                    rule.rule, rule.tier
                );
            }
        }
    }
    let r = &e.route;
    let _ = writeln!(
        out,
        "route: tier {} (model {}) by rule `{}`{}; ttft budget {} ms, total budget {} ms, max_tokens cap {}, cache {} (ttl {} s, semantic threshold {})",
        r.tier,
        explained.model,
        r.rule,
        if r.pinned { " (pinned by the request)" } else { "" },
        r.ttft_ms,
        r.total_ms,
        r.max_tokens.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        r.cache.as_str(),
        r.cache_ttl_s,
        r.semantic_threshold
    );
    out
}
