//! The engine's error type; the API maps each kind to an HTTP status.

use sea_orm::DbErr;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for does not exist (or is not visible to the caller).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (e.g. a contact claimed by someone else).
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The request is well-formed but its content is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The content is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The thing existed but was deleted on purpose (e.g. raw mail dropped by the retention job).
    #[error("{0}")]
    Gone(String),
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }
    pub fn conflict(what: impl Into<String>) -> Self {
        Self::Conflict(what.into())
    }
}
