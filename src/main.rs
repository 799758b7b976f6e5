use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tiergate::check::RouteOptions;
use tiergate::config::{Config, DEFAULT_CONFIG_PATH};
use tiergate::evaluate::RoutingEval;
use tiergate::loadgen::{self, BenchOptions, Load};
use tiergate::router::Caller;
use tiergate::telemetry::{self, LogFormat};

/// mimalloc instead of glibc's malloc: a request allocates and frees a few hundred small
/// buffers across two worker threads, and glibc's arenas spent about a tenth of a cache
/// hit's time there (`just bench-hit`). llama.cpp's own allocations are unaffected.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tiergate",
    version,
    about = "LLM gateway: GGUF tiers in-process, OpenAI-compatible API"
)]
struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TIERGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the configured models and serve the HTTP API.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Address to bind (overrides `server.listen`); port 0 picks a free port.
        #[arg(long, env = "TIERGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Policy files to serve instead of the config's `router.policies` (repeatable).
        #[arg(long = "policy")]
        policies: Vec<PathBuf>,
    },
    /// Load-test an OpenAI-compatible server with streaming requests; prints JSON.
    Bench(BenchArgs),
    /// Replay multi-turn conversations against one or more OpenAI-compatible servers;
    /// prints TTFT by turn, the servers side by side.
    BenchChat(BenchChatArgs),
    /// Validate the config and every routing policy; lists all problems, exits 1 on any.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show how a prompt (or a chat request file) would be routed, without a server.
    Route(RouteArgs),
    /// Route labelled prompts (`[[prompt]]` with text, tier, class) and report how often
    /// the routed tier agrees, with and without the `similar_to` rules
    EvalRouting {
        /// The labelled prompts (TOML)
        #[arg(default_value = "benches/routing-heldout.toml")]
        prompts: PathBuf,
        /// Also sweep k and min_similarity of the example vote
        #[arg(long)]
        sweep: bool,
        #[arg(long = "policy")]
        policies: Vec<PathBuf>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Score labelled message pairs (`[[pair]]` with a, b, should_hit, kind) and report the
    /// semantic cache's hit and false-hit rates per threshold, with and without the guards
    EvalSemantic {
        /// The labelled pairs (TOML)
        #[arg(default_value = "benches/semantic-pairs.toml")]
        pairs: PathBuf,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct RouteArgs {
    /// The user message to route.
    #[arg(required_unless_present = "request", conflicts_with = "request")]
    prompt: Option<String>,
    /// A chat completion request body (JSON) instead of a prompt.
    #[arg(long)]
    request: Option<PathBuf>,
    /// Print the features and every rule tried with why it did or did not match.
    #[arg(long)]
    explain: bool,
    /// Print the explanation as JSON.
    #[arg(long)]
    json: bool,
    /// Policy files to use instead of the config's `router.policies` (repeatable).
    #[arg(long = "policy")]
    policies: Vec<PathBuf>,
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// As if sent with this API key.
    #[arg(long)]
    api_key: Option<String>,
    /// As if sent with this routing hint header.
    #[arg(long)]
    hint: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// Base URL of the server.
    #[arg(long, env = "TIERGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model names to send, each benchmarked in turn (tiergate accepts tier names).
    #[arg(long = "model", default_values_t = ["fast".to_owned(), "full".to_owned()])]
    models: Vec<String>,
    /// Closed loop: concurrency levels, each run with this many workers back to back
    /// (default 1,4,16 when no --rate is given; with both, the open-loop levels run first).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open loop: request rates (per second), each run with Poisson arrivals.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Requests per level (default: max(16, 4 x concurrency), or 30 s worth at --rate;
    /// unbounded when --duration is given).
    #[arg(long)]
    requests: Option<usize>,
    /// Seconds per level to keep starting requests; requests in flight then finish.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Prompts, one per line: plain text, or JSON (a messages array or {"messages": [...]}).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Let the model stop at end-of-sequence instead of generating exactly --max-tokens.
    #[arg(long)]
    allow_eos: bool,
    /// Sent as a bearer token.
    #[arg(long, env = "TIERGATE_API_KEY")]
    api_key: Option<String>,
    /// Extra request header, `Name: value` (repeatable), e.g. `x-tiergate-route: full`.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Report the share of successful requests whose TTFT is within this many milliseconds.
    #[arg(long)]
    ttft_budget_ms: Option<u64>,
    /// Seed for open-loop arrival times.
    #[arg(long)]
    seed: Option<u64>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct BenchChatArgs {
    /// A server to replay against, `LABEL=URL` (repeatable; run one after the other).
    #[arg(long = "target", required = true)]
    targets: Vec<loadgen::chat::Target>,
    /// Sent as `model` (a tier name for tiergate; llama-server ignores it).
    #[arg(long, default_value = "fast")]
    model: String,
    /// Concurrent conversations, one run per entry.
    #[arg(long, value_delimiter = ',', default_values_t = [4, 16])]
    conversations: Vec<usize>,
    /// Turns per conversation; each resends the history with a new user message.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// 0 is greedy: the same conversations on every server, up to rounding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Let replies stop at end-of-sequence instead of running to --max-tokens.
    #[arg(long)]
    allow_eos: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_header(raw: &str) -> Result<(String, String), String> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| format!("expected `Name: value`, got {raw:?}"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

impl BenchArgs {
    fn options(self) -> anyhow::Result<BenchOptions> {
        let mut loads: Vec<Load> = self.rate.iter().map(|&rate| Load::Open { rate }).collect();
        loads.extend(
            self.concurrency
                .iter()
                .map(|&concurrency| Load::Closed { concurrency }),
        );
        if loads.is_empty() {
            loads = [1, 4, 16]
                .map(|concurrency| Load::Closed { concurrency })
                .to_vec();
        }
        let mut options = BenchOptions::new(self.url, self.models, loads);
        if let Some(path) = &self.prompts {
            options.prompts = loadgen::read_prompts(path)?;
        }
        if let Some(seconds) = self.duration_s {
            anyhow::ensure!(
                seconds.is_finite() && seconds > 0.0,
                "--duration-s must be positive"
            );
            options.duration = Some(Duration::from_secs_f64(seconds));
        }
        options.requests = self.requests;
        options.max_tokens = self.max_tokens;
        options.temperature = self.temperature;
        options.ignore_eos = !self.allow_eos;
        options.api_key = self.api_key;
        options.headers = self.headers;
        options.timeout = Duration::from_secs(self.timeout_s);
        options.ttft_budget = self.ttft_budget_ms.map(Duration::from_millis);
        options.seed = self.seed;
        options.progress = !self.quiet;
        Ok(options)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.command {
        Command::Serve { .. } | Command::Bench(_) | Command::BenchChat(_) => {
            telemetry::SERVER_FILTER
        }
        Command::Check { .. }
        | Command::Route(_)
        | Command::EvalRouting { .. }
        | Command::EvalSemantic { .. } => telemetry::TOOL_FILTER,
    };
    // Dropped when `main` returns, after the command's last line is queued.
    let _log_writer = telemetry::init(cli.log_format, filter);
    match cli.command {
        Command::Serve {
            config,
            listen,
            policies,
        } => serve(config, listen, policies),
        Command::Bench(args) => bench(args),
        Command::BenchChat(args) => bench_chat(args),
        Command::Check { config } => check(&config),
        Command::Route(args) => route(args),
        Command::EvalRouting {
            prompts,
            sweep,
            policies,
            config,
        } => report(tiergate::evaluate::routing(&RoutingEval {
            config,
            policies,
            prompts,
            sweep,
        })),
        Command::EvalSemantic { pairs, config } => {
            report(tiergate::evaluate::semantic(&config, &pairs))
        }
    }
}

/// Prints a tool's report, or its error.
fn report(outcome: anyhow::Result<String>) -> ExitCode {
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config_path: PathBuf, listen: Option<SocketAddr>, policies: Vec<PathBuf>) -> ExitCode {
    let mut config = match Config::load(&config_path) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    if !policies.is_empty() {
        config.router.policies = policies;
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let address = listen.unwrap_or(config.server.listen);
    let outcome = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))?;
        tiergate::server::run(listener, config, shutdown_signal()).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    let json = args.json;
    let outcome = args.options().and_then(|options| {
        let runtime = runtime()?;
        runtime.block_on(loadgen::run(options))
    });
    let rendered = outcome.and_then(|report| {
        Ok(if json {
            serde_json::to_string_pretty(&report)?
        } else {
            loadgen::table(&report).to_string()
        })
    });
    report(rendered.map(|text| text + "\n"))
}

fn bench_chat(args: BenchChatArgs) -> ExitCode {
    let json = args.json;
    let options = loadgen::chat::ChatBenchOptions {
        targets: args.targets,
        model: args.model,
        conversations: args.conversations,
        turns: args.turns,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        ignore_eos: !args.allow_eos,
        timeout: Duration::from_secs(args.timeout_s),
    };
    let rendered = runtime().and_then(|runtime| {
        let report = runtime.block_on(loadgen::chat::run(options))?;
        Ok(if json {
            serde_json::to_string_pretty(&report)?
        } else {
            format!(
                "model {} · {} tokens a reply\n{}",
                report.model,
                report.max_tokens,
                loadgen::chat::table(&report)
            )
        })
    });
    report(rendered.map(|text| text + "\n"))
}

fn check(config_path: &Path) -> ExitCode {
    match tiergate::check::check(config_path) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            eprintln!("{} problem(s)", problems.0.len());
            ExitCode::FAILURE
        }
    }
}

fn route(args: RouteArgs) -> ExitCode {
    let options = RouteOptions {
        config: args.config,
        policies: args.policies,
        prompt: args.prompt,
        request: args.request,
        caller: Caller {
            api_key: args.api_key,
            tenant: None,
            hint: args.hint.map(|h| h.to_ascii_lowercase()),
        },
    };
    match tiergate::check::explain(&options) {
        Ok(explanation) if args.json => match serde_json::to_string_pretty(&explanation) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Ok(explanation) if args.explain => {
            print!("{}", tiergate::check::render(&explanation));
            ExitCode::SUCCESS
        }
        Ok(explanation) => {
            let route = &explanation.explanation.route;
            println!("{} (rule `{}`)", route.tier, route.rule);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
