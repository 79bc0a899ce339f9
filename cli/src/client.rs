//! Client commands: talk to a gateway over HTTP with the SDK's client.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ferry_core::config::Env;
use ferry_sdk::client::Client;

/// A JSON value as plain text (strings unquoted), so table columns pad.
pub(crate) fn txt(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A table cell: [`txt`], with `-` for nothing.
pub(crate) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        other => txt(other),
    }
}

use crate::{ClientArgs, DeployArgs, InvokeArgs, RunArgs, TaskArgs, TasksArgs, VersionsArgs};

/// Gateway URL and token: flag → FERRY_URL/FERRY_TOKEN → defaults (and `./.ferry/token`,
/// which `ferry up` writes, so a local cluster needs no exports).
pub fn connect(a: &ClientArgs, env: &Env) -> Client {
    let url = a
        .url
        .clone()
        .or_else(|| env.get("FERRY_URL").map(str::to_string))
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    Client::new(url, token(a, env))
}

/// The token: `--token`, else FERRY_TOKEN, else `./.ferry/token`.
pub fn token(a: &ClientArgs, env: &Env) -> Option<String> {
    a.token
        .clone()
        .or_else(|| env.get("FERRY_TOKEN").map(str::to_string))
        .or_else(|| {
            std::fs::read_to_string(".ferry/token")
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        })
}

/// `--data`: inline text, `@FILE`, or `-` for stdin.
pub fn read_input(data: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match data {
        None => Ok(b"{}".to_vec()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("read stdin")?;
            Ok(buf)
        }
        Some(d) if d.starts_with('@') => {
            std::fs::read(&d[1..]).with_context(|| format!("read {}", &d[1..]))
        }
        Some(d) => Ok(d.as_bytes().to_vec()),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn deploy(a: DeployArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.build {
        build(&a.dir)?;
    }
    let (manifest, package) = pack(&a.dir).await?;
    let client = connect(&a.client, env);
    let v = client
        .deploy(&manifest.name, package)
        .await
        .with_context(|| format!("deploy {}", manifest.name))?;
    if a.client.json {
        print_json(&v);
    } else {
        let unchanged = if v["unchanged"].as_bool() == Some(true) {
            " (unchanged)"
        } else {
            ""
        };
        println!(
            "{} version {}{}  sha256:{}  {} bytes",
            v["name"].as_str().unwrap_or(&manifest.name),
            v["version"],
            unchanged,
            v["sha256"].as_str().unwrap_or("?"),
            v["size"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Packages a function folder (off the async threads: it reads and compresses files).
async fn pack(dir: &Path) -> anyhow::Result<(ferry_core::package::Manifest, Vec<u8>)> {
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || ferry_core::package::pack_dir(&owned))
        .await
        .context("package the function")?
        .with_context(|| format!("package {}", dir.display()))
}

/// Runs ferry.toml's `[build] command` in the function's folder.
fn build(dir: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dir.join(ferry_core::package::MANIFEST))
        .with_context(|| format!("read {}/ferry.toml", dir.display()))?;
    let m = ferry_core::package::Manifest::parse(&text)?;
    let Some(cmd) = m
        .build
        .as_ref()
        .map(|b| b.command.clone())
        .filter(|c| !c.is_empty())
    else {
        return Ok(());
    };
    eprintln!("building: {}", cmd.join(" "));
    let status = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .status()
        .with_context(|| format!("run {}", cmd[0]))?;
    anyhow::ensure!(status.success(), "build command failed: {status}");
    Ok(())
}

pub async fn invoke(a: InvokeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let input = read_input(a.data.as_deref())?;
    let client = connect(&a.client, env);
    if a.is_async {
        let opts = ferry_sdk::client::SubmitOptions {
            priority: a.priority.clone(),
            idempotency_key: a.idempotency_key.clone(),
            callback_url: None,
            content_type: a.raw.then(|| "application/octet-stream".to_string()),
            queue: a.queue.clone(),
        };
        let id = client
            .submit(&a.name, input, &opts)
            .await
            .with_context(|| format!("submit {}", a.name))?;
        if !a.wait {
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        let t = client
            .wait(&id, std::time::Duration::from_secs(3600))
            .await
            .context("wait for the task")?;
        return print_task_result(&t);
    }
    let ct = if a.raw {
        "application/octet-stream"
    } else {
        "application/json"
    };
    let started = std::time::Instant::now();
    let out = client
        .invoke_as(&a.name, input, ct)
        .await
        .with_context(|| format!("invoke {}", a.name))?;
    let mut stdout = std::io::stdout();
    stdout.write_all(&out.body).context("write output")?;
    if !out.body.ends_with(b"\n") && !out.body.is_empty() {
        let _ = stdout.write_all(b"\n");
    }
    if a.verbose {
        eprintln!(
            "version {} · node {} · {}{:.1} ms · request {}",
            out.version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            out.node.as_deref().unwrap_or("?"),
            if out.cold { "cold · " } else { "" },
            started.elapsed().as_secs_f64() * 1000.0,
            out.request_id.as_deref().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a finished task's output (exit 0) or its error (exit 4: the function failed,
/// 1: anything else).
fn print_task_result(t: &serde_json::Value) -> anyhow::Result<ExitCode> {
    match t["state"].as_str().unwrap_or_default() {
        "succeeded" => {
            use base64::Engine;
            let out = base64::engine::general_purpose::STANDARD
                .decode(t["output_base64"].as_str().unwrap_or_default())
                .unwrap_or_default();
            std::io::stdout().write_all(&out).context("write output")?;
            if !out.ends_with(b"\n") && !out.is_empty() {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        state => {
            eprintln!(
                "error: task {} {state}: {}",
                txt(&t["id"]),
                txt(&t["error"])
            );
            Ok(ExitCode::from(if state == "failed" { 4 } else { 1 }))
        }
    }
}

pub async fn task(a: TaskArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let client = connect(&a.client, env);
    let t = match a.wait {
        Some(secs) => {
            client
                .wait(&a.id, std::time::Duration::from_secs(secs))
                .await
        }
        None => client.task(&a.id).await,
    }
    .with_context(|| format!("task {}", a.id))?;
    print_json(&t);
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(a: TaskArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let t = connect(&a.client, env)
        .cancel(&a.id)
        .await
        .with_context(|| format!("cancel {}", a.id))?;
    println!(
        "{} {}",
        txt(&t["id"]),
        if t["state"] == "cancelled" {
            "cancelled"
        } else {
            "cancellation requested"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn tasks(a: TasksArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/tasks?limit={}", a.limit);
    if let Some(f) = &a.function {
        path.push_str(&format!("&function={f}"));
    }
    if let Some(s) = &a.state {
        path.push_str(&format!("&state={s}"));
    }
    if let Some(c) = &a.after {
        path.push_str(&format!("&after={c}"));
    }
    let Some(v) = fetch_or_print(&a.client, env, &path, "tasks").await? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "{:<28} {:<16} {:>4} {:<10} {:<9} {:>4}  ERROR",
        "TASK", "FUNCTION", "VER", "STATE", "PRIORITY", "TRY"
    );
    for t in v["tasks"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<28} {:<16} {:>4} {:<10} {:<9} {:>4}  {}",
            txt(&t["id"]),
            txt(&t["function"]),
            txt(&t["version"]),
            txt(&t["state"]),
            txt(&t["priority"]),
            txt(&t["attempt"]),
            txt(&t["error"])
        );
    }
    if let Some(next) = v["next"].as_str() {
        eprintln!("more: add --after {next}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn callback_secret(a: ClientArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let v = connect(&a, env)
        .get_json("/v1/callback-secret")
        .await
        .context("read the callback secret")?;
    if a.json {
        print_json(&v);
    } else {
        println!("{}", txt(&v["secret"]));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn functions(a: ClientArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let Some(v) = fetch_or_print(&a, env, "/v1/functions", "functions").await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let list = v["functions"].as_array().cloned().unwrap_or_default();
    println!("{:<24} {:>7}  DESCRIPTION", "NAME", "LATEST");
    for f in list {
        println!(
            "{:<24} {:>7}  {}",
            f["name"].as_str().unwrap_or(""),
            txt(&f["latest_version"]),
            f["description"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn versions(a: VersionsArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/functions/{}/versions", a.name);
    let Some(v) = fetch_or_print(&a.client, env, &path, "versions").await? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!("{:>7}  {:<6} {:>10}  SHA256", "VERSION", "KIND", "BYTES");
    for r in v["versions"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:>7}  {:<6} {:>10}  {}",
            txt(&r["version"]),
            r["kind"].as_str().unwrap_or(""),
            txt(&r["size"]),
            r["sha256"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// GETs `path`; with `--json` prints it and returns `None` (nothing left to do).
async fn fetch_or_print(
    a: &ClientArgs,
    env: &Env,
    path: &str,
    what: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let v = connect(a, env)
        .get_json(path)
        .await
        .with_context(|| format!("list {what}"))?;
    if a.json {
        print_json(&v);
        return Ok(None);
    }
    Ok(Some(v))
}

pub async fn clusters(a: ClientArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let Some(v) = fetch_or_print(&a, env, "/v1/clusters", "clusters").await? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "{:<12} {:<9} {:>6} {:>6} {:>10}",
        "CLUSTER", "STATE", "WEIGHT", "NODES", "INSTANCES"
    );
    for c in v["clusters"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<12} {:<9} {:>6} {:>6} {:>10}",
            c["name"].as_str().unwrap_or(""),
            c["admin_state"].as_str().unwrap_or(""),
            txt(&c["weight"]),
            txt(&c["nodes"]),
            c["order_servers"].as_array().map(|a| a.len()).unwrap_or(0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry run DIR`: package and run a function locally, no servers involved.
pub async fn run_local(a: RunArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let function_env = crate::settings::run_env(&a, env)?;
    let input = read_input(a.data.as_deref())?;
    let (manifest, package) = pack(&a.dir).await?;
    let sha = ferry_core::id::sha256_hex(&package);
    let cache_dir = a
        .cache_dir
        .unwrap_or_else(|| PathBuf::from(".ferry/run-cache"));
    let runtime = ferry_runtime::Runtime::new(ferry_runtime::Config {
        cache_dir,
        ..Default::default()
    })
    .context("start the runtime")?;
    let rt = runtime.clone();
    let s = sha.clone();
    tokio::task::spawn_blocking(move || rt.prepare(&s, &package))
        .await
        .context("prepare")?
        .map_err(ferry_core::Error::from)?;
    let req = ferry_runtime::Request {
        input,
        limits: manifest.limits,
        function: manifest.name.clone(),
        version: 0,
        request_id: ferry_core::id::new_id(),
        progress: None,
        env: function_env,
    };
    let inv = runtime
        .invoke(&sha, req)
        .await
        .map_err(ferry_core::Error::from)?;
    if !inv.log_tail.is_empty() {
        eprint!("{}", inv.log_tail);
    }
    match inv.outcome {
        ferry_runtime::Outcome::Succeeded(out) => {
            std::io::stdout().write_all(&out).context("write output")?;
            if !out.ends_with(b"\n") {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        ferry_runtime::Outcome::FunctionError(m) => {
            eprintln!("error: function_error: {m}");
            Ok(ExitCode::from(4))
        }
        ferry_runtime::Outcome::TimedOut => {
            eprintln!(
                "error: timeout: the function ran past {} ms",
                manifest.limits.timeout_ms
            );
            Ok(ExitCode::from(1))
        }
        ferry_runtime::Outcome::Failed(m) => {
            anyhow::bail!("the runtime could not run the function: {m}")
        }
    }
}
