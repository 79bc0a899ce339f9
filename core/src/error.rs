//! The one error vocabulary: every failure a caller can see has a stable [`ErrorCode`],
//! which maps to an HTTP status and a gRPC code, and back.

use std::fmt;

/// Stable, machine-readable error codes. The string forms are part of the public API:
/// never rename one, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    InvalidJson,
    InvalidName,
    InvalidPackage,
    InvalidWasm,
    UnsafeArchive,
    MissingManifest,
    InvalidManifest,
    Unauthorized,
    Forbidden,
    NotFound,
    FunctionNotFound,
    VersionNotFound,
    PackageNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    Conflict,
    RateLimited,
    NoCapacity,
    NodeLost,
    Timeout,
    FunctionError,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 25] = [
        Self::BadRequest,
        Self::InvalidJson,
        Self::InvalidName,
        Self::InvalidPackage,
        Self::InvalidWasm,
        Self::UnsafeArchive,
        Self::MissingManifest,
        Self::InvalidManifest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::FunctionNotFound,
        Self::VersionNotFound,
        Self::PackageNotFound,
        Self::MethodNotAllowed,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::Conflict,
        Self::RateLimited,
        Self::NoCapacity,
        Self::NodeLost,
        Self::Timeout,
        Self::FunctionError,
        Self::Unavailable,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidJson => "invalid_json",
            Self::InvalidName => "invalid_name",
            Self::InvalidPackage => "invalid_package",
            Self::InvalidWasm => "invalid_wasm",
            Self::UnsafeArchive => "unsafe_archive",
            Self::MissingManifest => "missing_manifest",
            Self::InvalidManifest => "invalid_manifest",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::FunctionNotFound => "function_not_found",
            Self::VersionNotFound => "version_not_found",
            Self::PackageNotFound => "package_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Conflict => "conflict",
            Self::RateLimited => "rate_limited",
            Self::NoCapacity => "no_capacity",
            Self::NodeLost => "node_lost",
            Self::Timeout => "timeout",
            Self::FunctionError => "function_error",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest
            | Self::InvalidJson
            | Self::InvalidName
            | Self::InvalidPackage
            | Self::InvalidWasm
            | Self::UnsafeArchive
            | Self::MissingManifest
            | Self::InvalidManifest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound
            | Self::FunctionNotFound
            | Self::VersionNotFound
            | Self::PackageNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::FunctionError | Self::NodeLost => 502,
            Self::NoCapacity | Self::Unavailable => 503,
            Self::Timeout => 504,
        }
    }

    /// The gRPC status code this error travels as between components.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self.http_status() {
            400 | 413 | 415 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            502 => Code::Aborted,
            _ => Code::Internal,
        }
    }

    /// Best guess for a gRPC status that carries no `ferry-error-code`.
    pub fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => Self::BadRequest,
            Code::Unauthenticated => Self::Unauthorized,
            Code::PermissionDenied => Self::Forbidden,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists | Code::Aborted => Self::Conflict,
            Code::ResourceExhausted => Self::NoCapacity,
            Code::Unavailable => Self::Unavailable,
            // A call cut off by its deadline (tonic reports "Timeout expired" as
            // Cancelled): it may have run, so it is a timeout, never retried.
            Code::DeadlineExceeded | Code::Cancelled => Self::Timeout,
            _ => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a stable code and a human message. This is what crosses component
/// boundaries (as a gRPC status) and what callers see (as an HTTP JSON body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

/// The gRPC metadata key that carries the stable code.
pub const GRPC_CODE_KEY: &str = "ferry-error-code";

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code.grpc_code(), self.message.clone());
        if let Ok(v) = self.code.as_str().parse() {
            status.metadata_mut().insert(GRPC_CODE_KEY, v);
        }
        status
    }

    pub fn from_status(status: &tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(GRPC_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse)
            .unwrap_or_else(|| ErrorCode::from_grpc(status.code()));
        Self::new(code, status.message())
    }

    /// The JSON body every HTTP error is answered with.
    pub fn to_json(&self, request_id: &str) -> serde_json::Value {
        serde_json::json!({
            "error": { "code": self.code.as_str(), "message": self.message, "request_id": request_id }
        })
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_strings_and_grpc() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let e = Error::new(code, "boom");
            let back = Error::from_status(&e.to_status());
            assert_eq!(back, e, "{code} must survive a gRPC hop");
            assert!((400..600).contains(&code.http_status()));
        }
    }

    #[test]
    fn client_errors_are_4xx_and_server_errors_are_5xx() {
        assert_eq!(ErrorCode::UnsafeArchive.http_status(), 400);
        assert_eq!(ErrorCode::FunctionNotFound.http_status(), 404);
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
        assert_eq!(ErrorCode::NoCapacity.http_status(), 503);
    }
}
