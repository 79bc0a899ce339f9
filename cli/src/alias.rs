//! `ferry alias …`: point an alias at a version, or split it between versions by weight.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use serde_json::json;

use crate::ClientArgs;
use crate::client::connect;

#[derive(Subcommand, Debug)]
pub enum AliasCommand {
    /// Point ALIAS at one version (`3`) or split it by weight (`3=90 4=10`).
    Set(SetArgs),
    /// List a function's aliases.
    List(ListArgs),
    /// Remove an alias.
    Rm(RmArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    pub function: String,
    pub alias: String,
    /// VERSION or VERSION=WEIGHT, one or more
    #[arg(required = true)]
    pub routes: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    pub function: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RmArgs {
    pub function: String,
    pub alias: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `3` → (3, 100); `3=90` → (3, 90).
pub fn parse_routes(routes: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    routes
        .iter()
        .map(|r| {
            let (v, w) = r.split_once('=').unwrap_or((r.as_str(), "100"));
            let version: u32 = v
                .parse()
                .with_context(|| format!("parse the version in {r:?} (VERSION[=WEIGHT])"))?;
            let weight: u32 = w
                .parse()
                .with_context(|| format!("parse the weight in {r:?} (VERSION[=WEIGHT])"))?;
            Ok(json!({ "version": version, "weight": weight }))
        })
        .collect()
}

fn routes_text(a: &serde_json::Value) -> String {
    a["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{}={}", r["version"], r["weight"]))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn run(cmd: AliasCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        AliasCommand::Set(a) => {
            let routes = parse_routes(&a.routes)?;
            let v = connect(&a.client, env)
                .put_json(
                    &format!("/v1/functions/{}/aliases/{}", a.function, a.alias),
                    &json!({ "routes": routes }),
                )
                .await
                .with_context(|| format!("set alias {}:{}", a.function, a.alias))?;
            if a.client.json {
                println!("{v}");
            } else {
                println!("{}:{} → {}", a.function, a.alias, routes_text(&v));
            }
        }
        AliasCommand::List(a) => {
            let v = connect(&a.client, env)
                .get_json(&format!("/v1/functions/{}/aliases", a.function))
                .await
                .with_context(|| format!("list the aliases of {}", a.function))?;
            if a.client.json {
                println!("{v}");
            } else {
                println!("{:<16} ROUTES (VERSION=WEIGHT)", "ALIAS");
                for al in v["aliases"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {}",
                        al["alias"].as_str().unwrap_or_default(),
                        routes_text(al)
                    );
                }
            }
        }
        AliasCommand::Rm(a) => {
            connect(&a.client, env)
                .delete(&format!("/v1/functions/{}/aliases/{}", a.function, a.alias))
                .await
                .with_context(|| format!("remove alias {}:{}", a.function, a.alias))?;
            println!("removed {}:{}", a.function, a.alias);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let r = parse_routes(&["3=90".into(), "4=10".into()]).unwrap();
        assert_eq!(
            r,
            vec![
                json!({"version": 3, "weight": 90}),
                json!({"version": 4, "weight": 10})
            ]
        );
        assert_eq!(parse_routes(&["7".into()]).unwrap()[0]["weight"], 100);
        assert!(parse_routes(&["x=1".into()]).is_err());
        assert!(parse_routes(&["1=-1".into()]).is_err());
    }
}
