//! Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with
//! the matching HTTP status, and a JSON body reader whose failures are such errors
//! (malformed JSON is a 400 naming the parameter, an oversized body a 413).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: a parameter is missing, malformed or out of range.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(str::to_owned),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400: the prompt (plus the requested output) does not fit the context.
    pub fn context_length(message: impl Into<String>, param: &str) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(Some(param), message)
        }
    }

    /// 404: the model is not served here (the name cut to [`excerpt`]).
    pub fn model_not_found(model: &str) -> Self {
        let model = excerpt(model);
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        let (method, path) = (excerpt(method), excerpt(path));
        Self {
            code: Some("unknown_url"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown request URL: {method} {path}."),
            )
        }
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        let (method, path) = (excerpt(method), excerpt(path));
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}."),
        )
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(missing: bool) -> Self {
        let message = if missing {
            "You didn't provide an API key. Provide it in the Authorization header \
             (Authorization: Bearer YOUR_KEY)."
        } else {
            "Incorrect API key provided."
        };
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    /// 413: the body is larger than the server accepts.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the {limit} bytes this server accepts."),
        )
    }

    /// 429: the waiting queue is full.
    pub fn queue_full(waiting: usize) -> Self {
        Self {
            code: Some("queue_full"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("The server is at capacity ({waiting} requests waiting). Retry shortly."),
            )
        }
    }

    /// 403: the key may not use the served model.
    pub fn model_forbidden(key: &str, model: &str) -> Self {
        Self {
            code: Some("model_not_allowed"),
            ..Self::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!("The API key `{key}` may not use the model `{model}`."),
            )
        }
    }

    /// 429: a key's limit is reached.
    pub fn rate_limited(message: String, retry_after: u64) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after.min(u64::from(u32::MAX)) as u32),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "requests", message)
        }
    }

    /// 408: the body did not arrive within the body timeout.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "The request body did not arrive within {} s.",
                    limit.as_secs_f64()
                ),
            )
        }
    }

    /// 503: not ready yet, or shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("unavailable"),
            retry_after: Some(2),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: the details go to the log, never to the client.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request.",
        )
    }

    /// The OpenAI error object. The message is cut to [`MAX_MESSAGE`] characters: what
    /// a client sent is never echoed back whole.
    pub fn body(&self) -> Value {
        let mut message: String = self.message.chars().take(MAX_MESSAGE).collect();
        if message.len() < self.message.len() {
            message.push('…');
        }
        json!({
            "error": {
                "message": message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Longest error message sent, in characters.
pub const MAX_MESSAGE: usize = 512;

/// Client input quoted in an error: at most 64 characters, then `…`.
pub fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A response extension naming the error an [`ApiError`] became (for the audit log).
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        res.extensions_mut()
            .insert(ErrorCode(self.code.unwrap_or(self.kind)));
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// The request body as a JSON object. Anything else is a 400 (413 when too large).
pub struct JsonObject(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(crate::MAX_BODY_BYTES)
            } else {
                ApiError::invalid(None, format!("Could not read the request body: {e}"))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::invalid(
                None,
                format!("We could not parse the JSON body of your request: {e}"),
            )
        })?;
        if !value.is_object() {
            return Err(ApiError::invalid(
                None,
                "The request body must be a JSON object.",
            ));
        }
        Ok(JsonObject(value))
    }
}

/// Reads fields of `body` into `T`; a type error names the parameter.
pub fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde's messages end with " at line L column C" only for text input; a Value
        // has none, so the message is the type complaint alone.
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("Invalid value for '{p}': {inner}"),
            None => format!("Invalid request: {inner}"),
        };
        ApiError {
            param,
            ..ApiError::invalid(None, message)
        }
    })
}
