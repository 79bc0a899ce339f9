//! A client for callers of Ferry's native HTTP API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_sdk::client::ClientError> {
//! let ferry = ferry_sdk::client::Client::new("http://127.0.0.1:7070", Some("TOKEN".into()));
//! let out = ferry.invoke("hello", br#"{"name":"ada"}"#.to_vec()).await?;
//! println!("{}", String::from_utf8_lossy(&out.body));
//! # Ok(()) }
//! ```

use std::time::Duration;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error (`{"error": {"code", "message"}}`).
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: String,
    },
    /// The gateway could not be reached, or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    /// The gateway answered something this client does not understand.
    #[error("unexpected response: {0}")]
    Decode(String),
}

/// The result of a successful synchronous invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub body: Vec<u8>,
    pub version: Option<u32>,
    pub node: Option<String>,
    pub cold: bool,
    pub request_id: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Percent-encodes a path segment (function names are validated server-side; this
/// keeps a stray `?` or `/` from reaching another route).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base_url.into().trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = r.send().await.map_err(|e| ClientError::Transport {
            url: self.base.clone(),
            message: root_cause(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let e = &v["error"];
        Err(ClientError::Api {
            status,
            code: e["code"].as_str().unwrap_or("http_error").to_string(),
            message: e["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}: {text}")),
            request_id: e["request_id"].as_str().unwrap_or_default().to_string(),
        })
    }

    async fn json(&self, r: reqwest::RequestBuilder) -> Result<serde_json::Value, ClientError> {
        let resp = self.send(r).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET path` → JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.json(self.req(reqwest::Method::GET, path)).await
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    /// `PUT path` with a JSON body → JSON.
    pub async fn put_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.json(
            self.req(method, path)
                .header("content-type", "application/json")
                .body(bytes),
        )
        .await
    }

    /// `DELETE path` → JSON.
    pub async fn delete(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.json(self.req(reqwest::Method::DELETE, path)).await
    }

    /// Uploads a package (`.tar.gz` bytes) as the function's next version.
    pub async fn deploy(
        &self,
        name: &str,
        package: Vec<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/functions/{}/versions", seg(name)),
            )
            .header("content-type", "application/gzip")
            .timeout(Duration::from_secs(600))
            .body(package);
        self.json(r).await
    }

    /// Invokes `name` (or `name:VERSION`) synchronously with a JSON body.
    pub async fn invoke(&self, name: &str, input: Vec<u8>) -> Result<Invocation, ClientError> {
        self.invoke_as(name, input, "application/json").await
    }

    /// Invokes with an explicit content type (`application/octet-stream` for raw bytes).
    pub async fn invoke_as(
        &self,
        name: &str,
        input: Vec<u8>,
        content_type: &str,
    ) -> Result<Invocation, ClientError> {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/functions/{}/invoke", seg(name)),
            )
            .header("content-type", content_type)
            .body(input);
        let resp = self.send(r).await?;
        let h = resp.headers();
        let header = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let version = header("x-ferry-version").and_then(|v| v.parse().ok());
        let node = header("x-ferry-node");
        let cold = header("x-ferry-cold").is_some_and(|v| v == "true");
        let request_id = header("x-request-id");
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?
            .to_vec();
        Ok(Invocation {
            body,
            version,
            node,
            cold,
            request_id,
        })
    }
}

/// Options of an async submission.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// `critical`, `normal` (default) or `batch`.
    pub priority: Option<String>,
    /// Same key within 24 h: the same task, not a new one.
    pub idempotency_key: Option<String>,
    pub callback_url: Option<String>,
    /// Content type of the input (default `application/json`).
    pub content_type: Option<String>,
    /// The queue it waits in (default `default`).
    pub queue: Option<String>,
}

impl Client {
    /// Submits an async task; returns its id once it is durably queued.
    pub async fn submit(
        &self,
        name: &str,
        input: Vec<u8>,
        opts: &SubmitOptions,
    ) -> Result<String, ClientError> {
        let mut r = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/functions/{}/tasks", seg(name)),
            )
            .header(
                "content-type",
                opts.content_type.as_deref().unwrap_or("application/json"),
            )
            .body(input);
        if let Some(p) = &opts.priority {
            r = r.header("x-ferry-priority", p);
        }
        if let Some(q) = &opts.queue {
            r = r.header("x-ferry-queue", q);
        }
        if let Some(k) = &opts.idempotency_key {
            r = r.header("idempotency-key", k);
        }
        if let Some(u) = &opts.callback_url {
            r = r.header("x-ferry-callback-url", u);
        }
        let v = self.json(r).await?;
        v["task_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Decode(format!("no task_id in {v}")))
    }

    /// A task's current record.
    pub async fn task(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.get_json(&format!("/v1/tasks/{}", seg(id))).await
    }

    /// Polls a task until it reaches a final state or `timeout` passes (then returns
    /// its latest record as it is).
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let t = self.task(id).await?;
            let state = t["state"].as_str().unwrap_or_default();
            if !matches!(state, "queued" | "running") || std::time::Instant::now() >= deadline {
                return Ok(t);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Requests cancellation.
    pub async fn cancel(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.json(self.req(
            reqwest::Method::POST,
            &format!("/v1/tasks/{}/cancel", seg(id)),
        ))
        .await
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
