//! Offline tools for operators: `tiergate check` (validate config and policies) and
//! `tiergate route` (explain a routing decision without a server).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::api::types::ChatRequest;
use crate::config::Config;
use crate::engine::prompt::Prompter;
use crate::engine::{ChatMessage, Role};
use crate::router::{Caller, Explanation, Features, Policy, RequestTokens, Tokenizers};
use crate::tomlfile::{Problem, Problems};

/// Validates the config, the model files it names and every policy file; all problems at
/// once. On success, a one-line summary.
pub fn check(config_path: &Path) -> Result<String, Problems> {
    let config = Config::load(config_path)?;
    let mut problems = Vec::new();
    for (i, model) in config.models.iter().enumerate() {
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
    let policy = Policy::load(&config.router.policies, &config.tiers());
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
                let counting = match Prompter::load_vocab(model) {
                    Ok(prompter) => match prompter.counter() {
                        Ok(_) => "the Rust tokenizer (matched llama.cpp on the probe)".to_owned(),
                        Err(why) => format!("llama.cpp's tokenizer ({why})"),
                    },
                    Err(e) => format!("nothing: the vocabulary does not load ({e})"),
                };
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

/// Prompt token counts from each tier's vocabulary, loaded without weights.
pub struct VocabTokenizers {
    tiers: Vec<(String, Prompter)>,
}

impl VocabTokenizers {
    /// One tokenizer per tier (the first model of each), vocabulary only.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let mut tiers: Vec<(String, Prompter)> = Vec::new();
        for model in &config.models {
            if tiers.iter().any(|(tier, _)| *tier == model.tier) {
                continue;
            }
            let prompter = Prompter::load_vocab(model)
                .map_err(|e| anyhow::anyhow!("model {}: {e}", model.id))?;
            tiers.push((model.tier.clone(), prompter));
        }
        Ok(Self { tiers })
    }
}

impl VocabTokenizers {
    /// The template and tokenizers of `tier`'s first model.
    pub fn prompter(&self, tier: &str) -> Option<&Prompter> {
        self.tiers.iter().find(|(t, _)| t == tier).map(|(_, p)| p)
    }
}

impl Tokenizers for VocabTokenizers {
    fn count(&self, tier: &str, messages: &[ChatMessage]) -> Result<u32, String> {
        let prompter = self
            .prompter(tier)
            .ok_or_else(|| format!("no model serves tier `{tier}`"))?;
        prompter.count(messages).map_err(|e| e.to_string())
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

/// The explanation `tiergate route` prints.
pub fn explain(options: &RouteOptions) -> anyhow::Result<Explanation> {
    let config = Config::load(&options.config).map_err(|p| anyhow::anyhow!("{p}"))?;
    let files = if options.policies.is_empty() {
        config.router.policies.clone()
    } else {
        options.policies.clone()
    };
    let policy =
        Policy::load(&files, &config.tiers()).map_err(|p| anyhow::anyhow!("{}", Problems(p)))?;
    let (messages, max_tokens, pin) = match (&options.request, &options.prompt) {
        (Some(path), _) => {
            let body =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let request = ChatRequest::from_json(&body)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?;
            let pin = (request.model != "auto")
                .then(|| {
                    config
                        .models
                        .iter()
                        .find(|m| m.id == request.model || m.tier == request.model)
                        .map(|m| m.tier.clone())
                        .ok_or_else(|| anyhow::anyhow!("unknown model `{}`", request.model))
                })
                .transpose()?;
            (
                request.generation.messages,
                request.generation.max_tokens,
                pin,
            )
        }
        (None, Some(prompt)) => (
            vec![ChatMessage {
                role: Role::User,
                content: prompt.clone(),
            }],
            None,
            None,
        ),
        (None, None) => anyhow::bail!("give a prompt or --request FILE"),
    };
    let tokenizers = VocabTokenizers::load(&config)?;
    let features = Features::extract(&messages, max_tokens, options.caller.clone());
    Ok(policy.explain(
        &features,
        &RequestTokens::new(&tokenizers, &messages),
        pin.as_deref(),
    ))
}

/// The explanation as text for a terminal.
pub fn render(e: &Explanation) -> String {
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
        "route: tier {} by rule `{}`{}; ttft budget {} ms, total budget {} ms, max_tokens cap {}, cache {} (ttl {} s)",
        r.tier,
        r.rule,
        if r.pinned { " (pinned by the request)" } else { "" },
        r.ttft_ms,
        r.total_ms,
        r.max_tokens.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        r.cache.as_str(),
        r.cache_ttl_s
    );
    out
}
