//! The one HTTP surface: every route is declared once in a [`Route`] with
//! its [`Guard`], summary, body limit and handler; [`build`] turns the
//! table into the router (guard, body limit and tracing on every route) and
//! the OpenAPI document served at `/api/v1/openapi.json`.
//!
//! Authentication lives only in [`guard`]: the guard runs before a handler
//! extracts anything, so a body is read only after its caller is
//! authorised, and a handler learns who called through the [`Caller`]
//! extractor, which refuses when no guard ran (a route cannot be added
//! without one, and cannot fail open).

pub mod guard;
pub mod openapi;
pub mod page;
pub mod query;
pub mod routes;
pub mod server;

pub use guard::{Auth, Caller, Guard, JobRef, JobTokens, Role};
pub use page::{PageParams, Paged};
pub use query::Query;
pub use routes::{build, Route};
