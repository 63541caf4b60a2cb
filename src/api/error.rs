//! Every error the API answers: one status and one stable code per case, always as JSON
//! `{"error": code, "message": text}`.

use hyper::StatusCode;

use crate::metrics::Outcome;
use crate::model::RuleError;
use crate::node::NodeError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body larger than {limit} bytes"),
        )
    }

    /// The data-plane outcome label this error counts as.
    pub fn outcome(&self) -> Outcome {
        match self.status {
            StatusCode::NOT_FOUND => Outcome::Unknown,
            StatusCode::TOO_MANY_REQUESTS => Outcome::Limited,
            StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
            StatusCode::PAYMENT_REQUIRED => Outcome::Insufficient,
            _ => Outcome::Invalid,
        }
    }

    /// `{"error": code, "message": text}`, keys in that (alphabetical) order.
    pub fn body(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let body = Body {
            error: self.code,
            message: &self.message,
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec())
    }
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            RuleError::UnknownWorkspace(_) => (StatusCode::NOT_FOUND, "unknown_workspace"),
            RuleError::WorkspaceExists(_) => (StatusCode::CONFLICT, "workspace_exists"),
            RuleError::PrimaryWorkspace(_) => (StatusCode::CONFLICT, "primary_workspace"),
            RuleError::WrongMode(_) => (StatusCode::CONFLICT, "wrong_mode"),
            RuleError::SameWorkspace => (StatusCode::BAD_REQUEST, "invalid_request"),
            RuleError::InsufficientCredits { .. } => (StatusCode::CONFLICT, "insufficient_credits"),
            // Leases that a bounded number of recalls could not bring back: try again later.
            RuleError::LeasesOutstanding { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            RuleError::Overflow => (StatusCode::CONFLICT, "limit_exceeded"),
            RuleError::BatchRefused(_) | RuleError::StaleEpoch { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::Rule(r) => r.into(),
            NodeError::UnknownOrg(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_org", message)
            }
            NodeError::UnknownWorkspace(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_workspace", message)
            }
            NodeError::UnknownReservation(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_reservation", message)
            }
            NodeError::ExceedsReservation { .. } => {
                ApiError::new(StatusCode::CONFLICT, "exceeds_reservation", message)
            }
            NodeError::OrgExists(_) => ApiError::new(StatusCode::CONFLICT, "org_exists", message),
            NodeError::IdempotencyMismatch(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_mismatch", message)
            }
            NodeError::LimitExceeded { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_exceeded", message)
            }
            NodeError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
        }
    }
}
