//! The router: the endpoints, the API key check, the request body's limits, and the
//! small endpoints (`/health`, `/v1/models`, `/metrics`, `/tokenize`, `/detokenize`).
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde_json::{json, Value};

use crate::body::read_body;
use crate::error::ApiError;
use crate::params;
use crate::App;

/// The OpenAPI description of every endpoint (kept with the table below: a unit test
/// checks they list the same ones).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every endpoint served: (method, path). `/health` alone needs no API key.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
];

/// An endpoint's handler.
fn handler(method: &str, path: &str) -> Option<MethodRouter<Arc<App>>> {
    Some(match (method, path) {
        ("GET", "/health") => get(health),
        ("GET", "/openapi.json") => get(openapi),
        ("GET", "/v1/models") => get(models),
        ("GET", "/metrics") => get(metrics),
        ("POST", "/v1/completions") => post(crate::completions::handle),
        ("POST", "/v1/chat/completions") => post(crate::chat::handle),
        ("POST", "/tokenize") => post(tokenize),
        ("POST", "/detokenize") => post(detokenize),
        _ => return None,
    })
}

pub fn router(app: Arc<App>) -> Router {
    let mut open = Router::new();
    let mut api = Router::new();
    for &(method, path) in ENDPOINTS {
        let Some(h) = handler(method, path) else {
            continue;
        };
        if path == "/health" {
            open = open.route(path, h);
        } else {
            api = api.route(path, h);
        }
    }
    let api = api.route_layer(middleware::from_fn_with_state(app.clone(), auth));
    open.merge(api).fallback(not_found).with_state(app)
}

/// Equal byte strings, compared in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    a.len() == b.len() && diff == 0
}

/// With an API key, `Authorization: Bearer KEY` or 401.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), key.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is needed: send `Authorization: Bearer KEY`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// 200 while the model serves; 503 with the reason once it cannot (a weight file changed
/// under it).
async fn health(State(app): State<Arc<App>>) -> axum::response::Response {
    match app.metrics.broken() {
        None => axum::Json(json!({"status": "ok"})).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "error", "message": why})),
        )
            .into_response(),
    }
}

/// The model, then its adapters as vLLM lists them (`root` the folder, `parent` the
/// model).
async fn models(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut data = vec![json!({
        "id": app.name,
        "object": "model",
        "created": app.started,
        "owned_by": "gpt2kit",
        "max_model_len": app.max_model_len,
    })];
    for (name, dir) in &app.adapters {
        data.push(json!({
            "id": name,
            "object": "model",
            "created": app.started,
            "owned_by": "gpt2kit",
            "root": dir.display().to_string(),
            "parent": app.name,
            "max_model_len": app.max_model_len,
        }));
    }
    axum::Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// vLLM's `/tokenize`: `{"prompt": text}` → its token ids.
async fn tokenize(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let obj = params::object(&read_body(req).await?)?;
    params::only_known(&obj, &[&["model", "prompt", "add_special_tokens"]])?;
    app.check_model(params::string(&obj, "model")?.as_deref())?;
    params::boolean(&obj, "add_special_tokens")?;
    let Some(text) = params::string(&obj, "prompt")? else {
        return Err(ApiError::invalid("prompt", "`prompt` is required"));
    };
    let tokens = app
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let body = json!({"tokens": tokens, "count": tokens.len(), "max_model_len": app.max_model_len});
    Ok(axum::Json(body).into_response())
}

/// vLLM's `/detokenize`: `{"tokens": ids}` → their text.
async fn detokenize(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let obj = params::object(&read_body(req).await?)?;
    params::only_known(&obj, &[&["model", "tokens"]])?;
    app.check_model(params::string(&obj, "model")?.as_deref())?;
    let ids = match obj.get("tokens") {
        Some(v @ Value::Array(_)) => params::ids(v, "tokens")?,
        Some(v) => {
            return Err(ApiError::invalid(
                "tokens",
                format!(
                    "`tokens` must be a list of token ids, got {}",
                    params::type_name(v)
                ),
            ))
        }
        None => return Err(ApiError::invalid("tokens", "`tokens` is required")),
    };
    let text = app
        .tokenizer
        .decode(&ids)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(axum::Json(json!({"prompt": text})).into_response())
}

#[cfg(test)]
mod tests {
    use super::{handler, same, ENDPOINTS, OPENAPI};

    #[test]
    fn every_endpoint_is_described_and_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut described: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let mut served: Vec<(String, String)> = ENDPOINTS
            .iter()
            .map(|&(m, p)| (m.to_string(), p.to_string()))
            .collect();
        described.sort();
        served.sort();
        assert_eq!(described, served);
        for &(m, p) in ENDPOINTS {
            assert!(handler(m, p).is_some(), "{m} {p} has no handler");
        }
    }

    #[test]
    fn key_comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
