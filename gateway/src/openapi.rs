//! `/openapi.json`: the native API described in OpenAPI 3.1. Written by hand next to
//! the routes; `cli/tests/openapi.rs` checks that every route the router serves is here,
//! with the same methods, and that nothing here is missing from the router.

use serde_json::{Value, json};

fn param(name: &str, place: &str, desc: &str) -> Value {
    json!({
        "name": name,
        "in": place,
        "required": place == "path",
        "description": desc,
        "schema": {"type": "string"},
    })
}

fn name() -> Value {
    param(
        "name",
        "path",
        "function name; `name:VERSION` or `name:ALIAS` where an invocation is meant",
    )
}

fn ok(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"type": "object"}}}})
}

fn json_body(desc: &str) -> Value {
    json!({"required": true, "description": desc, "content": {"application/json": {"schema": {"type": "object"}}}})
}

/// One operation: summary, parameters, optional body, the success status and answer.
fn op(summary: &str, params: Vec<Value>, body: Option<Value>, status: &str, answer: &str) -> Value {
    let mut o = json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            status: ok(answer),
            "default": {"$ref": "#/components/responses/Error"},
        },
    });
    if let Some(b) = body {
        o["requestBody"] = b;
    }
    o
}

fn open_op(summary: &str, answer: &str, content_type: &str) -> Value {
    json!({
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": answer, "content": {content_type: {}}}},
    })
}

/// The document.
pub fn document() -> Value {
    let id = || param("id", "path", "task id");
    let tenant = || param("id", "path", "tenant id");
    let invoke_headers = || {
        vec![
            name(),
            param("version", "query", "run this version"),
            param(
                "Idempotency-Key",
                "header",
                "repeat-safe key (per function, within the window)",
            ),
            param(
                "X-Ferry-Log",
                "header",
                "`tail`: answer with X-Ferry-Log-Tail",
            ),
        ]
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Ferry gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The native HTTP API of Ferry. See docs/api.md for the narrative.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Error": {
                    "description": "an error with a stable code",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "properties": {"error": {"type": "object", "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "request_id": {"type": "string"},
                        }}},
                    }}},
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/functions": {
                "get": op("List the caller's functions", vec![], None, "200", "{functions: [...]}"),
                "post": op("Create a function (no versions yet)", vec![], Some(json_body("{name, description?}")), "201", "the function"),
            },
            "/v1/functions/{name}": {
                "get": op("A function and its versions", vec![name()], None, "200", "the function"),
            },
            "/v1/functions/{name}/versions": {
                "get": op("A function's versions", vec![name()], None, "200", "{versions: [...]}"),
                "post": {
                    "summary": "Upload a package (.tar.gz) as the next version",
                    "parameters": [name()],
                    "requestBody": {"required": true, "content": {"application/gzip": {}}},
                    "responses": {
                        "201": ok("the new version"),
                        "200": ok("the bytes equal the latest version's: unchanged"),
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                },
            },
            "/v1/functions/{name}/versions/{version}": {
                "get": op("One version", vec![name(), param("version", "path", "version number")], None, "200", "the version"),
            },
            "/v1/functions/{name}/invoke": {
                "post": {
                    "summary": "Invoke synchronously (latest, `name:VERSION` or `name:ALIAS`)",
                    "parameters": invoke_headers(),
                    "requestBody": {"description": "the function's input", "content": {"application/json": {}, "application/octet-stream": {}}},
                    "responses": {
                        "200": {"description": "the function's output; X-Ferry-Version names the version that ran", "content": {"application/json": {}, "application/octet-stream": {}}},
                        "429": {"description": "over a limit; Retry-After, X-Ferry-Limit"},
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                },
            },
            "/v1/functions/{name}/aliases": {
                "get": op("A function's aliases", vec![name()], None, "200", "{aliases: [...]}"),
            },
            "/v1/functions/{name}/aliases/{alias}": {
                "get": op("One alias", vec![name(), param("alias", "path", "alias")], None, "200", "the alias"),
                "put": op("Create or move an alias", vec![name(), param("alias", "path", "alias")], Some(json_body("{version} or {routes: [{version, weight}]}")), "200", "the alias"),
                "delete": op("Remove an alias", vec![name(), param("alias", "path", "alias")], None, "200", "{deleted: true}"),
            },
            "/v1/functions/{name}/tasks": {
                "post": {
                    "summary": "Submit an async task; 202 only once it is committed",
                    "parameters": [
                        name(),
                        param("Idempotency-Key", "header", "the same key returns the same task"),
                        param("X-Ferry-Priority", "header", "critical, normal or batch (default: the queue's class)"),
                        param("X-Ferry-Queue", "header", "the queue it waits in (default `default`); same as ?queue="),
                        param("queue", "query", "the queue it waits in"),
                        param("X-Ferry-Callback-Url", "header", "stored with the task"),
                    ],
                    "requestBody": {"description": "the task's input (≤ 1 MiB)", "content": {"application/json": {}, "application/octet-stream": {}}},
                    "responses": {
                        "202": ok("{task_id, status_url, version, idempotent_replay}"),
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                },
            },
            "/v1/callback-secret": {
                "get": op("The secret that signs the caller's task callbacks (a tenant's own)", vec![], None, "200", "{tenant, secret, header, scheme}"),
            },
            "/v1/tasks": {
                "get": op("List tasks, newest first", vec![
                    param("function", "query", "function name"),
                    param("state", "query", "queued, running, succeeded, failed, timed_out, cancelled, dead"),
                    param("since_ms", "query", "created at or after"),
                    param("until_ms", "query", "created before"),
                    param("limit", "query", "at most (≤ 1000; default 100)"),
                    param("after", "query", "the `next` of the previous page"),
                ], None, "200", "{tasks: [...], next: cursor or null}"),
            },
            "/v1/tasks/{id}": {
                "get": op("One task", vec![id()], None, "200", "the task"),
            },
            "/v1/tasks/{id}/cancel": {
                "post": {
                    "summary": "Cancel a task",
                    "parameters": [id()],
                    "responses": {
                        "200": ok("cancelled (it was queued)"),
                        "202": ok("cancellation requested (it runs)"),
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                },
            },
            "/v1/queues": {
                "get": op("Queues the caller may use, with queued and running counts", vec![], None, "200", "{queues: [{name, priority, qps, burst, mrt, queued, queued_by_priority, running, configured}]}"),
            },
            "/v1/queues/{name}": {
                "get": op("One queue", vec![param("name", "path", "queue name (admin: TENANT.NAME for a tenant's)")], None, "200", "the queue"),
                "put": op("Create or replace a queue (admin token)", vec![param("name", "path", "NAME or TENANT.NAME")], Some(json_body("{qps?, burst?, mrt?, priority?, description?}")), "201", "the queue (200 when replaced)"),
                "delete": op("Delete a queue (admin token); its tasks fall back to the defaults", vec![param("name", "path", "NAME or TENANT.NAME")], None, "200", "{deleted}"),
            },
            "/v1/reruns": {
                "post": op("Re-run a function's tasks selected by version, state and time, in the `reruns` queue (batch class, its own MRT) or the one named", vec![], Some(json_body("{function, version?, state?, since_ms?, until_ms?, limit?, queue?}")), "202", "{id, selected, status_url, tasks}"),
            },
            "/v1/reruns/{id}": {
                "get": op("A re-run's progress", vec![param("id", "path", "re-run id")], None, "200", "{selected, finished, done, states}"),
            },
            "/v1/packages/{sha256}": {
                "get": {
                    "summary": "A package's bytes (node agents; admin token)",
                    "parameters": [param("sha256", "path", "the package's sha256")],
                    "responses": {
                        "200": {"description": "the package", "content": {"application/gzip": {}}},
                        "default": {"$ref": "#/components/responses/Error"},
                    },
                },
            },
            "/v1/nodes": {
                "get": op("Node agents (admin token)", vec![], None, "200", "{nodes: [...]}"),
            },
            "/v1/nodes/{id}/{action}": {
                "post": op("Drain, eject or restore a node (admin token)", vec![param("id", "path", "node id"), param("action", "path", "drain, eject or restore")], None, "200", "the node's admin state"),
            },
            "/v1/clusters": {
                "get": op("The routing table (admin token)", vec![], None, "200", "{clusters: [...]}"),
            },
            "/v1/tenants": {
                "get": op("Tenants (admin token)", vec![], None, "200", "{tenants: [...]}"),
                "post": op("Create a tenant (admin token)", vec![], Some(json_body("{id, description?, limits?}")), "201", "the tenant"),
            },
            "/v1/tenants/{id}": {
                "get": op("One tenant (admin token)", vec![tenant()], None, "200", "the tenant"),
                "delete": op("Delete a tenant and revoke its keys (admin token)", vec![tenant()], None, "200", "{deleted, keys_revoked}"),
            },
            "/v1/tenants/{id}/limits": {
                "put": op("Replace a tenant's limits (admin token)", vec![tenant()], Some(json_body("{qps?, burst?, function_qps?, function_concurrency?, max_body?}")), "200", "the tenant"),
            },
            "/v1/tenants/{id}/keys": {
                "get": op("A tenant's keys, never the secrets (admin token)", vec![tenant()], None, "200", "{keys: [...]}"),
                "post": op("Create a key; the only answer that shows it (admin token)", vec![tenant()], Some(json_body("{description?}")), "201", "{id, key, prefix, ...}"),
            },
            "/v1/tenants/{id}/keys/{key_id}": {
                "delete": op("Revoke a key (admin token)", vec![tenant(), param("key_id", "path", "the key's id")], None, "200", "{revoked: true}"),
            },
            "/healthz": {"get": open_op("The process is up", "ok", "text/plain")},
            "/readyz": {"get": open_op("The store answers", "ready", "text/plain")},
            "/metrics": {"get": open_op("Prometheus metrics", "text exposition format", "text/plain")},
            "/openapi.json": {"get": open_op("This document", "OpenAPI 3.1", "application/json")},
        },
    })
}
