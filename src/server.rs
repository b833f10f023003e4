//! Starts the stages in order and stops them in reverse: ingest first, then the pipeline
//! flushes storage, then the HTTP API and the alarm stage stop, then the webhook
//! dispatcher finishes its in-flight deliveries. A [`Reloader`] applies config reloads and
//! device changes while the server runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use crate::alarms::manager::AlarmManager;
use crate::alarms::store::{self as alarm_store, AlarmStore};
use crate::api::AppState;
use crate::api::auth::ApiAuth;
use crate::clock::SharedClock;
use crate::config::StorageBackend;
use crate::config::managed::{self, ConfigFile};
use crate::config::{Config, SharedConfig};
use crate::ingest::IngestHandle;
use crate::ingest::auth::{LoginPolicy, MqttAccounts, MqttDenials, SharedAccounts};
use crate::ingest::directory::{Directory, SharedDirectory};
use crate::ingest::guard::GuardPolicy;
use crate::ingest::login::FailureLimits;
use crate::ingest::mqtt::{BrokerSettings, EmbeddedBroker, spawn_ingest_link};
use crate::ingest::reject::RejectLog;
use crate::ingest::takeover::{ClientIds, TakeoverLimits};
use crate::metrics::SharedRegistry;
use crate::model::DeviceId;
use crate::pipeline::{DeviceState, DeviceStates, Pipeline};
use crate::reload::{Reloader, ReloaderParts, WebhookRunner};
use crate::security::tls::{CertificateExpiry, HandshakeFailures, TlsError, TlsListener};
use crate::server_modbus::ModbusRunner;
use crate::storage::TimeSeriesStore;
use crate::storage::engine::{Engine, EngineOptions};
use crate::storage::influxdb2::{InfluxDb2Store, TeeStore};
use crate::storage::sqlite::SqliteStore;
use crate::summary::SummaryTask;

/// Capacity of the channel into the pipeline, in messages.
const INGEST_CHANNEL: usize = 4096;
/// Capacity of the channel into the alarm stage, in commands.
const ALARM_CHANNEL: usize = 4096;
/// How often retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// A running server.
pub struct Server {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// Address of the MQTT over TLS listener, when `[mqtt] tls_listen` is set.
    pub mqtt_tls_addr: Option<SocketAddr>,
    pub registry: SharedRegistry,
    pub ingest: IngestHandle,
    pub states: DeviceStates,
    pub store: Arc<dyn TimeSeriesStore>,
    /// Applies config reloads (`POST /api/v1/admin/reload`, SIGHUP) and device changes.
    pub reloader: Arc<Reloader>,
    broker: EmbeddedBroker,
    stop_ingest: CancellationToken,
    stop_http: CancellationToken,
    stop_dispatcher: CancellationToken,
    ingest_tasks: Vec<JoinHandle<()>>,
    pipeline: JoinHandle<()>,
    http: JoinHandle<()>,
    alarms: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts every stage on the current tokio runtime with a config that has no file, so
    /// reload and device management are not available.
    pub async fn start(config: Config, clock: SharedClock) -> anyhow::Result<Server> {
        Self::start_with(config, None, String::new(), Vec::new(), clock).await
    }

    /// Starts every stage with the config file and the managed devices of its data
    /// directory; the file is read again on reload.
    pub async fn start_with_file(file: ConfigFile, clock: SharedClock) -> anyhow::Result<Server> {
        let loaded = managed::load(&file).map_err(managed::to_config_error)?;
        Self::start_with(
            loaded.config,
            Some(file),
            loaded.file_text,
            loaded.managed,
            clock,
        )
        .await
    }

    async fn start_with(
        config: Config,
        file: Option<ConfigFile>,
        file_text: String,
        managed_devices: Vec<toml::Table>,
        clock: SharedClock,
    ) -> anyhow::Result<Server> {
        let accounts = SharedAccounts::new(MqttAccounts::from_config(&config));
        crate::security::check_listeners(&config, accounts.is_open())?;
        // Loaded before anything opens, so that a bad certificate or CA stops the start.
        let http_tls = http_tls_config(&config)?;
        let mqtt_tls = mqtt_tls_config(&config)?;
        let data_dir = config.server.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let registry = SharedRegistry::new();
        let config = Arc::new(config);

        let store = open_store(&config, &data_dir, &registry)?;

        let state_db = data_dir.join("state.sqlite");
        let alarm_store = AlarmStore::open(&state_db, config.webhooks.clone())
            .with_context(|| format!("cannot open the state database {}", state_db.display()))?;
        let stop_dispatcher = CancellationToken::new();
        let (webhooks, dispatcher_handle) = WebhookRunner::start(
            state_db.clone(),
            config.webhooks.clone(),
            clock.clone(),
            &registry,
            stop_dispatcher.clone(),
        )
        .context("cannot start the webhook dispatcher")?;
        let mut manager = AlarmManager::new(
            &config,
            alarm_store,
            clock.clone(),
            dispatcher_handle,
            Some(store.clone()),
            &registry,
        )
        .context("cannot load the open alarms")?;
        let directory = SharedDirectory::new(Directory::from_config(&config));
        let restored = restore_states(&directory.load(), store.as_ref(), clock.now());
        manager.restore_latest(&restored);
        let (alarm_handle, alarms) = manager.spawn(ALARM_CHANNEL);
        let states: DeviceStates = Arc::new(RwLock::new(restored));
        let (ingest, ingest_rx) = IngestHandle::channel(INGEST_CHANNEL);
        let stop_ingest = CancellationToken::new();
        let mut background_ingest = Vec::new();
        let pipeline = Pipeline {
            directory: directory.clone(),
            store: store.clone(),
            alarms: alarm_handle.clone(),
            states: states.clone(),
            clock: clock.clone(),
        };
        let pipeline_registry = registry.clone();
        let pipeline_stop = stop_ingest.clone();
        let pipeline = tokio::spawn(async move {
            pipeline
                .run(ingest_rx, &pipeline_registry, pipeline_stop)
                .await;
        });

        let denials = Arc::new(MqttDenials::new(&registry));
        let handshake_failures = Arc::new(HandshakeFailures::new(&registry));
        let expiry = CertificateExpiry::new(&registry);
        if let (Some(_), Some(cert)) = (&http_tls, &config.api.tls_cert) {
            expiry.record("http-tls", cert, chrono::Utc::now());
        }
        if let (Some(_), Some(cert)) = (&mqtt_tls, &config.mqtt.tls_cert) {
            expiry.record("mqtt-tls", cert, chrono::Utc::now());
        }
        let guard = Arc::new(GuardPolicy {
            accounts,
            denials,
            max_messages_per_second: config.mqtt.max_messages_per_second,
            max_burst_messages: config.mqtt.max_burst_messages,
            login: LoginPolicy::new(FailureLimits {
                max_failures: config.mqtt.max_failed_logins,
                backoff: config.mqtt.failed_login_backoff,
            }),
            clients: Arc::new(ClientIds::new(
                TakeoverLimits {
                    max_per_minute: config.mqtt.max_client_takeovers_per_minute,
                    backoff: config.mqtt.client_takeover_backoff,
                },
                &registry,
            )),
        });
        // Both bound before the broker starts: the broker acknowledges QoS 1 messages as
        // they arrive, so a start that failed after it had opened could lose them.
        let listener = tokio::net::TcpListener::bind(config.server.http_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen for HTTP on {}: {e}; {}",
                    config.server.http_listen,
                    crate::security::bind_fix(&e, crate::security::HTTP_LISTEN_SETTING)
                )
            })?;
        let mqtt_tls_listener = bind_mqtt_tls(&config, mqtt_tls.clone()).await?;
        let broker = EmbeddedBroker::start(&BrokerSettings {
            listen: config.server.mqtt_listen,
            max_payload_bytes: config.ingest.max_payload_bytes,
            max_connections: config.mqtt.max_connections,
            guard: guard.clone(),
        })
        .await?;
        let mqtt_tls_addr = match start_mqtt_tls(
            &config,
            mqtt_tls_listener,
            broker.addr,
            guard.clone(),
            handshake_failures.clone(),
            &stop_ingest,
        )? {
            Some((addr, task)) => {
                background_ingest.push(task);
                Some(addr)
            }
            None => None,
        };
        let rejects = Arc::new(RejectLog::new(&registry));
        let mut ingest_tasks = std::mem::take(&mut background_ingest);
        ingest_tasks.push(spawn_ingest_link(
            &broker,
            directory.clone(),
            ingest.clone(),
            rejects,
            clock.clone(),
            config.ingest.max_payload_bytes,
            stop_ingest.clone(),
        )?);
        let modbus = ModbusRunner::start(
            &config,
            ingest.clone(),
            &registry,
            clock.clone(),
            stop_ingest.clone(),
        );
        let shared_config = SharedConfig::new(config.clone());
        let reloader = Arc::new(Reloader::new(ReloaderParts {
            file,
            file_text,
            managed: managed_devices,
            config: shared_config.clone(),
            directory,
            alarms: alarm_handle.clone(),
            webhooks,
            modbus,
            mqtt: guard,
        }));

        let reader = alarm_store::open_connection(&state_db)
            .context("cannot open the state database for reading")?;
        let alarm_reader = Arc::new(Mutex::new(reader));
        // Stopped with ingest, so the pipeline's final flush also stores the last summary.
        let summary = SummaryTask {
            config: config.clone(),
            states: states.clone(),
            alarm_reader: alarm_reader.clone(),
            store: store.clone(),
            clock: clock.clone(),
        };
        ingest_tasks.push(summary.spawn(config.storage.summary_interval, stop_ingest.clone()));
        let app = AppState {
            config: shared_config,
            reloader: reloader.clone(),
            states: states.clone(),
            store: store.clone(),
            alarms: alarm_handle,
            alarm_reader,
            state_db,
            registry: registry.clone(),
            clock: clock.clone(),
        };
        let mut router = crate::server_http::router(
            app,
            ingest.clone(),
            store.clone(),
            config.api.query_limits(),
            &registry,
        )
        .layer(axum::middleware::from_fn_with_state(
            ApiAuth::new(config.api_tokens.clone(), &registry),
            crate::api::auth::authorize,
        ));
        // Outside the authorization layer, because browsers send preflights without a token.
        if let Some(cors) = crate::server_http::cors_layer(&config.server.cors_allowed_origins)? {
            router = router.layer(cors);
        }
        let http_addr = listener.local_addr()?;
        let stop_http = CancellationToken::new();
        let http_tls = http_tls.map(|tls| (tls, handshake_failures));
        let http = spawn_http(listener, router, http_tls, stop_http.clone())?;
        tracing::info!(
            %http_addr,
            tls = config.api.tls_cert.is_some(),
            client_certificates = config.api.tls_client_ca.is_some(),
            "HTTP API listening"
        );

        let background = vec![spawn_retention(
            store.clone(),
            clock.clone(),
            config.storage.retention,
        )];
        Ok(Server {
            http_addr,
            mqtt_addr: broker.addr,
            mqtt_tls_addr,
            registry,
            ingest,
            states,
            store,
            reloader,
            broker,
            stop_ingest,
            stop_http,
            stop_dispatcher,
            ingest_tasks,
            pipeline,
            http,
            alarms,
            background,
        })
    }

    /// Stops every stage in order; see the module docs.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.broker.stop_listening();
        self.stop_ingest.cancel();
        for task in self.ingest_tasks {
            let _ = task.await;
        }
        self.reloader.stop_modbus().await;
        drop(self.ingest);
        let _ = self.pipeline.await;
        self.stop_http.cancel();
        let _ = self.http.await;
        self.reloader.release_alarm_stage();
        let _ = self.alarms.await;
        self.stop_dispatcher.cancel();
        self.reloader.stop_webhooks().await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

/// Loads the MQTT over TLS config when `[mqtt] tls_listen` is set.
fn mqtt_tls_config(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(_), Some(cert), Some(key)) = (
        config.mqtt.tls_listen,
        &config.mqtt.tls_cert,
        &config.mqtt.tls_key,
    ) else {
        return Ok(None);
    };
    let client_ca = config.mqtt.tls_client_ca.as_deref();
    crate::security::tls::server_config(cert, key, client_ca, &[])
        .map(Some)
        .context(
            "cannot load the MQTT TLS certificate ([mqtt] tls_cert, tls_key and tls_client_ca)",
        )
}

/// Binds `[mqtt] tls_listen` when MQTT over TLS is on.
async fn bind_mqtt_tls(
    config: &Config,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>> {
    let (Some(listen), Some(tls)) = (config.mqtt.tls_listen, tls) else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for MQTT over TLS on {listen}: {e}; {}",
            crate::security::bind_fix(&e, crate::security::MQTT_TLS_LISTEN_SETTING)
        )
    })?;
    Ok(Some((listener, tls)))
}

/// Starts the MQTT over TLS listener bound by [`bind_mqtt_tls`].
fn start_mqtt_tls(
    config: &Config,
    bound: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    broker: SocketAddr,
    guard: Arc<GuardPolicy>,
    failures: Arc<HandshakeFailures>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    let Some((listener, tls)) = bound else {
        return Ok(None);
    };
    let bind_certificates = config.mqtt.tls_client_ca.is_some();
    let (addr, task) = crate::security::mqtt_tls::spawn(
        listener,
        tls,
        broker,
        crate::security::mqtt_tls::RelayPolicy {
            guard,
            bind_certificates,
        },
        failures,
        stop.clone(),
    )
    .context("cannot start the MQTT over TLS listener")?;
    tracing::info!(%addr, client_certificates = config.mqtt.tls_client_ca.is_some(), "MQTT over TLS listening");
    Ok(Some((addr, task)))
}

/// Loads the HTTPS config when `[api]` has a certificate, naming the config key of a
/// file that cannot be used.
fn http_tls_config(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&config.api.tls_cert, &config.api.tls_key) else {
        return Ok(None);
    };
    let client_ca = config.api.tls_client_ca.as_deref();
    match crate::security::tls::server_config(cert, key, client_ca, &[b"http/1.1"]) {
        Ok(tls) => Ok(Some(tls)),
        Err(e @ TlsError::ClientCa { .. }) => {
            Err(anyhow::anyhow!("invalid [api] tls_client_ca: {e}"))
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context("cannot load the HTTP TLS certificate ([api] tls_cert and tls_key)")),
    }
}

/// Serves the router over plain HTTP, or HTTPS with `tls`.
fn spawn_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<(Arc<rustls::ServerConfig>, Arc<HandshakeFailures>)>,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let served = match tls {
        Some((tls, failures)) => {
            let listener = TlsListener::new(listener, tls, "http-tls", failures)?;
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }),
    };
    Ok(tokio::spawn(async move {
        match served.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server failed"),
            Err(e) => tracing::error!(error = %e, "the HTTP server task failed"),
        }
    }))
}

/// Opens the configured time-series backend.
fn open_store(
    config: &Config,
    data_dir: &Path,
    registry: &SharedRegistry,
) -> anyhow::Result<Arc<dyn TimeSeriesStore>> {
    let storage = &config.storage;
    let embedded = || -> anyhow::Result<Arc<dyn TimeSeriesStore>> {
        let options = EngineOptions {
            commit_interval: storage.commit_interval,
            memory_budget_bytes: storage.memory_budget_bytes,
            max_series: storage.max_series,
            series_limit_exempt: crate::pipeline::RESERVED_MEASUREMENTS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            retention: storage.retention,
            rollups: storage.rollups.clone(),
            ..EngineOptions::default()
        };
        let engine = Engine::open(data_dir.join("tsdb"), options)
            .context("cannot open the embedded time-series store")?;
        registry.register(|r| engine.register_metrics(r));
        Ok(Arc::new(engine))
    };
    // Starts while InfluxDB is unreachable: points wait in the on-disk buffer. Only an
    // invalid config or an unusable buffer folder stops the start.
    let influx = || {
        let mut influx = storage
            .influxdb2
            .clone()
            .context("the backend needs [storage.influxdb2]")?;
        if influx.buffer_dir.as_os_str().is_empty() {
            influx.buffer_dir = data_dir.join("influxdb2-buffer");
        }
        let store = InfluxDb2Store::open(influx, registry)
            .context("cannot start the InfluxDB 2 backend")?;
        anyhow::Ok(Arc::new(store) as Arc<dyn TimeSeriesStore>)
    };
    let store = match storage.backend {
        StorageBackend::Embedded => embedded()?,
        StorageBackend::Sqlite => Arc::new(
            SqliteStore::open(&data_dir.join("series"), storage.commit_interval)
                .context("cannot open the SQLite time-series store")?,
        ),
        StorageBackend::Influxdb2 => influx()?,
        StorageBackend::Both => Arc::new(TeeStore::new(embedded()?, influx()?)),
    };
    tracing::info!(backend = ?storage.backend, "time-series store open");
    Ok(store)
}

/// Restores each device's latest values and `last_seen` from the time-series store. A store
/// that cannot be read only logs an error: the server starts without them, as before.
fn restore_states(
    directory: &Directory,
    store: &dyn TimeSeriesStore,
    now: crate::model::Timestamp,
) -> HashMap<DeviceId, DeviceState> {
    match crate::pipeline::restore_states(directory, store, now) {
        Ok(states) => {
            tracing::info!(
                devices = states.len(),
                "restored the latest values of devices"
            );
            states
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "reading the latest values from storage failed; devices start without latest values, \
                 and readings older than the last one before the restart can change alarms that are not open"
            );
            HashMap::new()
        }
    }
}

fn spawn_retention(
    store: Arc<dyn TimeSeriesStore>,
    clock: SharedClock,
    retention: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(RETENTION_INTERVAL);
        loop {
            ticker.tick().await;
            let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            let cutoff = crate::model::Timestamp(clock.now().0.saturating_sub(retention_ms));
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.enforce_retention(cutoff)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(deleted)) => tracing::info!(deleted, %cutoff, "retention deleted old points"),
                Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
                Err(e) => tracing::error!(error = %e, "retention task failed"),
            }
        }
    })
}
