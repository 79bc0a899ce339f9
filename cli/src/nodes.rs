//! `ferry nodes` (every node's state, usage, work and breakers) and `ferry node
//! drain|eject|restore ID`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use serde_json::Value;

use crate::ClientArgs;
use crate::client::{cell, connect};

#[derive(Subcommand, Debug, Clone)]
pub enum NodeCommand {
    /// Stop placing new work on a node; running work finishes.
    Drain(NodeAdminArgs),
    /// Take a node out of placement by hand until it is restored.
    Eject(NodeAdminArgs),
    /// Put a drained or ejected node back, closing its circuit breakers.
    Restore(NodeAdminArgs),
}

#[derive(Args, Debug, Clone)]
pub struct NodeAdminArgs {
    /// Node id
    pub id: String,
    /// The node's cluster (only when the id is known in several)
    #[arg(long)]
    pub cluster: Option<String>,
    /// Why (kept with the setting)
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// "used/total" of one resource.
fn share(n: &Value, what: &str) -> String {
    match n["used"].get(what) {
        Some(u) => format!("{}/{}", cell(u), cell(&n["capacity"][what])),
        None => format!("-/{}", cell(&n["capacity"][what])),
    }
}

/// The breaker column: the node's own when not closed, and open function breakers.
fn breakers(n: &Value) -> String {
    let mut parts = vec![];
    let b = &n["breaker"];
    if b.is_object() && b["state"] != "closed" {
        parts.push(format!(
            "node:{}({}ms,x{})",
            cell(&b["state"]),
            cell(&b["ejected_for_ms"]),
            cell(&b["ejections"])
        ));
    }
    for f in n["function_breakers"].as_array().into_iter().flatten() {
        if f["state"] != "closed" {
            parts.push(format!("{}:{}", cell(&f["function"]), cell(&f["state"])));
        }
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub async fn list(a: ClientArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let v = connect(&a, env)
        .get_json("/v1/nodes")
        .await
        .context("list nodes")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<8} {:<9} {:<8} {:>11} {:>13} {:>6} {:>4}  {:<14} BREAKERS",
        "NODE", "CLUSTER", "STATE", "ADMIN", "CPU(m)", "MEM(MiB)", "SLOTS", "RUN", "TAGS"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let tags: Vec<&str> = n["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let running = n["running"].as_array().map(|r| r.len().to_string());
        println!(
            "{:<24} {:<8} {:<9} {:<8} {:>11} {:>13} {:>6} {:>4}  {:<14} {}",
            cell(&n["id"]),
            cell(&n["cluster"]),
            cell(&n["state"]),
            cell(&n["admin"]),
            share(n, "cpu_millis"),
            share(n, "memory_mb"),
            share(n, "slots"),
            running.unwrap_or_else(|| "-".into()),
            tags.join(","),
            breakers(n)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn admin(cmd: NodeCommand, env: &Env) -> anyhow::Result<ExitCode> {
    let (action, a) = match cmd {
        NodeCommand::Drain(a) => ("drain", a),
        NodeCommand::Eject(a) => ("eject", a),
        NodeCommand::Restore(a) => ("restore", a),
    };
    let mut path = format!("/v1/nodes/{}/{action}", a.id);
    let mut query = vec![];
    if let Some(c) = &a.cluster {
        query.push(format!("cluster={c}"));
    }
    if let Some(r) = &a.reason {
        query.push(format!("reason={}", url_escape(r)));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let v = connect(&a.client, env)
        .post_json(&path, &serde_json::json!({}))
        .await
        .with_context(|| format!("{action} node {}", a.id))?;
    if a.client.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "node {} in cluster {}: {}",
            cell(&v["node"]),
            cell(&v["cluster"]),
            cell(&v["admin"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes everything but unreserved characters.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
