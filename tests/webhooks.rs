//! Webhook delivery against a real HTTP receiver on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use rusqlite::Connection;
use sha2::Sha256;
use stonelion::alarms::event::{AlarmEvent, EventKind};
use stonelion::clock::{Clock, SharedClock, SystemClock};
use stonelion::metrics::SharedRegistry;
use stonelion::notify::{self, DispatcherHandle, QueueState, Webhook, WebhookConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret-0123456789";
const DEADLINE: Duration = Duration::from_secs(15);

/// One request as the receiver saw it, with the status it returned.
#[derive(Clone, Debug)]
struct Received {
    event: String,
    delivery_id: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    status: u16,
}

impl Received {
    fn accepted(&self) -> bool {
        self.status == 200
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Received>>,
    /// Number of next requests that get a 500 response.
    fail_next: AtomicUsize,
    /// Respond 503 to every request while set.
    down: AtomicBool,
    /// Respond 400 to bodies that contain this text.
    reject_containing: Mutex<Option<String>>,
}

impl ReceiverState {
    fn requests(&self) -> Vec<Received> {
        self.requests.lock().expect("receiver lock").clone()
    }

    fn accepted(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(Received::accepted)
            .collect()
    }
}

struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let rejected = state
        .reject_containing
        .lock()
        .expect("receiver lock")
        .as_ref()
        .is_some_and(|text| String::from_utf8_lossy(&body).contains(text.as_str()));
    let status = if state.down.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if rejected {
        StatusCode::BAD_REQUEST
    } else if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };

    state
        .requests
        .lock()
        .expect("receiver lock")
        .push(Received {
            event: header("x-stonelion-event"),
            delivery_id: header("x-stonelion-delivery"),
            signature: header("x-stonelion-signature"),
            content_type: header("content-type"),
            body: body.to_vec(),
            status: status.as_u16(),
        });
    status
}

async fn start_receiver(listener: TcpListener) -> Receiver {
    let addr = listener.local_addr().expect("listener address");
    let state = Arc::new(ReceiverState::default());
    let app = Router::new()
        .route("/hook", post(record))
        .with_state(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("receiver serves");
    });
    Receiver { addr, state, task }
}

async fn receiver() -> Receiver {
    start_receiver(
        TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver"),
    )
    .await
}

/// Returns a loopback port that nothing listens on, so connections to it are refused.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    listener.local_addr().expect("probe address").port()
}

fn webhook(name: &str, url: &str, events: Option<Vec<EventKind>>) -> Webhook {
    let config = WebhookConfig {
        name: name.into(),
        url: url.into(),
        secret: Some(SECRET.into()),
        secret_env: None,
        timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        events,
    };
    config.to_webhook().expect("test webhook config is valid")
}

fn hook_url(addr: SocketAddr) -> String {
    format!("http://{addr}/hook")
}

fn open_db(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open state database");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("enable WAL");
    notify::init_schema(&conn).expect("create outbox");
    conn
}

fn event(kind: EventKind, alarm: &str, n: u32) -> AlarmEvent {
    let body = format!(r#"{{"id":"{alarm}","event":"{}","n":{n}}}"#, kind.as_str());
    AlarmEvent {
        kind,
        alarm_id: alarm.into(),
        body: body.into_bytes(),
    }
}

fn enqueue_all(conn: &mut Connection, webhooks: &[Webhook], events: &[AlarmEvent]) {
    let tx = conn.transaction().expect("begin");
    for event in events {
        notify::enqueue(&tx, webhooks, event, SystemClock.now()).expect("enqueue");
    }
    tx.commit().expect("commit");
}

struct Running {
    handle: DispatcherHandle,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    registry: SharedRegistry,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("dispatcher stops before the deadline")
            .expect("dispatcher task ends cleanly");
    }
}

fn start(db_path: &Path, webhooks: Vec<Webhook>) -> Running {
    let registry = SharedRegistry::new();
    let shutdown = CancellationToken::new();
    let clock: SharedClock = Arc::new(SystemClock);
    let (handle, task) = notify::spawn_dispatcher(db_path, webhooks, &clock, &registry, &shutdown)
        .expect("dispatcher starts");
    Running {
        handle,
        task,
        shutdown,
        registry,
    }
}

/// Polls `condition` every 10 ms until it holds, failing the test after [`DEADLINE`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state_of(db_path: &Path, webhooks: &[Webhook], name: &str) -> QueueState {
    let conn = Connection::open(db_path).expect("open state database");
    notify::queue_state(&conn, webhooks, SystemClock.now())
        .expect("read queue state")
        .into_iter()
        .find(|s| s.webhook == name)
        .expect("webhook appears in queue state")
}

fn bodies(requests: &[Received]) -> Vec<String> {
    requests.iter().map(Received::body_text).collect()
}

fn bodies_of(events: &[AlarmEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect()
}

/// Asserts that each event was accepted once, that the events of each alarm were accepted
/// in queue order, and that every attempt of one event carried the same delivery id.
fn assert_delivered_once_in_order(requests: &[Received], events: &[AlarmEvent]) {
    let accepted: Vec<Received> = requests.iter().filter(|r| r.accepted()).cloned().collect();
    let mut expected = bodies_of(events);
    let mut got = bodies(&accepted);
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "each event accepted exactly once");

    for alarm in events.iter().map(|e| e.alarm_id.as_str()) {
        let marker = format!(r#""id":"{alarm}""#);
        let want: Vec<String> = bodies_of(events)
            .into_iter()
            .filter(|b| b.contains(&marker))
            .collect();
        let sent: Vec<String> = bodies(&accepted)
            .into_iter()
            .filter(|b| b.contains(&marker))
            .collect();
        assert_eq!(sent, want, "events of alarm {alarm} in order");
    }

    for body in bodies_of(events) {
        let ids: Vec<&str> = requests
            .iter()
            .filter(|r| r.body_text() == body)
            .map(|r| r.delivery_id.as_str())
            .collect();
        assert!(!ids[0].is_empty(), "delivery id present for {body}");
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "stable delivery id for {body}: {ids:?}"
        );
    }
    let mut ids: Vec<&str> = accepted.iter().map(|r| r.delivery_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "one delivery id per event");
}

fn metric(registry: &SharedRegistry, name: &str, webhook: &str) -> Option<f64> {
    let prefix = format!("stonelion_{name}{{webhook=\"{webhook}\"}} ");
    registry
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn signature_and_headers_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    let raised = event(EventKind::Raised, "alarm-1", 1);
    enqueue_all(&mut conn, &webhooks, std::slice::from_ref(&raised));

    let running = start(&db_path, webhooks.clone());
    wait_until("the event arrives", || receiver.state.accepted().len() == 1).await;
    running.stop().await;

    let got = &receiver.state.accepted()[0];
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("HMAC key");
    mac.update(&got.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(got.signature, expected);
    assert_eq!(got.body, raised.body, "body bytes as enqueued");
    assert_eq!(got.event, "alarm.raised");
    assert_eq!(got.content_type, "application/json");
    assert!(
        uuid::Uuid::parse_str(&got.delivery_id).is_ok(),
        "{}",
        got.delivery_id
    );
    assert_eq!(state_of(&db_path, &webhooks, "ops").pending, 0);
}

#[tokio::test]
async fn delivery_id_stable_across_retries() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    receiver.state.fail_next.store(3, Ordering::SeqCst);
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    enqueue_all(
        &mut conn,
        &webhooks,
        &[event(EventKind::Escalated, "alarm-1", 1)],
    );

    let running = start(&db_path, webhooks.clone());
    wait_until("the event is accepted", || {
        receiver.state.accepted().len() == 1
    })
    .await;
    wait_until("the outbox is empty", || {
        state_of(&db_path, &webhooks, "ops").pending == 0
    })
    .await;
    let registry = running.registry.clone();
    running.stop().await;

    let requests = receiver.state.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    assert!(
        requests
            .iter()
            .all(|r| r.delivery_id == requests[0].delivery_id)
    );
    assert!(requests.iter().all(|r| r.event == "alarm.escalated"));
    assert_eq!(
        metric(&registry, "webhook_deliveries_total", "ops"),
        Some(1.0)
    );
    assert_eq!(metric(&registry, "webhook_retries_total", "ops"), Some(3.0));
    assert_eq!(
        metric(&registry, "webhook_failed_attempts_total", "ops"),
        Some(3.0)
    );
    assert_eq!(metric(&registry, "webhook_queue_depth", "ops"), Some(0.0));
}

#[tokio::test]
async fn unavailable_receiver_gets_all_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    receiver.state.down.store(true, Ordering::SeqCst);
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    let events = [
        event(EventKind::Raised, "alarm-a", 1),
        event(EventKind::Raised, "alarm-b", 1),
        event(EventKind::Escalated, "alarm-a", 2),
        event(EventKind::Acknowledged, "alarm-b", 2),
        event(EventKind::Cleared, "alarm-a", 3),
        event(EventKind::Closed, "alarm-a", 4),
    ];
    enqueue_all(&mut conn, &webhooks, &events);

    let running = start(&db_path, webhooks.clone());
    wait_until("attempts fail while the receiver is down", || {
        receiver.state.requests().len() >= 4
    })
    .await;
    let queued = state_of(&db_path, &webhooks, "ops");
    receiver.state.down.store(false, Ordering::SeqCst);
    wait_until("every event is accepted", || {
        receiver.state.accepted().len() == events.len()
    })
    .await;
    wait_until("the outbox is empty", || {
        state_of(&db_path, &webhooks, "ops").pending == 0
    })
    .await;
    running.stop().await;

    assert_eq!(
        queued.pending, 6,
        "nothing left the outbox while the receiver was down"
    );
    assert!(queued.max_attempts >= 1);
    assert!(
        queued
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{queued:?}"
    );
    assert_delivered_once_in_order(&receiver.state.requests(), &events);
}

#[tokio::test]
async fn refused_connection_then_receiver_binds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let port = closed_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let webhooks = vec![webhook("ops", &hook_url(addr), None)];
    let mut conn = open_db(&db_path);
    let events = [
        event(EventKind::Raised, "alarm-a", 1),
        event(EventKind::Escalated, "alarm-a", 2),
        event(EventKind::DeviceOffline, "device-7", 1),
        event(EventKind::Cleared, "alarm-a", 3),
        event(EventKind::DeviceOnline, "device-7", 2),
    ];
    enqueue_all(&mut conn, &webhooks, &events);

    let running = start(&db_path, webhooks.clone());
    wait_until("two attempts were refused", || {
        state_of(&db_path, &webhooks, "ops").max_attempts >= 2
    })
    .await;
    let refused = state_of(&db_path, &webhooks, "ops");
    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the refused port");
    let receiver = start_receiver(listener).await;
    wait_until("every event is accepted", || {
        receiver.state.accepted().len() == events.len()
    })
    .await;
    wait_until("the outbox is empty", || {
        state_of(&db_path, &webhooks, "ops").pending == 0
    })
    .await;
    running.stop().await;

    assert_eq!(refused.pending, 5);
    let error = refused.last_error.unwrap_or_default();
    assert!(error.contains("connection failed"), "{error}");
    assert!(
        !error.contains("/hook"),
        "error text leaves out the URL: {error}"
    );
    assert_delivered_once_in_order(&receiver.state.requests(), &events);
}

#[tokio::test]
async fn restart_sends_pending_once_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    receiver.state.down.store(true, Ordering::SeqCst);
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    let mut events = vec![
        event(EventKind::Raised, "alarm-a", 1),
        event(EventKind::Raised, "alarm-b", 1),
        event(EventKind::Escalated, "alarm-a", 2),
        event(EventKind::Cleared, "alarm-b", 2),
        event(EventKind::Closed, "alarm-b", 3),
    ];
    enqueue_all(&mut conn, &webhooks, &events);

    let first = start(&db_path, webhooks.clone());
    wait_until("attempts fail before the restart", || {
        receiver.state.requests().len() >= 3
    })
    .await;
    first.stop().await;
    drop(conn);
    let ids_before: Vec<(String, String)> = receiver
        .state
        .requests()
        .iter()
        .map(|r| (r.body_text(), r.delivery_id.clone()))
        .collect();
    assert_eq!(
        state_of(&db_path, &webhooks, "ops").pending,
        5,
        "rows survive the stop"
    );

    let mut conn = open_db(&db_path);
    let late = event(EventKind::Cleared, "alarm-a", 3);
    enqueue_all(&mut conn, &webhooks, std::slice::from_ref(&late));
    events.push(late);
    receiver.state.down.store(false, Ordering::SeqCst);
    let second = start(&db_path, webhooks.clone());
    wait_until("every event is accepted", || {
        receiver.state.accepted().len() == events.len()
    })
    .await;
    wait_until("the outbox is empty", || {
        state_of(&db_path, &webhooks, "ops").pending == 0
    })
    .await;
    second.stop().await;

    let requests = receiver.state.requests();
    assert_delivered_once_in_order(&requests, &events);
    for (body, id) in ids_before {
        let after = requests
            .iter()
            .find(|r| r.accepted() && r.body_text() == body);
        assert_eq!(
            after.map(|r| r.delivery_id.as_str()),
            Some(id.as_str()),
            "{body}"
        );
    }
}

#[tokio::test]
async fn healthy_webhook_unaffected_by_dead_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    // A listener that never accepts: connections complete in the backlog and requests hang
    // until the webhook's timeout.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind black hole");
    let dead_url = hook_url(black_hole.local_addr().expect("black hole address"));
    let webhooks = vec![
        webhook("dead", &dead_url, None),
        webhook("live", &hook_url(receiver.addr), None),
    ];
    let mut conn = open_db(&db_path);
    let events = [
        event(EventKind::Raised, "alarm-a", 1),
        event(EventKind::Raised, "alarm-b", 1),
        event(EventKind::Escalated, "alarm-a", 2),
    ];
    enqueue_all(&mut conn, &webhooks, &events);

    let running = start(&db_path, webhooks.clone());
    wait_until("the live webhook gets every event", || {
        receiver.state.accepted().len() == events.len()
    })
    .await;
    let more = [event(EventKind::Cleared, "alarm-a", 3)];
    enqueue_all(&mut conn, &webhooks, &more);
    running.handle.wake();
    wait_until("the live webhook gets the later event", || {
        receiver.state.accepted().len() == events.len() + 1
    })
    .await;
    let dead = state_of(&db_path, &webhooks, "dead");
    running.stop().await;

    assert_eq!(dead.pending, 4, "the dead webhook keeps all its deliveries");
    let all: Vec<AlarmEvent> = events.iter().chain(more.iter()).cloned().collect();
    assert_delivered_once_in_order(&receiver.state.requests(), &all);
}

#[tokio::test]
async fn rejected_event_holds_only_its_alarm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    *receiver
        .state
        .reject_containing
        .lock()
        .expect("receiver lock") = Some(r#""id":"alarm-a","event":"alarm.raised""#.into());
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    let events = [
        event(EventKind::Raised, "alarm-a", 1),
        event(EventKind::Escalated, "alarm-a", 2),
        event(EventKind::Raised, "alarm-b", 1),
        event(EventKind::Cleared, "alarm-b", 2),
    ];
    enqueue_all(&mut conn, &webhooks, &events);

    let running = start(&db_path, webhooks.clone());
    wait_until("alarm-b gets through", || {
        receiver.state.accepted().len() == 2
    })
    .await;
    wait_until("alarm-a was retried", || {
        state_of(&db_path, &webhooks, "ops").max_attempts >= 2
    })
    .await;
    let held = receiver.state.accepted();
    *receiver
        .state
        .reject_containing
        .lock()
        .expect("receiver lock") = None;
    wait_until("alarm-a gets through", || {
        receiver.state.accepted().len() == 4
    })
    .await;
    running.stop().await;

    assert!(
        held.iter().all(|r| r.body_text().contains("alarm-b")),
        "{held:?}"
    );
    assert_delivered_once_in_order(&receiver.state.requests(), &events);
}

#[tokio::test]
async fn wake_starts_delivery_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let receiver = receiver().await;
    let webhooks = vec![webhook("ops", &hook_url(receiver.addr), None)];
    let mut conn = open_db(&db_path);
    let running = start(&db_path, webhooks.clone());
    wait_until("the dispatcher reports an empty queue", || {
        metric(&running.registry, "webhook_queue_depth", "ops") == Some(0.0)
    })
    .await;

    let started = Instant::now();
    enqueue_all(
        &mut conn,
        &webhooks,
        &[event(EventKind::Raised, "alarm-1", 1)],
    );
    running.handle.wake();
    wait_until("the event arrives", || receiver.state.accepted().len() == 1).await;
    let elapsed = started.elapsed();
    running.stop().await;

    assert!(
        elapsed < notify::RESCAN_INTERVAL,
        "delivered after {elapsed:?}"
    );
}

#[tokio::test]
async fn event_filter_and_orphans_in_queue_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("state.db");
    let all = webhook("all", "http://127.0.0.1:9/hook", None);
    let raised_only = webhook(
        "raised-only",
        "http://127.0.0.1:9/hook",
        Some(vec![EventKind::Raised]),
    );
    let removed = webhook("removed", "http://127.0.0.1:9/hook", None);
    let mut conn = open_db(&db_path);
    let events = [
        event(EventKind::Raised, "alarm-1", 1),
        event(EventKind::Cleared, "alarm-1", 2),
    ];
    enqueue_all(
        &mut conn,
        &[all.clone(), raised_only.clone(), removed],
        &events,
    );

    let configured = vec![all, raised_only];
    let states = notify::queue_state(&conn, &configured, SystemClock.now()).expect("queue state");
    let summary: Vec<(&str, bool, u64)> = states
        .iter()
        .map(|s| (s.webhook.as_str(), s.configured, s.pending))
        .collect();

    assert_eq!(
        summary,
        [
            ("all", true, 2),
            ("raised-only", true, 1),
            ("removed", false, 2)
        ]
    );
    assert!(states.iter().all(|s| s.oldest_created_at.is_some()));
    notify::init_schema(&conn).expect("schema creation is idempotent");
}
