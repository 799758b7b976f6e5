//! `tiergate bench-chat`: replays conversations the way chat frontends send them. Each of
//! C conversations runs M turns back to back; every turn resends the whole history (the
//! replies as they streamed back, and a new user message), so a server that keeps the
//! history's KV cells only prefills what is new. TTFT is reported by turn index, per
//! target, with the targets run one after the other on the same conversations (tiergate
//! and llama-server on the same GGUF, say) and printed side by side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use comfy_table::{presets, ContentArrangement, Table};
use serde::Serialize;
use serde_json::{json, Value};

use super::{one_request, percentiles, round2, BenchOptions, Outcome, Percentiles, Shared};

/// A server to replay the conversations against.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// A name for the report, e.g. `tiergate` or `llama-server`.
    pub label: String,
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `LABEL=URL`.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (label, url) = raw
            .split_once('=')
            .filter(|(label, url)| !label.is_empty() && !url.is_empty())
            .ok_or_else(|| format!("expected LABEL=URL, got {raw:?}"))?;
        Ok(Self {
            label: label.to_owned(),
            url: url.to_owned(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ChatBenchOptions {
    pub targets: Vec<Target>,
    /// Sent as `model` (tiergate routes tier names; llama-server ignores it).
    pub model: String,
    /// Concurrent conversations, one run per entry.
    pub conversations: Vec<usize>,
    pub turns: usize,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Exactly `max_tokens` per reply, so that both servers do the same work and the
    /// histories grow alike.
    pub ignore_eos: bool,
    pub timeout: Duration,
}

/// TTFT of one turn index over every conversation.
#[derive(Debug, Serialize)]
pub struct TurnReport {
    /// 1-based.
    pub turn: usize,
    pub ok: usize,
    pub failed: usize,
    pub ttft_ms: Option<Percentiles>,
    /// Mean prompt tokens, as the server's usage reports them.
    pub prompt_tokens: Option<f64>,
    /// Mean prompt tokens the server says it took from its cache, where it reports them
    /// (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<f64>,
}

/// One target at one number of conversations.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub target: String,
    pub conversations: usize,
    pub turns: Vec<TurnReport>,
    /// Turn 2 onwards together: what prefix reuse is for.
    pub follow_up_ttft_ms: Option<Percentiles>,
    pub completion_tokens: u64,
    pub wall_s: f64,
    pub output_tokens_per_s: f64,
    /// Why requests failed, with counts; a failed turn ends its conversation.
    pub errors: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatBenchReport {
    pub model: String,
    pub max_tokens: u32,
    pub runs: Vec<RunReport>,
}

/// Written like an application's instructions. By the fourth turn a history passes Gemma
/// 3's 512-token attention window; six turns of 64-token replies stay within its
/// 1024-cell window cache, which a longer run (`--turns`) overflows.
const SYSTEM_PROMPT: &str = "You are the assistant of an online magazine about travel, \
    science and everyday life. Readers ask you questions in a chat window and expect \
    friendly, concrete answers. Give specific examples, name places, numbers and dates \
    where you know them, and say so plainly when you are unsure. Keep a calm, encouraging \
    tone, avoid jargon unless the reader uses it first, and explain any technical term you \
    cannot avoid. When a reader asks for a list, give a short numbered list. When a reader \
    asks a follow-up question, build on what you said before instead of repeating it. \
    Never invent quotations, and do not give medical, legal or financial advice beyond \
    general information; suggest asking a professional instead.";

const OPENINGS: [&str; 16] = [
    "I am planning a week in Lisbon in spring. What should I not miss?",
    "How do bees find their way back to the hive?",
    "What is the best way to start learning to bake sourdough bread?",
    "Why is the sky blue during the day and red at sunset?",
    "Can you suggest a three-day hiking route in the Scottish Highlands?",
    "How does a refrigerator keep food cold?",
    "What are some good habits for sleeping better?",
    "How did ancient sailors navigate without satellites?",
    "I want to grow tomatoes on my balcony. Where do I start?",
    "What causes the northern lights, and where can I see them?",
    "How do trains stay on the tracks around tight curves?",
    "What should I pack for a winter trip to Japan?",
    "Why do cats purr?",
    "How is paper made from trees?",
    "What are the main sights of Rome for a first visit?",
    "How do volcanoes form?",
];

const FOLLOW_UPS: [&str; 8] = [
    "Interesting. Can you tell me more about the first point?",
    "Could you give me a concrete example?",
    "What would a beginner usually get wrong here?",
    "How long does that take, roughly?",
    "Is there anything I should avoid?",
    "Can you summarise what you said so far in a few sentences?",
    "What would you recommend reading to learn more?",
    "Thanks. One last thing: what is the most surprising fact about this?",
];

/// Conversation `index`'s opening messages.
fn opening(index: usize) -> Vec<Value> {
    vec![
        json!({"role": "system", "content": SYSTEM_PROMPT}),
        json!({"role": "user", "content": OPENINGS[index % OPENINGS.len()]}),
    ]
}

pub async fn run(options: ChatBenchOptions) -> anyhow::Result<ChatBenchReport> {
    anyhow::ensure!(!options.targets.is_empty(), "no target to replay against");
    anyhow::ensure!(options.turns > 0, "at least one turn");
    anyhow::ensure!(
        options.conversations.iter().all(|&c| c > 0),
        "conversations must be at least 1"
    );
    let mut runs = Vec::new();
    // Targets interleaved per level: the machine drifts, so compared numbers come from
    // neighbouring runs.
    for &conversations in &options.conversations {
        for target in &options.targets {
            runs.push(run_target(&options, target, conversations).await?);
        }
    }
    Ok(ChatBenchReport {
        model: options.model.clone(),
        max_tokens: options.max_tokens,
        runs,
    })
}

/// What one turn of one conversation measured.
struct TurnSample {
    turn: usize,
    ok: bool,
    error: Option<String>,
    ttft: Option<Duration>,
    completion_tokens: u64,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
}

async fn run_target(
    options: &ChatBenchOptions,
    target: &Target,
    conversations: usize,
) -> anyhow::Result<RunReport> {
    let mut bench = BenchOptions::new(&target.url, vec![options.model.clone()], Vec::new());
    bench.max_tokens = options.max_tokens;
    bench.temperature = options.temperature;
    bench.ignore_eos = options.ignore_eos;
    bench.timeout = options.timeout;
    let shared = Shared::new(bench)?;
    let started = Instant::now();
    let replays = (0..conversations).map(|index| {
        let shared = shared.clone();
        async move {
            let mut messages = opening(index);
            let mut samples = Vec::with_capacity(options.turns);
            for turn in 1..=options.turns {
                let sample =
                    one_request(&shared, &options.model, &Value::Array(messages.clone())).await;
                let ok = sample.outcome == Outcome::Complete;
                samples.push(TurnSample {
                    turn,
                    ok,
                    error: (!ok).then(|| {
                        sample
                            .error
                            .clone()
                            .unwrap_or_else(|| sample.outcome.label())
                    }),
                    ttft: sample.ttft,
                    completion_tokens: sample.completion_tokens,
                    prompt_tokens: sample.prompt_tokens,
                    cached_tokens: sample.cached_tokens,
                });
                if !ok {
                    // Without the reply there is no next turn to send.
                    break;
                }
                messages.push(json!({"role": "assistant", "content": sample.content}));
                let follow_up = FOLLOW_UPS[(index + turn - 1) % FOLLOW_UPS.len()];
                messages.push(json!({"role": "user", "content": follow_up}));
            }
            samples
        }
    });
    let samples: Vec<TurnSample> = futures::future::join_all(replays)
        .await
        .into_iter()
        .flatten()
        .collect();
    Ok(summarize(
        &target.label,
        conversations,
        options.turns,
        &samples,
        started.elapsed(),
    ))
}

fn summarize(
    label: &str,
    conversations: usize,
    turns: usize,
    samples: &[TurnSample],
    wall: Duration,
) -> RunReport {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = |values: Vec<u64>| {
        (!values.is_empty())
            .then(|| round2(values.iter().sum::<u64>() as f64 / values.len() as f64))
    };
    let turn_reports = (1..=turns)
        .map(|turn| {
            let of_turn: Vec<&TurnSample> = samples.iter().filter(|s| s.turn == turn).collect();
            let ok: Vec<&&TurnSample> = of_turn.iter().filter(|s| s.ok).collect();
            TurnReport {
                turn,
                ok: ok.len(),
                failed: of_turn.len() - ok.len(),
                ttft_ms: percentiles(ok.iter().filter_map(|s| s.ttft.map(ms)).collect()),
                prompt_tokens: mean(ok.iter().filter_map(|s| s.prompt_tokens).collect()),
                cached_tokens: mean(ok.iter().filter_map(|s| s.cached_tokens).collect()),
            }
        })
        .collect();
    let follow_up_ttft_ms = percentiles(
        samples
            .iter()
            .filter(|s| s.ok && s.turn > 1)
            .filter_map(|s| s.ttft.map(ms))
            .collect(),
    );
    let completion_tokens: u64 = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.completion_tokens)
        .sum();
    let mut errors = BTreeMap::new();
    for error in samples.iter().filter_map(|s| s.error.as_ref()) {
        *errors.entry(error.clone()).or_insert(0) += 1;
    }
    let wall_s = wall.as_secs_f64().max(1e-9);
    RunReport {
        target: label.to_owned(),
        conversations,
        turns: turn_reports,
        follow_up_ttft_ms,
        completion_tokens,
        wall_s: round2(wall_s),
        output_tokens_per_s: round2(completion_tokens as f64 / wall_s),
        errors,
    }
}

/// One row per turn index and a summary row per number of conversations, the targets side
/// by side; with two targets, the first's TTFT p50 as a share of the second's.
pub fn table(report: &ChatBenchReport) -> Table {
    let mut labels: Vec<&str> = Vec::new();
    for run in &report.runs {
        if !labels.contains(&run.target.as_str()) {
            labels.push(&run.target);
        }
    }
    let mut header = vec!["conversations".to_owned(), "turn".to_owned()];
    for label in &labels {
        header.push(format!("{label}\nTTFT ms p50 / p99"));
        header.push(format!("{label}\nprompt (cached) tok"));
    }
    let compare = labels.len() == 2;
    if compare {
        header.push(format!("p50 {} / {}", labels[0], labels[1]));
    }
    let mut table = Table::new();
    table
        .load_style(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    let dash = || "-".to_owned();
    let ttft =
        |p: Option<&Percentiles>| p.map_or_else(dash, |p| format!("{:.0} / {:.0}", p.p50, p.p99));
    let ratio = |a: Option<&Percentiles>, b: Option<&Percentiles>| match (a, b) {
        (Some(a), Some(b)) if b.p50 > 0.0 => format!("{:.2}", a.p50 / b.p50),
        _ => dash(),
    };
    let mut levels: Vec<usize> = Vec::new();
    for run in &report.runs {
        if !levels.contains(&run.conversations) {
            levels.push(run.conversations);
        }
    }
    for conversations in levels {
        let runs: Vec<Option<&RunReport>> = labels
            .iter()
            .map(|label| {
                report
                    .runs
                    .iter()
                    .find(|r| r.conversations == conversations && r.target == *label)
            })
            .collect();
        let turns = runs
            .iter()
            .flatten()
            .map(|r| r.turns.len())
            .max()
            .unwrap_or(0);
        for turn in 0..turns {
            let mut row = vec![conversations.to_string(), (turn + 1).to_string()];
            let of_turn: Vec<Option<&TurnReport>> = runs
                .iter()
                .map(|run| run.and_then(|r| r.turns.get(turn)))
                .collect();
            for t in &of_turn {
                row.push(ttft(t.and_then(|t| t.ttft_ms.as_ref())));
                row.push(t.map_or_else(dash, |t| {
                    let prompt = t.prompt_tokens.map_or_else(dash, |p| format!("{p:.0}"));
                    let cached = t.cached_tokens.map_or_else(dash, |c| format!("{c:.0}"));
                    let failed = if t.failed > 0 {
                        format!(", {} failed", t.failed)
                    } else {
                        String::new()
                    };
                    format!("{prompt} ({cached}){failed}")
                }));
            }
            if compare {
                let p = |i: usize| of_turn[i].and_then(|t| t.ttft_ms.as_ref());
                row.push(ratio(p(0), p(1)));
            }
            table.add_row(row);
        }
        let mut summary = vec![conversations.to_string(), "2+".to_owned()];
        for run in &runs {
            summary.push(ttft(run.and_then(|r| r.follow_up_ttft_ms.as_ref())));
            summary
                .push(run.map_or_else(dash, |r| format!("{:.1} out tok/s", r.output_tokens_per_s)));
        }
        if compare {
            let p = |i: usize| runs[i].and_then(|r| r.follow_up_ttft_ms.as_ref());
            summary.push(ratio(p(0), p(1)));
        }
        table.add_row(summary);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_label_equals_url() {
        let target: Target = "llama-server=http://127.0.0.1:9000".parse().expect("valid");
        assert_eq!(target.label, "llama-server");
        assert_eq!(target.url, "http://127.0.0.1:9000");
        assert!("http://127.0.0.1:9000".parse::<Target>().is_err());
        assert!("=http://h".parse::<Target>().is_err());
    }

    fn sample(turn: usize, ttft_ms: u64, ok: bool) -> TurnSample {
        TurnSample {
            turn,
            ok,
            error: (!ok).then(|| "503".to_owned()),
            ttft: ok.then(|| Duration::from_millis(ttft_ms)),
            completion_tokens: 10,
            prompt_tokens: Some(100 * turn as u64),
            cached_tokens: Some(90 * (turn as u64 - 1)),
        }
    }

    #[test]
    fn turns_are_reported_apart_and_follow_ups_together() {
        let samples = [
            sample(1, 900, true),
            sample(1, 1100, true),
            sample(2, 100, true),
            sample(2, 0, false),
            sample(3, 300, true),
        ];
        let report = summarize("t", 2, 3, &samples, Duration::from_secs(2));
        assert_eq!(report.turns.len(), 3);
        assert_eq!((report.turns[0].ok, report.turns[0].failed), (2, 0));
        assert_eq!(
            report.turns[0].ttft_ms.as_ref().map(|p| p.max),
            Some(1100.0)
        );
        assert_eq!((report.turns[1].ok, report.turns[1].failed), (1, 1));
        assert_eq!(report.turns[1].cached_tokens, Some(90.0));
        // Turns 2 and 3, successful ones only.
        let follow_up = report.follow_up_ttft_ms.expect("samples");
        assert_eq!((follow_up.min, follow_up.max), (100.0, 300.0));
        assert_eq!(report.completion_tokens, 40);
        assert_eq!(report.output_tokens_per_s, 20.0);
        assert_eq!(report.errors, BTreeMap::from([("503".to_owned(), 1)]));
    }

    #[test]
    fn conversations_open_differently_and_share_the_system_prompt() {
        let a = opening(0);
        let b = opening(1);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }
}
