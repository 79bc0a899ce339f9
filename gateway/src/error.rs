//! HTTP errors: every failure is answered as `{"error": {"code", "message", "request_id"}}`
//! with the status its [`ErrorCode`] maps to.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_core::{Error, ErrorCode};

/// A handler's error. The request-id middleware fills in the id and logs it once.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl ApiError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self(Error::new(code, msg))
    }
}

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.0.to_json(""))).into_response();
        resp.extensions_mut().insert(self.0);
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
