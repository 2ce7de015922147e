//! `phalanx-chaos`: run fault scenarios and campaigns against Phalanx.
//!
//! cargo run --release -p phalanx-chaos -- campaign --seeds 500 --out chaos-out
//! cargo run --release -p phalanx-chaos -- campaign --seeds 500 --node-seeds 5000 --skip-processes --out chaos-out
//! cargo run --release -p phalanx-chaos -- run chaos-tests/scenarios/sim-heavy.toml --out chaos-out
//! cargo run --release -p phalanx-chaos -- run chaos-tests/scenarios/partition-aggregator-node.toml --out chaos-out

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use phalanx_chaos::campaign::sim_campaign;
use phalanx_chaos::invariants::check_all;
use phalanx_chaos::process::{find_phalanx, process_campaign, process_campaign_of, ProcessScenario};
use phalanx_chaos::report::Report;
use phalanx_chaos::sim::{campaign_jobs, simulate, SimOptions};
use serde::Deserialize;

#[derive(Parser)]
#[command(name = "phalanx-chaos", about = "Fault campaigns against Phalanx, with invariants and a report")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario file.
    Run {
        /// The scenario (TOML).
        scenario: PathBuf,
        /// Output directory for report.json and report.md.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a bounded campaign of seeds.
    Campaign {
        /// Number of seeds.
        #[arg(long, default_value_t = 240)]
        seeds: u64,
        /// Keep running batches of seeds for this long (e.g. 30m, 90s): a soak.
        #[arg(long)]
        duration: Option<String>,
        /// Output directory for report.json, report.md and loss.svg.
        #[arg(long)]
        out: PathBuf,
        /// Run only the simulation tiers (no node processes).
        #[arg(long)]
        skip_processes: bool,
        /// Seeds of the simulated-nodes tier (the real node loop, control plane and actor
        /// shells on an in-memory network); default: --seeds.
        #[arg(long)]
        node_seeds: Option<u64>,
        /// Threads running simulated-nodes seeds at once.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// Which tier a scenario file is for.
#[derive(Deserialize)]
struct Tier {
    tier: String,
}

/// A simulation scenario: a seed range and fault intensities.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    /// "simulation".
    #[allow(dead_code)]
    tier: String,
    /// First seed.
    #[serde(default)]
    seed: u64,
    /// Seeds to run from `seed`.
    #[serde(default = "one")]
    seeds: u64,
    /// Which campaign job: 0 softmax/iris, 1 linear/diabetes, 2 mlp/winequality.
    #[serde(default)]
    job: usize,
    max_crashes: Option<u32>,
    drop_probability: Option<f64>,
    duplicate_probability: Option<f64>,
    max_delay_ms: Option<u64>,
    fault_phase_ms: Option<u64>,
}

fn one() -> u64 {
    1
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration '{s}' (e.g. 30m, 90s, 2h)"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in '{s}' (use s, m or h)")),
    }
}

fn run() -> Result<bool, String> {
    match Cli::parse().command {
        Command::Campaign { seeds, duration, out, skip_processes, node_seeds, threads } => {
            let deadline = duration.as_deref().map(parse_duration).transpose()?.map(|d| Instant::now() + d);
            let mut start = 0;
            loop {
                let mut report =
                    sim_campaign(start..start + seeds, &out).map_err(|e| format!("{}: {e}", out.display()))?;
                let nodes = node_seeds.unwrap_or(seeds);
                let verdicts = phalanx_chaos::nodes::run_seeds(start..start + nodes, threads);
                phalanx_chaos::nodes::add_to_report(&verdicts, &mut report);
                report.write(&out).map_err(|e| format!("{}: {e}", out.display()))?;
                if !skip_processes {
                    let exe = find_phalanx().ok_or(
                        "the phalanx binary is not next to phalanx-chaos: build it with the harness (cargo build --release -p phalanx -p phalanx-chaos) \
                         or pass --skip-processes",
                    )?;
                    process_campaign(&exe, &out.join("processes"), &mut report)?;
                    report.write(&out).map_err(|e| format!("{}: {e}", out.display()))?;
                }
                let ms = |tier: &str| {
                    report
                        .recovery_ms_by_tier
                        .get(tier)
                        .map_or("–".to_string(), |p| format!("{}/{} ms", p.p50.unwrap_or(0), p.p99.unwrap_or(0)))
                };
                println!(
                    "seeds {}..{}{}: {} faults injected, {} survived, lost {}, duplicated {}, identical {}; \
                     recovery p50/p99: simulation {} (virtual), simulated nodes {} (virtual), processes {}",
                    start,
                    start + seeds,
                    if skip_processes { "" } else { " + process scenarios" },
                    report.faults_injected,
                    report.faults_survived,
                    report.samples_lost,
                    report.samples_duplicated,
                    report.identical,
                    ms("simulation"),
                    ms(phalanx_chaos::nodes::TIER),
                    ms("process")
                );
                for v in &report.violations {
                    println!("VIOLATION {v}");
                }
                if !report.violations.is_empty() {
                    return Ok(false);
                }
                start += seeds;
                if deadline.is_none_or(|d| Instant::now() >= d) {
                    println!("report: {}/report.md", out.display());
                    return Ok(true);
                }
            }
        }
        Command::Run { scenario, out } => {
            let text = std::fs::read_to_string(&scenario).map_err(|e| format!("{}: {e}", scenario.display()))?;
            let origin = scenario.display().to_string();
            let tier: Tier =
                toml::from_str(&text).map_err(|e| format!("{origin}: {}", e.to_string().replace('\n', " ")))?;
            match tier.tier.as_str() {
                "simulation" => {}
                "process" => return run_process_scenario(&ProcessScenario::parse(&text, &origin)?, &out),
                other => return Err(format!("{origin}: tier '{other}' (expected \"simulation\" or \"process\")")),
            }
            let s: Scenario =
                toml::from_str(&text).map_err(|e| format!("{origin}: {}", e.to_string().replace('\n', " ")))?;
            let jobs = campaign_jobs();
            let sim =
                jobs.get(s.job).ok_or_else(|| format!("{}: job {} (choose 0, 1 or 2)", scenario.display(), s.job))?;
            let mut ok = true;
            for seed in s.seed..s.seed + s.seeds {
                let d = SimOptions::new(seed);
                let opts = SimOptions {
                    max_crashes: s.max_crashes.unwrap_or(d.max_crashes),
                    drop_probability: s.drop_probability.unwrap_or(d.drop_probability),
                    duplicate_probability: s.duplicate_probability.unwrap_or(d.duplicate_probability),
                    max_delay_ms: s.max_delay_ms.unwrap_or(d.max_delay_ms),
                    fault_phase_ms: s.fault_phase_ms.unwrap_or(d.fault_phase_ms),
                    ..d
                };
                let outcome = simulate(&sim.job, &opts);
                let v = check_all(&outcome, &sim.expected);
                println!(
                    "seed {seed}: {} crashes, {} dropped, {} duplicated, finished at {} ms: {}",
                    outcome.stats.crashes,
                    outcome.stats.dropped,
                    outcome.stats.duplicated,
                    outcome.stats.finished_at_ms,
                    if v.is_empty() { "all invariants hold".to_string() } else { v.join("; ") }
                );
                ok &= v.is_empty();
            }
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            Ok(ok)
        }
    }
}

/// `run` of a real-process scenario: its fault-free twin, the run, the report.
fn run_process_scenario(scenario: &ProcessScenario, out: &std::path::Path) -> Result<bool, String> {
    let exe = find_phalanx()
        .ok_or("the phalanx binary is not next to phalanx-chaos: build it with the harness (cargo build --release -p phalanx -p phalanx-chaos)")?;
    let mut report = Report { identical: true, ..Report::default() };
    let plot = out.join("processes.svg");
    process_campaign_of(&exe, std::slice::from_ref(scenario), &out.join("processes"), &mut report, Some(&plot))?;
    report.write(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for v in &report.violations {
        println!("VIOLATION {v}");
    }
    println!("report: {}/report.md", out.display());
    Ok(report.violations.is_empty())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
