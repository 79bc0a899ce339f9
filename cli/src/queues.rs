//! `ferry queues` (each queue's limits, queued and running tasks) and `ferry queue
//! set|delete NAME` (admin token).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use serde_json::{Value, json};

use crate::ClientArgs;
use crate::client::{cell, connect};

#[derive(Subcommand, Debug, Clone)]
pub enum QueueCommand {
    /// Create or replace a queue; limits left out are unlimited.
    Set(SetQueueArgs),
    /// Delete a queue; its tasks fall back to the defaults.
    Delete(QueueArgs),
}

#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// NAME for the operator's queue, TENANT.NAME for a tenant's
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SetQueueArgs {
    /// NAME for the operator's queue, TENANT.NAME for a tenant's
    pub name: String,
    /// Submissions per second (per gateway)
    #[arg(long)]
    pub qps: Option<f64>,
    /// Token-bucket size (submissions admitted at once after a quiet spell)
    #[arg(long)]
    pub burst: Option<u32>,
    /// Max running tasks of this queue per cluster (0 pauses it)
    #[arg(long)]
    pub mrt: Option<u32>,
    /// Class of tasks that do not ask for one: critical, normal or batch
    #[arg(long)]
    pub priority: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn header() -> String {
    format!(
        "{:<28} {:<9} {:>8} {:>6} {:>8} {:>8}",
        "QUEUE", "PRIORITY", "QPS", "MRT", "QUEUED", "RUNNING"
    )
}

fn line(q: &Value) -> String {
    let name = if q["configured"] == json!(false) {
        format!("{} (implicit)", cell(&q["name"]))
    } else {
        cell(&q["name"])
    };
    format!(
        "{:<28} {:<9} {:>8} {:>6} {:>8} {:>8}",
        name,
        cell(&q["priority"]),
        cell(&q["qps"]),
        cell(&q["mrt"]),
        cell(&q["queued"]),
        cell(&q["running"]),
    )
}

pub async fn list(a: ClientArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let v = connect(&a, env)
        .get_json("/v1/queues")
        .await
        .context("list queues")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", header());
    for q in v["queues"].as_array().into_iter().flatten() {
        println!("{}", line(q));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn admin(cmd: QueueCommand, env: &Env) -> anyhow::Result<ExitCode> {
    let (client, v) = match cmd {
        QueueCommand::Set(a) => {
            let mut body = serde_json::Map::new();
            let mut set = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            };
            set("qps", a.qps.map(|v| json!(v)));
            set("burst", a.burst.map(|v| json!(v)));
            set("mrt", a.mrt.map(|v| json!(v)));
            set("priority", a.priority.clone().map(Value::String));
            set("description", a.description.clone().map(Value::String));
            let v = connect(&a.client, env)
                .put_json(&format!("/v1/queues/{}", a.name), &Value::Object(body))
                .await
                .with_context(|| format!("set queue {}", a.name))?;
            (a.client, v)
        }
        QueueCommand::Delete(a) => {
            let v = connect(&a.client, env)
                .delete(&format!("/v1/queues/{}", a.name))
                .await
                .with_context(|| format!("delete queue {}", a.name))?;
            (a.client, v)
        }
    };
    if client.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if v.get("deleted").is_some() {
        println!("deleted {}", cell(&v["deleted"]));
    } else {
        println!("{}\n{}", header(), line(&v));
    }
    Ok(ExitCode::SUCCESS)
}
