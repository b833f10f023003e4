//! The embedded MQTT broker (rumqttd) and the in-process link that takes telemetry from it.
//!
//! The router runs on its own thread; the listener runs as a task on the server's runtime.
//! The ingest link subscribes to `telemetry/#` and `status/#` and turns messages into
//! readings.
//!
//! Every connection goes through [`super::guard::GuardedV4`], which checks its
//! credentials' topics, and, when accounts are configured, rumqttd's authentication
//! handler checks each CONNECT's username and password ([`super::auth`]).
//!
//! Durability window: a device receives PUBACK when the router accepts its publish, before
//! the reading is stored. A reading in that window is lost if the process dies; the window
//! is the time through this link and the pipeline plus the storage commit interval.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth;
use super::directory::SharedDirectory;
use super::guard::{GuardPolicy, GuardedV4};
use super::payload::{self, RejectReason, Rejection, TopicKind};
use super::reject::RejectLog;
use super::{IngestHandle, LivenessCause};
use crate::clock::SharedClock;
use crate::model::Source;

/// Settings of the embedded broker.
#[derive(Clone)]
pub struct BrokerSettings {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest payload accepted by the broker, in bytes.
    pub max_payload_bytes: usize,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Accounts, topic rules and limits that every connection is checked against.
    pub guard: Arc<GuardPolicy>,
}

type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

/// A running broker: its bound address and a way to open in-process links to it.
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    links: Arc<LinkFactory>,
    listener: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// `fix` names the settings that choose the address.
    #[error("cannot listen for MQTT on {addr}: {reason}; {fix}")]
    Listen {
        addr: SocketAddr,
        reason: String,
        fix: String,
    },
    #[error("cannot open the in-process link to the broker: {0}")]
    Link(String),
}

impl EmbeddedBroker {
    /// Starts the router and the listener, returning once the listener accepts MQTT
    /// connections.
    pub async fn start(settings: &BrokerSettings) -> Result<EmbeddedBroker, BrokerError> {
        let router = Router::new(0, router_config(settings));
        let router_tx = router.spawn();

        // rumqttd binds inside its accept loop and cannot report the port, so port 0 is
        // resolved here first; a lost race for the port is retried.
        let attempts = 5;
        let mut last_error = String::new();
        for _ in 0..attempts {
            let addr = resolve_port(settings.listen)?;
            let guard = GuardedV4::new(settings.guard.clone());
            let mut server = Server::new(server_settings(settings, addr), router_tx.clone(), guard);
            let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
            let listener = tokio::spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    let _ = failed_tx.send(e.to_string());
                }
            });
            match wait_until_listening(addr, failed_rx).await {
                Ok(()) => {
                    let tx = router_tx.clone();
                    let links: Arc<LinkFactory> = Arc::new(move |name: &str| {
                        let (link_tx, link_rx, _) = LinkBuilder::new(name, tx.clone())
                            .dynamic_filters(true)
                            .build()
                            .map_err(|e| e.to_string())?;
                        Ok((link_tx, link_rx))
                    });
                    tracing::info!(%addr, "embedded MQTT broker listening");
                    return Ok(EmbeddedBroker {
                        addr,
                        links,
                        listener,
                    });
                }
                Err(reason) => last_error = reason,
            }
        }
        Err(BrokerError::Listen {
            addr: settings.listen,
            reason: last_error,
            fix: format!(
                "free the port or change {}",
                crate::security::MQTT_LISTEN_SETTING
            ),
        })
    }

    /// Opens an in-process link with the given client id.
    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.links)(client_id).map_err(BrokerError::Link)
    }

    /// Stops accepting MQTT connections.
    pub fn stop_listening(&self) {
        self.listener.abort();
    }
}

/// Size of one segment of the router's in-memory message log. rumqttd keeps one log per
/// subscription filter, so the ingest link's `telemetry/#` log contains the most recent
/// messages of all devices, up to `MESSAGE_LOG_SEGMENTS` segments. The log is the
/// buffer a subscriber may fall behind by, and it grows to its bound as messages arrive,
/// so the broker's memory rises by up to 32 MiB per filter after start.
pub const MESSAGE_LOG_SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// Segments of the router's message log kept in memory per subscription filter.
pub const MESSAGE_LOG_SEGMENTS: usize = 4;

fn router_config(settings: &BrokerSettings) -> RouterConfig {
    RouterConfig {
        max_connections: settings.max_connections,
        max_outgoing_packet_count: 200,
        max_segment_size: MESSAGE_LOG_SEGMENT_BYTES,
        max_segment_count: MESSAGE_LOG_SEGMENTS,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: rumqttd::Strategy::default(),
    }
}

fn server_settings(settings: &BrokerSettings, addr: SocketAddr) -> ServerSettings {
    let mut server = ServerSettings {
        name: "mqtt".to_owned(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // The broker's own limit closes the connection, so it sits above the ingest
            // limit: a payload between the two is rejected, logged and counted instead.
            max_payload_size: broker_payload_limit(settings.max_payload_bytes),
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if !settings.guard.accounts.is_open() {
        server.set_auth_handler(auth::auth_handler(settings.guard.clone()));
    }
    server
}

/// Largest payload the broker accepts before it closes a connection: four times the
/// ingest limit, at most 16 MiB.
pub fn broker_payload_limit(ingest_limit: usize) -> usize {
    ingest_limit
        .saturating_mul(4)
        .clamp(ingest_limit, 16 * 1024 * 1024)
}

/// Checks that the address is free, choosing a free port for port 0.
fn resolve_port(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let error = |e: std::io::Error| BrokerError::Listen {
        addr: listen,
        reason: e.to_string(),
        fix: crate::security::bind_fix(&e, crate::security::MQTT_LISTEN_SETTING),
    };
    let probe = std::net::TcpListener::bind(listen).map_err(error)?;
    probe.local_addr().map_err(error)
}

/// Waits until the listener has bound its port, or the listener task reports an error.
///
/// Binding the same address is the check: it fails with `AddrInUse` once rumqttd listens.
/// The check opens no connection, so the broker logs nothing for it.
async fn wait_until_listening(
    addr: SocketAddr,
    mut failed: tokio::sync::oneshot::Receiver<String>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::task::yield_now().await;
        if let Ok(reason) = failed.try_recv() {
            return Err(reason);
        }
        match std::net::TcpListener::bind(addr) {
            // `resolve_port` found the port free just before, so rumqttd has bound it now.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Ok(()),
            Err(e) => return Err(e.to_string()),
            Ok(probe) => drop(probe),
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the listener did not bind within 10 s".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Spawns the task that drains the ingest link into the pipeline.
pub fn spawn_ingest_link(
    broker: &EmbeddedBroker,
    directory: SharedDirectory,
    ingest: IngestHandle,
    rejects: Arc<RejectLog>,
    clock: SharedClock,
    max_payload_bytes: usize,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, BrokerError> {
    let (mut link_tx, mut link_rx) = broker.link("stonelion-ingest")?;
    for filter in ["telemetry/#", "status/#"] {
        link_tx
            .subscribe(filter)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
    }
    let consumer = LinkConsumer {
        directory,
        ingest,
        rejects,
        clock,
        max_payload_bytes,
    };
    Ok(tokio::spawn(async move {
        // The link must stay alive for the subscription to last.
        let _link_tx = link_tx;
        loop {
            let notification = tokio::select! {
                () = shutdown.cancelled() => break,
                n = link_rx.next() => n,
            };
            match notification {
                Ok(Some(Notification::Forward(forward))) => {
                    // A bug triggered by one message must not stop MQTT ingestion.
                    let handled = std::panic::AssertUnwindSafe(
                        consumer.handle(&forward.publish.topic, &forward.publish.payload),
                    )
                    .catch_unwind()
                    .await;
                    if handled.is_err() {
                        tracing::error!(
                            topic = %String::from_utf8_lossy(&forward.publish.topic),
                            "handling an MQTT message panicked; the message was dropped"
                        );
                    }
                }
                // The router pauses a link that does not reply to `Unschedule` with `wake`.
                Ok(Some(Notification::Unschedule)) => {
                    if link_rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "MQTT ingest link closed; MQTT telemetry is no longer received");
                    break;
                }
            }
        }
    }))
}

struct LinkConsumer {
    directory: SharedDirectory,
    ingest: IngestHandle,
    rejects: Arc<RejectLog>,
    clock: SharedClock,
    max_payload_bytes: usize,
}

impl LinkConsumer {
    async fn handle(&self, topic: &[u8], payload: &[u8]) {
        let topic = String::from_utf8_lossy(topic);
        if let Err(rejection) = self.handle_message(&topic, payload).await {
            self.rejects.reject("mqtt", &topic, &rejection);
        }
    }

    async fn handle_message(&self, topic: &str, payload: &[u8]) -> Result<(), Rejection> {
        if payload.len() > self.max_payload_bytes {
            return Err(Rejection::new(
                RejectReason::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes; split it or raise \
                     [ingest] max_payload_bytes",
                    payload.len(),
                    self.max_payload_bytes
                ),
            ));
        }
        let directory = self.directory.load();
        match payload::parse_topic(topic)? {
            TopicKind::Telemetry {
                site,
                device,
                metric,
            } => {
                let entry = directory.resolve(&site, &device)?;
                let (ts, values, mut rejected) = match metric {
                    Some(metric) => {
                        let value = payload::decode_bare_value(&metric, payload)?;
                        (None, vec![(metric, value)], Vec::new())
                    }
                    None => {
                        let t = payload::decode_telemetry(payload)?;
                        (t.ts, t.values, t.rejected)
                    }
                };
                let (readings, invalid) =
                    directory.readings(entry, ts, values, self.clock.now(), Source::Mqtt)?;
                rejected.extend(invalid);
                for rejection in &rejected {
                    self.rejects.reject("mqtt", topic, rejection);
                }
                if self.ingest.submit(readings).await.is_err() {
                    return Err(Rejection::new(
                        RejectReason::PipelineBusy,
                        "the pipeline is shut down",
                    ));
                }
                Ok(())
            }
            TopicKind::Status { site, device } => {
                let entry = directory.resolve(&site, &device)?;
                let online = payload::decode_status(payload)?;
                let _ = self
                    .ingest
                    .liveness(entry.id.clone(), online, LivenessCause::StatusMessage)
                    .await;
                Ok(())
            }
        }
    }
}
