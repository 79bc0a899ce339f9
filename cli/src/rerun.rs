//! `ferry rerun`: re-run a function's tasks on the batch priority, and follow a re-run.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use serde_json::json;

use crate::ClientArgs;
use crate::client::connect;

#[derive(Subcommand, Debug)]
pub enum RerunCommand {
    /// Select a function's tasks and submit each input again as a new batch task.
    Start(StartArgs),
    /// A re-run's progress: its new tasks by state.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    pub function: String,
    /// Only tasks of this version
    #[arg(long)]
    pub version: Option<u32>,
    /// Only tasks in this state (e.g. failed)
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks created at or after (ms since the epoch)
    #[arg(long)]
    pub since_ms: Option<u64>,
    /// Only tasks created before (ms since the epoch)
    #[arg(long)]
    pub until_ms: Option<u64>,
    /// At most this many tasks [default: 1000]
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(cmd: RerunCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        RerunCommand::Start(a) => {
            let mut body = json!({ "function": a.function });
            for (k, v) in [
                ("version", a.version.map(|v| json!(v))),
                ("state", a.state.as_ref().map(|v| json!(v))),
                ("since_ms", a.since_ms.map(|v| json!(v))),
                ("until_ms", a.until_ms.map(|v| json!(v))),
                ("limit", a.limit.map(|v| json!(v))),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = connect(&a.client, env)
                .post_json("/v1/reruns", &body)
                .await
                .with_context(|| format!("re-run tasks of {}", a.function))?;
            if a.client.json {
                println!("{v}");
            } else {
                println!("{}", v["id"].as_str().unwrap_or_default());
                eprintln!(
                    "{} tasks selected and resubmitted on the batch priority; `ferry rerun status {}`",
                    v["selected"],
                    v["id"].as_str().unwrap_or_default()
                );
            }
        }
        RerunCommand::Status(a) => {
            let v = connect(&a.client, env)
                .get_json(&format!("/v1/reruns/{}", a.id))
                .await
                .with_context(|| format!("read re-run {}", a.id))?;
            if a.client.json {
                println!("{v}");
            } else {
                println!(
                    "{} of {} finished{} · {}",
                    v["finished"],
                    v["selected"],
                    if v["done"] == true { " (done)" } else { "" },
                    v["states"]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
