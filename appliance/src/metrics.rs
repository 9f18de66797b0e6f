//! `GET /metrics`: Prometheus text exposition format 0.0.4.
//!
//! What it counts and where the numbers come from:
//! - `appliance_http_requests_total{method,route,class}`: every request a
//!   declared route answered (guard refusals included), by the route's
//!   path template and status class (`2xx`…); the counting is one atomic
//!   add in a layer [`crate::http::build`] puts on every route
//!   ([`http_counter`]), unmatched paths count under `route="unmatched"`.
//! - `appliance_events_total{kind}`: events published on the event bus
//!   (`dhcp.*`, `tftp.*`, `http.*`, `agent.*`, `install.*`, …), by kind.
//! - `appliance_served_bytes_total{kind}`: the `bytes` of those events
//!   (TFTP transfers, HTTP boot files and scripts).
//! - `appliance_installs{state,phase}` and `appliance_clone_jobs{action,state}`:
//!   gauges of the install attempts and clone jobs this node holds.
//! - `appliance_degraded{reason}`: 1 per degraded reason (as in
//!   `/api/v1/version`); `appliance_degraded_reasons`: how many.
//! - `appliance_build_info{version,release}` 1, `appliance_uptime_seconds`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::api::AppState;
use crate::http::{Guard, Route};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Requests of one route (method and path template), by status class.
#[derive(Debug, Default)]
pub struct RouteCounter {
    classes: [AtomicU64; 5],
}

impl RouteCounter {
    /// Count one answer with `status`.
    pub fn count(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.classes[i].fetch_add(1, Ordering::Relaxed);
    }
}

type Registry = Mutex<BTreeMap<(String, String), Arc<RouteCounter>>>;

/// Process-wide, like any Prometheus default registry: one counter per
/// (method, route), shared by every router built for it.
fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The counter of `method` on `route` (made at router build time; the
/// request path only does an atomic add).
pub fn http_counter(method: &str, route: &str) -> Arc<RouteCounter> {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((method.to_owned(), route.to_owned()))
        .or_default()
        .clone()
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct MetricsState {
    pub app: Arc<AppState>,
    pub events: crate::events::Events,
    pub installs: Option<crate::replicate::Replication>,
    pub clones: Option<crate::clone::server::CloneJobs>,
}

/// `GET /metrics` (a read: public unless the server runs with private reads).
pub fn routes(state: MetricsState) -> Vec<Route> {
    vec![Route::get(
        "/metrics",
        Guard::Read,
        "Prometheus metrics (text format 0.0.4): requests, events, installs, clone jobs, degraded reasons",
    )
    .response("text")
    .to(metrics, state)]
}

async fn metrics(State(st): State<MetricsState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&st))
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition.
pub fn render(st: &MetricsState) -> String {
    let mut out = String::new();
    head(
        &mut out,
        "appliance_build_info",
        "gauge",
        "Version and running release digest of this appliance (always 1).",
    );
    let _ = writeln!(
        out,
        "appliance_build_info{{version=\"{}\",release=\"{}\"}} 1",
        escape(st.app.version),
        escape(st.app.release.as_deref().unwrap_or(""))
    );
    head(
        &mut out,
        "appliance_uptime_seconds",
        "gauge",
        "Seconds since this server started.",
    );
    let _ = writeln!(
        out,
        "appliance_uptime_seconds {}",
        st.app.started.elapsed().as_secs_f64()
    );

    let reasons = crate::api::degraded_reasons(&st.app);
    head(
        &mut out,
        "appliance_degraded_reasons",
        "gauge",
        "How many degraded reasons this appliance reports.",
    );
    let _ = writeln!(out, "appliance_degraded_reasons {}", reasons.len());
    head(
        &mut out,
        "appliance_degraded",
        "gauge",
        "1 for each reason the appliance runs degraded.",
    );
    let unique: std::collections::BTreeSet<&String> = reasons.iter().collect();
    for r in unique {
        let _ = writeln!(out, "appliance_degraded{{reason=\"{}\"}} 1", escape(r));
    }

    head(
        &mut out,
        "appliance_http_requests_total",
        "counter",
        "HTTP requests answered, by method, route template and status class.",
    );
    let counters: Vec<_> = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for ((method, route), c) in counters {
        for (i, n) in c.classes.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "appliance_http_requests_total{{method=\"{}\",route=\"{}\",class=\"{}xx\"}} {n}",
                    escape(&method),
                    escape(&route),
                    i + 1
                );
            }
        }
    }

    let kinds = st.events.kind_counts();
    head(
        &mut out,
        "appliance_events_total",
        "counter",
        "Events published (dhcp.*, tftp.*, http.*, agent.*, install.*, clone.*, ...), by kind.",
    );
    for (kind, n, _) in &kinds {
        let _ = writeln!(
            out,
            "appliance_events_total{{kind=\"{}\"}} {n}",
            escape(kind)
        );
    }
    head(
        &mut out,
        "appliance_served_bytes_total",
        "counter",
        "Bytes served as reported by events (TFTP transfers, HTTP boot files), by event kind.",
    );
    for (kind, _, bytes) in kinds.iter().filter(|k| k.2 > 0) {
        let _ = writeln!(
            out,
            "appliance_served_bytes_total{{kind=\"{}\"}} {bytes}",
            escape(kind)
        );
    }

    head(
        &mut out,
        "appliance_installs",
        "gauge",
        "Install attempts of this appliance onto other machines, by state and phase.",
    );
    if let Some(r) = &st.installs {
        let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut sent = 0u64;
        for i in r.list() {
            *by.entry((i.state, i.phase)).or_default() += 1;
            sent += i.bytes_sent;
        }
        for ((state, phase), n) in by {
            let _ = writeln!(
                out,
                "appliance_installs{{state=\"{}\",phase=\"{}\"}} {n}",
                escape(&state),
                escape(&phase)
            );
        }
        head(
            &mut out,
            "appliance_install_image_bytes_sent",
            "gauge",
            "Image bytes sent to the install attempts this node holds.",
        );
        let _ = writeln!(out, "appliance_install_image_bytes_sent {sent}");
    }
    head(
        &mut out,
        "appliance_clone_jobs",
        "gauge",
        "Clone jobs (capture, deploy, restore), by action and state.",
    );
    if let Some(c) = &st.clones {
        let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
        for j in c.list() {
            let action = serde_json::to_value(j.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *by.entry((action, j.state)).or_default() += 1;
        }
        for ((action, state), n) in by {
            let _ = writeln!(
                out,
                "appliance_clone_jobs{{action=\"{}\",state=\"{}\"}} {n}",
                escape(&action),
                escape(&state)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn exposition_has_build_info_degraded_and_event_counts() {
        let mut app = crate::api::tests_state();
        app.degraded = vec!["quote \" and\nnewline".into()];
        let events = crate::events::Events::new();
        events.publish("dhcp.offer", None, serde_json::json!({}));
        events.publish("tftp.transfer", None, serde_json::json!({"bytes": 100}));
        events.publish("tftp.transfer", None, serde_json::json!({"bytes": 23}));
        http_counter("GET", "/x/{name}").count(404);
        let text = render(&MetricsState {
            app: Arc::new(app),
            events,
            installs: None,
            clones: None,
        });
        assert!(text.contains("appliance_build_info{version=\""), "{text}");
        assert!(
            text.contains("appliance_degraded{reason=\"quote \\\" and\\nnewline\"} 1"),
            "{text}"
        );
        assert!(text.contains("appliance_events_total{kind=\"tftp.transfer\"} 2"));
        assert!(text.contains("appliance_served_bytes_total{kind=\"tftp.transfer\"} 123"));
        assert!(text.contains(
            "appliance_http_requests_total{method=\"GET\",route=\"/x/{name}\",class=\"4xx\"}"
        ));
    }
}
