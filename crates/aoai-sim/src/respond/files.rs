//! The Files API, the state a backend keeps that a gateway must not balance: upload
//! (`POST /openai/files`, multipart `purpose` and `file`), list, retrieve, content and delete,
//! on the deployment-less surface (with `api-version`) and on `/openai/v1/files`. Files live in
//! this simulator's memory only, so a file uploaded to one instance is unknown to another, as
//! with two AOAI resources. Object shapes follow the OpenAI/AOAI file object (`object`, `id`,
//! `bytes`, `created_at`, `filename`, `purpose`, `status`).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::routing;
use crate::error::AoaiError;

/// Files one simulator keeps; an upload past it is refused, as a resource's file quota is.
const MAX_FILES: usize = 1000;

/// The files uploaded to this simulator, by id.
#[derive(Default)]
pub(crate) struct Files {
    files: Mutex<BTreeMap<String, (Value, Bytes)>>,
}

impl Files {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Value, Bytes)>> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// When `path` is the Files API: whether on v1, and the segments after `files`; `None`
/// leaves the request to the model routes.
pub(crate) fn is_files_path(path: &str) -> Option<(bool, Vec<&str>)> {
    let (v1, rest) = match path.strip_prefix("/openai/v1/files") {
        Some(rest) => (true, rest),
        None => (false, path.strip_prefix("/openai/files")?),
    };
    let tail: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    (rest.is_empty() || rest.starts_with('/')).then_some((v1, tail))
}

fn not_found(id: &str) -> AoaiError {
    AoaiError::status_body(
        StatusCode::NOT_FOUND,
        json!({"error": {"code": "NotFound", "message": format!("File with id '{id}' was not found.")}}),
    )
}

pub(crate) async fn handle(
    files: &Files,
    max_body_bytes: usize,
    v1: bool,
    tail: &[&str],
    request: Request<Body>,
) -> Result<Response, AoaiError> {
    routing::api_version(request.uri().query(), v1)?;
    let method = request.method().clone();
    match (method, tail) {
        (Method::POST, []) => upload(files, max_body_bytes, request).await,
        (Method::GET, []) => Ok(axum::Json(list(files, request.uri().query())).into_response()),
        (Method::GET, [id]) => files
            .lock()
            .get(*id)
            .map(|(meta, _)| axum::Json(meta.clone()).into_response())
            .ok_or_else(|| not_found(id)),
        (Method::GET, [id, "content"]) => files
            .lock()
            .get(*id)
            .map(|(_, bytes)| {
                (
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    bytes.clone(),
                )
                    .into_response()
            })
            .ok_or_else(|| not_found(id)),
        (Method::DELETE, [id]) => match files.lock().remove(*id) {
            Some(_) => Ok(
                axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response(),
            ),
            None => Err(not_found(id)),
        },
        _ => Err(AoaiError::resource_not_found()),
    }
}

/// A cursor page, as the v1 surface lists: newest first unless `order=asc` (ids are
/// time-ordered, so id order is upload order), only `purpose` when given, from after `after`,
/// at most `limit`, `has_more` when more follow. The SDK pages on `has_more` and `after`; a
/// list without them would be fetched again for ever.
fn list(files: &Files, query: Option<&str>) -> Value {
    let param = |name: &str| routing::query_param(query, name);
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(MAX_FILES)
        .clamp(1, MAX_FILES);
    let after = param("after");
    let ascending = param("order") == Some("asc");
    let purpose = param("purpose");
    let all = files.lock();
    let ordered: Box<dyn Iterator<Item = (&String, &(Value, Bytes))>> = if ascending {
        Box::new(all.iter())
    } else {
        Box::new(all.iter().rev())
    };
    let mut page: Vec<Value> = ordered
        .filter(|(id, _)| match after {
            Some(a) if ascending => id.as_str() > a,
            Some(a) => id.as_str() < a,
            None => true,
        })
        .filter(|(_, (meta, _))| purpose.is_none_or(|p| meta["purpose"] == p))
        .map(|(_, (meta, _))| meta.clone())
        .take(limit + 1)
        .collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    let first = page.first().and_then(|m| m.get("id")).cloned();
    let last = page.last().and_then(|m| m.get("id")).cloned();
    json!({"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": has_more})
}

async fn upload(
    files: &Files,
    max_body_bytes: usize,
    request: Request<Body>,
) -> Result<Response, AoaiError> {
    let bad = |m: &str| AoaiError::invalid_request(m.to_owned(), None);
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|_| bad("The request must be multipart/form-data with `purpose` and `file`."))?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|_| bad("The multipart body could not be read."))?
    {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or("file").to_owned();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|_| bad("The file could not be read."))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let (Some(purpose), Some((filename, bytes))) = (purpose, file) else {
        return Err(bad("Both `purpose` and `file` are required."));
    };
    if bytes.len() > max_body_bytes {
        return Err(AoaiError::payload_too_large(max_body_bytes));
    }
    let id = format!("file-{}", uuid::Uuid::now_v7().simple());
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let meta = json!({
        "object": "file",
        "id": id,
        "purpose": purpose,
        "filename": filename,
        "bytes": bytes.len(),
        "created_at": created_at,
        "status": "processed",
        "status_details": null,
    });
    let mut all = files.lock();
    if all.len() >= MAX_FILES {
        return Err(bad("The file quota of this resource is reached."));
    }
    all.insert(id, (meta.clone(), bytes));
    Ok(axum::Json(meta).into_response())
}
