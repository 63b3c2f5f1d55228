//! Errors of the simulator, each mapping to one OpenAI-shaped HTTP error.

use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("injected fault")]
    InjectedFault,
    #[error("not found")]
    NotFound,
}

impl SimError {
    pub fn status(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SimError::ModelNotFound(_) | SimError::NotFound => StatusCode::NOT_FOUND,
            SimError::InjectedFault => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            SimError::BadRequest(_) => "invalid_request_error",
            SimError::ModelNotFound(_) | SimError::NotFound => "NotFoundError",
            SimError::InjectedFault => "InternalServerError",
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let status = self.status();
        serde_json::to_vec(&serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": status.as_u16(),
            }
        }))
        .unwrap_or_default()
    }
}
