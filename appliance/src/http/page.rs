//! The one list shape: every list route answers
//! `{"items":[…],"next":<cursor>|null}` and takes `?limit=N&after=CURSOR`.
//!
//! Items come in the order of their key (a name, a MAC, an id); `next` is
//! the key of the page's last item while more remain, `null` at the end,
//! and is passed back as `after` for the next page. [`PageParams`] is the
//! extractor: a bad `limit` (not a number, 0, above [`MAX_LIMIT`]) or an
//! unknown parameter answers 400 `invalid_query` naming the parameter, in
//! the project's error shape, never axum's plain-text rejection.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::api::ApiError;

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` taken.
pub const MAX_LIMIT: usize = 10_000;

/// `?limit=&after=` of a list route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageParams {
    pub limit: usize,
    pub after: Option<String>,
}

impl Default for PageParams {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next: Option<String>,
}

/// 400 `invalid_query` with `message`.
pub fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

/// Checks a `limit` value: a whole number from 1 to [`MAX_LIMIT`].
pub fn parse_limit(v: &str) -> Result<usize, ApiError> {
    let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ if digits => Err(invalid_query(format!(
            "limit={v}: must be from 1 to {MAX_LIMIT}"
        ))),
        _ => Err(invalid_query(format!(
            "limit={v}: not a number (a whole number from 1 to {MAX_LIMIT})"
        ))),
    }
}

/// The `(name, value)` pairs of a request's query string; a string that
/// does not decode is a 400 `invalid_query`.
pub fn query_pairs(parts: &Parts) -> Result<Vec<(String, String)>, ApiError> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .map_err(|e| invalid_query(format!("query string: {}", e.body_text())))
}

impl PageParams {
    /// Parses `limit` and `after`; any other parameter, or one given
    /// twice, is refused.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut p = PageParams::default();
        for (i, (k, v)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(seen, _)| seen == k) {
                return Err(invalid_query(format!("{k} is given twice")));
            }
            match k.as_str() {
                "limit" => p.limit = parse_limit(v)?,
                "after" => p.after = Some(v.clone()),
                other => {
                    return Err(invalid_query(format!(
                        "unknown parameter {other:?} (this list takes limit and after)"
                    )))
                }
            }
        }
        Ok(p)
    }

    /// The page of `items` after `self.after`, in the order of `key`.
    pub fn page<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> String,
    ) -> Paged<T> {
        let mut keyed: Vec<(String, T)> = items
            .into_iter()
            .map(|t| (key(&t), t))
            .filter(|(k, _)| self.after.as_ref().is_none_or(|a| k > a))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let more = keyed.len() > self.limit;
        keyed.truncate(self.limit);
        let next = if more {
            keyed.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Paged {
            items: keyed.into_iter().map(|(_, t)| t).collect(),
            next,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PageParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        PageParams::from_pairs(&query_pairs(parts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Result<PageParams, ApiError> {
        let (mut parts, _) = axum::http::Request::get(format!("/x?{q}"))
            .body(())
            .unwrap()
            .into_parts();
        futures_util::FutureExt::now_or_never(PageParams::from_request_parts(&mut parts, &()))
            .unwrap()
    }

    #[test]
    fn pages_follow_next_until_null_and_see_every_item_once() {
        let names: Vec<String> = ["c", "a", "e", "b", "d"].map(String::from).to_vec();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let p = PageParams {
                limit: 2,
                after: after.clone(),
            }
            .page(names.clone(), |s| s.clone());
            pages += 1;
            seen.extend(p.items);
            match p.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        assert_eq!(pages, 3);
        let all = PageParams::default().page(names, |s| s.clone());
        assert_eq!(all.items.len(), 5);
        assert_eq!(all.next, None);
    }

    #[test]
    fn bad_limits_and_unknown_parameters_name_the_parameter() {
        assert_eq!(params("limit=5&after=x").unwrap().limit, 5);
        assert_eq!(params("").unwrap(), PageParams::default());
        for (q, needle) in [
            ("limit=abc", "limit=abc: not a number"),
            ("limit=0", "limit=0: must be from 1"),
            ("limit=10001", "limit=10001: must be from 1"),
            ("limit=99999999999999999999999", "must be from 1"),
            ("limit=-1", "limit=-1: not a number"),
            ("lmit=5", "unknown parameter \"lmit\""),
            ("limit=5&limit=6", "limit is given twice"),
        ] {
            let e = params(q).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{q}");
            assert_eq!(e.code, "invalid_query", "{q}");
            assert!(e.message.contains(needle), "{q}: {}", e.message);
        }
    }
}
