//! Operator commands: `ferry tenants …` and `ferry keys …` (they need the admin token).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use serde_json::json;

use crate::ClientArgs;
use crate::client::connect;

use crate::client::txt;

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[derive(Subcommand, Debug)]
pub enum TenantsCommand {
    /// List tenants and their limits.
    List(ClientArgs),
    /// Create a tenant.
    Create(CreateTenantArgs),
    /// Replace a tenant's limits (unset ones become unlimited).
    Limits(CreateTenantArgs),
    /// Delete a tenant and revoke its keys (its functions stay, admin-only).
    Delete(TenantArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TenantArgs {
    pub tenant: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CreateTenantArgs {
    /// Tenant id: lowercase letters, digits and '-', starting with a letter
    pub tenant: String,
    #[arg(long)]
    pub description: Option<String>,
    /// Invocations per second across the tenant
    #[arg(long)]
    pub qps: Option<f64>,
    /// Token-bucket size (requests admitted at once after a quiet spell)
    #[arg(long)]
    pub burst: Option<u32>,
    /// Invocations per second per function
    #[arg(long)]
    pub function_qps: Option<f64>,
    /// Synchronous invocations in flight per function (per gateway)
    #[arg(long)]
    pub function_concurrency: Option<u32>,
    /// Largest invocation body, in bytes
    #[arg(long)]
    pub max_body: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl CreateTenantArgs {
    fn limits(&self) -> serde_json::Value {
        let mut l = serde_json::Map::new();
        let mut set = |k: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                l.insert(k.into(), v);
            }
        };
        set("qps", self.qps.map(|v| json!(v)));
        set("burst", self.burst.map(|v| json!(v)));
        set("function_qps", self.function_qps.map(|v| json!(v)));
        set(
            "function_concurrency",
            self.function_concurrency.map(|v| json!(v)),
        );
        set("max_body", self.max_body.map(|v| json!(v)));
        serde_json::Value::Object(l)
    }
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key for a tenant; the key is printed once and never again.
    Create(CreateKeyArgs),
    /// List a tenant's keys (ids and prefixes, never the keys).
    List(TenantArgs),
    /// Revoke a key by its id.
    Revoke(RevokeKeyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CreateKeyArgs {
    pub tenant: String,
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RevokeKeyArgs {
    pub tenant: String,
    pub key_id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn tenant_line(t: &serde_json::Value) -> String {
    let limits = t["limits"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", txt(v)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unlimited".into());
    format!("{:<24} {}", txt(&t["id"]), limits)
}

pub async fn tenants(cmd: TenantsCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantsCommand::List(a) => {
            let v = connect(&a, env)
                .get_json("/v1/tenants")
                .await
                .context("list tenants")?;
            if a.json {
                print_json(&v);
            } else {
                println!("{:<24} LIMITS", "TENANT");
                for t in v["tenants"].as_array().into_iter().flatten() {
                    println!("{}", tenant_line(t));
                }
            }
        }
        TenantsCommand::Create(a) => {
            let mut body = json!({ "id": a.tenant, "limits": a.limits() });
            if let Some(d) = &a.description {
                body["description"] = json!(d);
            }
            let v = connect(&a.client, env)
                .post_json("/v1/tenants", &body)
                .await
                .with_context(|| format!("create tenant {}", a.tenant))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!("{}", tenant_line(&v));
            }
        }
        TenantsCommand::Limits(a) => {
            let v = connect(&a.client, env)
                .put_json(&format!("/v1/tenants/{}/limits", a.tenant), &a.limits())
                .await
                .with_context(|| format!("set the limits of {}", a.tenant))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!("{}", tenant_line(&v));
            }
        }
        TenantsCommand::Delete(a) => {
            let v = connect(&a.client, env)
                .delete(&format!("/v1/tenants/{}", a.tenant))
                .await
                .with_context(|| format!("delete tenant {}", a.tenant))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!(
                    "deleted {} ({} keys revoked)",
                    a.tenant,
                    txt(&v["keys_revoked"])
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn keys(cmd: KeysCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Create(a) => {
            let mut body = json!({});
            if let Some(d) = &a.description {
                body["description"] = json!(d);
            }
            let v = connect(&a.client, env)
                .post_json(&format!("/v1/tenants/{}/keys", a.tenant), &body)
                .await
                .with_context(|| format!("create a key for {}", a.tenant))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!("{}", txt(&v["key"]));
                eprintln!(
                    "key {} for tenant {}: shown once, keep it now (only its hash is stored)",
                    txt(&v["id"]),
                    a.tenant
                );
            }
        }
        KeysCommand::List(a) => {
            let v = connect(&a.client, env)
                .get_json(&format!("/v1/tenants/{}/keys", a.tenant))
                .await
                .with_context(|| format!("list the keys of {}", a.tenant))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!(
                    "{:<28} {:<12} {:<15} DESCRIPTION",
                    "ID", "PREFIX", "CREATED_MS"
                );
                for k in v["keys"].as_array().into_iter().flatten() {
                    println!(
                        "{:<28} {:<12} {:<15} {}",
                        txt(&k["id"]),
                        txt(&k["prefix"]),
                        txt(&k["created_ms"]),
                        txt(&k["description"])
                    );
                }
            }
        }
        KeysCommand::Revoke(a) => {
            let v = connect(&a.client, env)
                .delete(&format!("/v1/tenants/{}/keys/{}", a.tenant, a.key_id))
                .await
                .with_context(|| format!("revoke key {}", a.key_id))?;
            if a.client.json {
                print_json(&v);
            } else {
                println!("revoked {}", a.key_id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
