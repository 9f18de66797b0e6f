//! The event log: every DHCP, TFTP and HTTP step per client and every agent
//! check-in, as structured events. Kept in a bounded in-memory ring (paged
//! JSON at `GET /api/v1/events?after=ID&limit=N`) and broadcast live
//! (server-sent events at the same URL with `Accept: text/event-stream`).
//! `?order=newest[&before=ID]` pages backwards from the newest event
//! instead (newest first; `older` is the next cursor), which is where the
//! web console starts before it follows live from `next`.
//! Every event is also a `tracing` event, so it lands in the logs.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::Query;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
#[cfg(test)]
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events the ring keeps.
pub const RING: usize = 10_000;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1 for the life of the server.
    pub id: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// `dhcp.discover`, `dhcp.offer`, `tftp.transfer`, `http.get`,
    /// `agent.checkin`, …
    pub kind: String,
    /// The client's MAC address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Kind-specific detail.
    pub detail: serde_json::Value,
}

/// The event bus shared by every service of one server.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
    /// Client address → MAC, learnt from DHCP, so TFTP and HTTP events
    /// (which only see an address) can name the machine.
    neighbours: Mutex<std::collections::HashMap<std::net::IpAddr, String>>,
    /// Events published and their `bytes`, by kind (for `/metrics`).
    kinds: Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let (tx, _) = broadcast::channel(1024);
        Events {
            inner: Arc::new(Inner {
                ring: Mutex::new((0, VecDeque::new())),
                tx,
                neighbours: Default::default(),
                kinds: Default::default(),
            }),
        }
    }

    /// Remember that `ip` belongs to `mac` (from a DHCP ack).
    pub fn learn(&self, ip: std::net::IpAddr, mac: &str) {
        self.inner
            .neighbours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, mac.to_string());
    }

    /// The MAC last seen with `ip`.
    pub fn mac_of(&self, ip: std::net::IpAddr) -> Option<String> {
        self.inner
            .neighbours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Record an event.
    pub fn publish(&self, kind: &str, mac: Option<&str>, detail: serde_json::Value) -> u64 {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let ev = {
            let mut g = self.inner.ring.lock().unwrap_or_else(|p| p.into_inner());
            g.0 += 1;
            let ev = Event {
                id: g.0,
                time,
                kind: kind.to_string(),
                mac: mac.map(str::to_string),
                detail,
            };
            if g.1.len() == RING {
                g.1.pop_front();
            }
            g.1.push_back(ev.clone());
            ev
        };
        {
            let bytes = ev.detail.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0);
            let mut k = self.inner.kinds.lock().unwrap_or_else(|p| p.into_inner());
            match k.get_mut(kind) {
                Some(c) => {
                    c.0 += 1;
                    c.1 += bytes;
                }
                None => {
                    k.insert(kind.to_owned(), (1, bytes));
                }
            }
        }
        tracing::info!(target: "appliance::events", id = ev.id, kind = %ev.kind, mac = ?ev.mac, detail = %ev.detail, "event");
        let _ = self.inner.tx.send(ev.clone());
        ev.id
    }

    /// Events with id greater than `after`, oldest first, at most `limit`.
    pub fn page(&self, after: u64, limit: usize) -> Vec<Event> {
        let g = self.inner.ring.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter()
            .filter(|e| e.id > after)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The newest `limit` events below id `before` that `keep` admits,
    /// newest first; the newest id in the ring; and the cursor for older
    /// matching events, if any remain.
    pub fn newest(
        &self,
        before: u64,
        limit: usize,
        keep: impl Fn(&Event) -> bool,
    ) -> (Vec<Event>, u64, Option<u64>) {
        let g = self.inner.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut it =
            g.1.iter()
                .rev()
                .filter(|e| e.id < before)
                .filter(|e| keep(e));
        let out: Vec<Event> = it.by_ref().take(limit).cloned().collect();
        let older = match (it.next(), out.last()) {
            (Some(_), Some(last)) => Some(last.id),
            _ => None,
        };
        (out, g.0, older)
    }

    /// (kind, events published, sum of their `bytes`) for every kind seen.
    pub fn kind_counts(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (n, b))| (k.clone(), *n, *b))
            .collect()
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.tx.subscribe()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    after: u64,
    limit: Option<String>,
    kind: Option<String>,
    mac: Option<String>,
    /// `newest`: the page ends at the newest event (or just before
    /// `before`) and lists newest first.
    order: Option<String>,
    before: Option<u64>,
}

/// The body of the paged list: the one list shape (`items`, `next`) of
/// [`crate::http::page`], except that `next` is never null, because the
/// log only grows: it is where the next poll or live follow starts.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventPage {
    pub items: Vec<Event>,
    /// Pass as `after` to get the next page (with `order=newest`: the
    /// newest id in the log, where following live should start).
    pub next: u64,
    /// With `order=newest`, when older events match: pass as `before`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older: Option<u64>,
}

/// `GET /api/v1/events`.
pub fn routes(events: Events) -> Vec<crate::http::Route> {
    use crate::http::{Guard, Route};
    vec![Route::get(
        "/api/v1/events",
        Guard::Read,
        "The event log (paged JSON, or live with Accept: text/event-stream)",
    )
    .response("Object")
    .to(list, events)]
}

#[cfg(test)]
fn router(events: Events) -> Router {
    crate::http::routes::unguarded(routes(events))
}

fn matches(q: &PageQuery, e: &Event) -> bool {
    q.kind
        .as_ref()
        .is_none_or(|k| e.kind == *k || e.kind.starts_with(&format!("{k}.")))
        && q.mac
            .as_ref()
            .is_none_or(|m| e.mac.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(m)))
}

async fn list(
    State(events): State<Events>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let limit = match q.limit.as_deref().map(crate::http::page::parse_limit) {
        None => 100,
        Some(Ok(n)) => n.min(1000),
        Some(Err(e)) => return e.into_response(),
    };
    if let Some(o) = q.order.as_deref().filter(|o| *o != "newest") {
        return crate::http::page::invalid_query(format!(
            "order={o}: the only order is newest (default: oldest first)"
        ))
        .into_response();
    }
    let wants_sse = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        let backlog: Vec<Event> = events
            .page(q.after, RING)
            .into_iter()
            .filter(|e| matches(&q, e))
            .collect();
        let last = backlog.last().map(|e| e.id).unwrap_or(q.after);
        let rx = events.subscribe();
        let stream = futures_util::stream::unfold(
            (backlog.into_iter(), rx, last, q),
            |(mut backlog, mut rx, last, q)| async move {
                if let Some(e) = backlog.next() {
                    return Some((Ok::<_, Infallible>(sse(&e)), (backlog, rx, last, q)));
                }
                loop {
                    match rx.recv().await {
                        Ok(e) if e.id > last && matches(&q, &e) => {
                            let id = e.id;
                            return Some((Ok(sse(&e)), (backlog, rx, id, q)));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        return Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    if q.order.as_deref() == Some("newest") {
        let (out, next, older) =
            events.newest(q.before.unwrap_or(u64::MAX), limit, |e| matches(&q, e));
        return Json(EventPage {
            items: out,
            next,
            older,
        })
        .into_response();
    }
    let mut out = Vec::new();
    let mut cursor = q.after;
    // Filtered pages scan forward until they fill or the ring ends.
    loop {
        let chunk = events.page(cursor, 1000);
        let Some(last) = chunk.last().map(|e| e.id) else {
            break;
        };
        for e in chunk {
            cursor = e.id;
            if matches(&q, &e) {
                out.push(e);
                if out.len() == limit {
                    break;
                }
            }
        }
        if out.len() == limit || cursor >= last && events.page(cursor, 1).is_empty() {
            break;
        }
    }
    Json(EventPage {
        items: out,
        next: cursor,
        older: None,
    })
    .into_response()
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .data(serde_json::to_string(e).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[test]
    fn ring_is_bounded_and_paged() {
        let ev = Events::new();
        for i in 0..(RING + 5) {
            ev.publish(
                "dhcp.offer",
                Some("52:54:00:00:00:01"),
                serde_json::json!({ "n": i }),
            );
        }
        let first = ev.page(0, 3);
        assert_eq!(first.iter().map(|e| e.id).collect::<Vec<_>>(), [6, 7, 8]);
        assert_eq!(ev.page(RING as u64 + 4, 10).len(), 1);
    }

    #[tokio::test]
    async fn paged_json_filters_by_kind_and_mac() {
        let ev = Events::new();
        ev.publish(
            "dhcp.discover",
            Some("52:54:00:00:00:01"),
            serde_json::json!({}),
        );
        ev.publish(
            "tftp.transfer",
            Some("52:54:00:00:00:01"),
            serde_json::json!({"file": "ipxe.efi"}),
        );
        ev.publish(
            "dhcp.offer",
            Some("52:54:00:00:00:02"),
            serde_json::json!({}),
        );
        let app = router(ev);
        let resp = app
            .oneshot(
                Request::get("/api/v1/events?kind=dhcp&mac=52:54:00:00:00:02")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let page: EventPage = serde_json::from_slice(&body).unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].kind, "dhcp.offer");
        assert_eq!(page.next, 3);
    }

    #[tokio::test]
    async fn newest_first_pages_walk_back_with_filters_and_name_the_live_cursor() {
        let ev = Events::new();
        for i in 0..10u64 {
            let kind = if i % 2 == 0 {
                "dhcp.offer"
            } else {
                "tftp.transfer"
            };
            ev.publish(kind, Some("aa:bb:cc:dd:ee:ff"), serde_json::json!({"i": i}));
        }
        let app = router(ev.clone());
        let get = |uri: &'static str| {
            let app = app.clone();
            async move {
                let r = app
                    .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let b = r.into_body().collect().await.unwrap().to_bytes();
                serde_json::from_slice::<EventPage>(&b).unwrap()
            }
        };
        let p = get("/api/v1/events?order=newest&limit=3&kind=dhcp").await;
        let ids: Vec<u64> = p.items.iter().map(|e| e.id).collect();
        assert_eq!(ids, [9, 7, 5]);
        assert_eq!((p.next, p.older), (10, Some(5)));
        let p = get("/api/v1/events?order=newest&limit=3&kind=dhcp&before=5").await;
        let ids: Vec<u64> = p.items.iter().map(|e| e.id).collect();
        assert_eq!(ids, [3, 1]);
        assert_eq!(p.older, None);
    }

    #[tokio::test]
    async fn sse_replays_the_backlog_then_streams() {
        let ev = Events::new();
        ev.publish(
            "agent.checkin",
            Some("aa:bb:cc:dd:ee:ff"),
            serde_json::json!({}),
        );
        let app = router(ev.clone());
        let resp = app
            .oneshot(
                Request::get("/api/v1/events")
                    .header("accept", "text/event-stream")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = resp.into_body();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let text = String::from_utf8_lossy(&frame);
        assert!(
            text.contains("event: agent.checkin") && text.contains("id: 1"),
            "{text}"
        );
        ev.publish("http.get", None, serde_json::json!({"path": "/boot/x"}));
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&frame).contains("http.get"));
    }
}
