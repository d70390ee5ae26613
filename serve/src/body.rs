//! Reading a request body within the size and time limits (413 and 408 as OpenAI's
//! error object).
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, StatusCode};

use crate::error::ApiError;

/// The largest request body read (413 beyond).
pub const BODY_LIMIT: usize = 4 << 20;
/// How long a client may take to send its body (408 beyond).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The body, at most `BODY_LIMIT` bytes (413) read within `BODY_TIMEOUT` (408).
pub async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the limit of {BODY_LIMIT} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    let read = axum::body::to_bytes(req.into_body(), BODY_LIMIT);
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body took longer than {BODY_TIMEOUT:?} to arrive"),
        )),
        Ok(Err(e)) if format!("{e:?}").contains("LengthLimit") => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {e}"),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}
