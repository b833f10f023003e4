//! The polling loop: schedules each device, reads its blocks, decodes the values and hands
//! good readings to the pipeline.
//!
//! Devices on one serial port, or behind one RTU-over-TCP gateway, share one connection and
//! are polled one request at a time with `bus_pause` between requests, because the RS485 bus
//! behind them carries one frame at a time. Every Modbus TCP device has its own task and
//! connection, and a semaphore per `host:port` caps the requests in flight to one gateway.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::DEFAULT_POLL_INTERVAL;
use super::decode::{self, Decoded};
use super::metrics::{DeviceLabels, ModbusMetrics};
use super::plan::{self, PlanLimits, ReadBlock};
use super::transport::{Connection, Link, ReadError, Reply};
use super::{PolledDevice, TextValues};
use crate::clock::SharedClock;
use crate::ingest::{IngestHandle, LivenessCause};
use crate::model::{MetricName, Reading, Source, Value};

/// State shared by the poll tasks.
#[derive(Clone)]
pub(crate) struct Shared {
    pub ingest: IngestHandle,
    pub metrics: ModbusMetrics,
    pub clock: SharedClock,
    pub texts: TextValues,
    pub shutdown: CancellationToken,
}

/// One device's schedule and reporting state.
pub(crate) struct DeviceState {
    device: PolledDevice,
    blocks: Vec<ReadBlock>,
    interval: Duration,
    next_due: Instant,
    failures: u32,
    offline: bool,
    last_reported: HashMap<MetricName, (Value, Instant)>,
    /// The last error logged at WARN, so one failing device does not flood the log.
    last_warned: Option<String>,
}

impl DeviceState {
    /// Plans the device's reads, or explains why its profile and config do not fit.
    pub fn new(device: PolledDevice) -> Result<Self, String> {
        let config = &device.config;
        let max_registers = config
            .max_registers_per_read
            .or(device.profile.modbus.max_registers_per_read)
            .unwrap_or(plan::MAX_REGISTERS_PER_READ)
            .min(plan::MAX_REGISTERS_PER_READ);
        let limits = PlanLimits {
            max_registers,
            max_bits: config.max_bits_per_read.min(plan::MAX_BITS_PER_READ),
            max_gap: config.max_gap,
            coalesce: config.coalesce,
        };
        let blocks = plan::plan_reads(&device.profile.registers, limits)?;
        if blocks.is_empty() {
            return Err(format!(
                "profile `{}` lists no Modbus registers",
                device.profile.name
            ));
        }
        let interval = config
            .poll_interval
            .or(device.profile.modbus.poll_interval)
            .unwrap_or(DEFAULT_POLL_INTERVAL);
        Ok(Self {
            device,
            blocks,
            interval,
            next_due: Instant::now(),
            failures: 0,
            offline: false,
            last_reported: HashMap::new(),
            last_warned: None,
        })
    }

    fn id(&self) -> &str {
        self.device.id.as_str()
    }
}

/// Polls one Modbus TCP device until shutdown.
pub(crate) async fn run_tcp_device(
    mut state: DeviceState,
    gateway: Arc<Semaphore>,
    shared: Shared,
) {
    let mut connection = Connection::new(Link::of(&state.device.config));
    info!(device = %state.device.id, link = %connection.link(), "modbus polling started");
    while wait_until(state.next_due, &shared.shutdown).await {
        poll_once(&mut state, &mut connection, Some(&gateway), &shared).await;
    }
    info!(device = %state.device.id, "modbus polling stopped");
}

/// Polls the devices that share one serial bus or RTU-over-TCP gateway until shutdown, one
/// request at a time.
pub(crate) async fn run_bus(link: Link, mut states: Vec<DeviceState>, shared: Shared) {
    let pause = states
        .iter()
        .map(|s| s.device.config.bus_pause)
        .max()
        .unwrap_or_default();
    let mut connection = Connection::with_pause(link, pause);
    info!(link = %connection.link(), devices = states.len(), "modbus bus polling started");
    while let Some(index) = (0..states.len()).min_by_key(|&i| states[i].next_due) {
        if !wait_until(states[index].next_due, &shared.shutdown).await {
            break;
        }
        poll_once(&mut states[index], &mut connection, None, &shared).await;
        // A device that failed may have left a frame half sent, so the next one starts clean.
        if states[index].failures > 0 {
            connection.reset();
        }
    }
    info!(link = %connection.link(), "modbus bus polling stopped");
}

/// Sleeps until `deadline`; returns `false` if shutdown came first.
async fn wait_until(deadline: Instant, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep_until(deadline) => true,
    }
}

/// Polls every block of one device once, then reports readings and liveness.
async fn poll_once(
    state: &mut DeviceState,
    connection: &mut Connection,
    gateway: Option<&Semaphore>,
    shared: &Shared,
) {
    let started = Instant::now();
    let mut readings = Vec::new();
    let mut bad = Vec::new();
    // Only a read that returns data shows the device works. Exception replies from the
    // device, or from a gateway in front of a silent device, do not count.
    let mut answered = false;
    for block_index in 0..state.blocks.len() {
        let block = state.blocks[block_index].clone();
        let _permit = match gateway {
            Some(semaphore) => Some(
                semaphore
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            None => None,
        };
        match read_with_retries(state, connection, &block, shared).await {
            Ok(reply) => {
                answered = true;
                decode_block(state, &block, &reply, shared, &mut readings, &mut bad);
            }
            Err(error) => {
                let reason = error.reason();
                bad.extend(block.metrics.iter().map(|&i| {
                    (
                        state.device.profile.registers[i].metric.clone(),
                        reason.clone(),
                    )
                }));
            }
        }
        if shared.shutdown.is_cancelled() {
            return;
        }
    }
    if shared
        .ingest
        .bad_readings(state.device.id.clone(), bad)
        .await
        .is_err()
    {
        debug!(device = %state.device.id, "pipeline closed; bad readings dropped at shutdown");
    }
    finish_poll(state, answered, readings, started, shared).await;
}

async fn read_with_retries(
    state: &mut DeviceState,
    connection: &mut Connection,
    block: &ReadBlock,
    shared: &Shared,
) -> Result<Reply, ReadError> {
    let (unit_id, timeout, retries) = (
        state.device.config.unit_id,
        state.device.config.timeout,
        state.device.config.retries,
    );
    let labels = DeviceLabels {
        device: state.device.id.to_string(),
    };
    let mut attempt = 0;
    loop {
        shared.metrics.requests.get_or_create(&labels).inc();
        let result = connection.read(unit_id, block, timeout).await;
        let error = match result {
            Ok(reply) => return Ok(reply),
            Err(error) => error,
        };
        shared.metrics.count_error(state.id(), &error.reason());
        log_read_error(state, block, &error, attempt);
        if attempt >= retries || !error.is_retryable() {
            return Err(error);
        }
        attempt += 1;
    }
}

fn log_read_error(state: &mut DeviceState, block: &ReadBlock, error: &ReadError, attempt: u32) {
    let key = format!(
        "{} {} {}",
        block.function.as_str(),
        block.address,
        error.reason()
    );
    let config = &state.device.config;
    if state.offline || state.last_warned.as_deref() == Some(key.as_str()) {
        debug!(
            device = %state.device.id, unit_id = config.unit_id, function = block.function.as_str(),
            address = block.address, count = block.count, attempt, %error, "modbus read failed"
        );
        return;
    }
    warn!(
        device = %state.device.id, unit_id = config.unit_id, function = block.function.as_str(),
        address = block.address, count = block.count, attempt, %error, "modbus read failed"
    );
    state.last_warned = Some(key);
}

/// Decodes every metric of a block. Bad values are counted and go to `bad` with their
/// reason instead of `readings`.
fn decode_block(
    state: &DeviceState,
    block: &ReadBlock,
    reply: &Reply,
    shared: &Shared,
    readings: &mut Vec<Reading>,
    bad: &mut Vec<(MetricName, String)>,
) {
    let ts = shared.clock.now();
    for &index in &block.metrics {
        let entry = &state.device.profile.registers[index];
        let offset = usize::from(entry.register.address - block.address);
        let decoded = match reply {
            Reply::Bits(bits) => decode::decode_bit(&bits[offset..]),
            Reply::Words(words) => decode::decode_words(&entry.register, &words[offset..]),
        };
        let value = match decoded {
            Ok(Decoded::Bool(b)) => Value::Bool(b),
            Ok(Decoded::Number(n)) => Value::Number(n),
            Ok(Decoded::Text(text)) => {
                store_text(&shared.texts, state, &entry.metric, text);
                continue;
            }
            Err(error) => {
                shared
                    .metrics
                    .count_bad_value(state.id(), entry.metric.as_str(), error.reason());
                debug!(device = %state.device.id, metric = %entry.metric, %error, "bad modbus value not stored");
                bad.push((entry.metric.clone(), error.reason().to_owned()));
                continue;
            }
        };
        if let Value::Number(code) = value {
            note_unknown_code(state, entry, code);
        }
        readings.push(Reading {
            site: state.device.site.clone(),
            device: state.device.id.clone(),
            metric: entry.metric.clone(),
            ts,
            value,
            source: Source::Modbus,
        });
    }
}

fn note_unknown_code(state: &DeviceState, entry: &crate::profile::MetricRegister, code: f64) {
    #[allow(clippy::cast_possible_truncation)]
    let key = code as i64;
    if !entry.register.codes.is_empty() && entry.register.code_label(key).is_none() {
        debug!(device = %state.device.id, metric = %entry.metric, code, "status code not listed in the profile");
    }
}

fn store_text(texts: &TextValues, state: &DeviceState, metric: &MetricName, text: String) {
    let mut texts = texts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    texts
        .entry(state.device.id.clone())
        .or_default()
        .insert(metric.clone(), text);
}

async fn finish_poll(
    state: &mut DeviceState,
    answered: bool,
    readings: Vec<Reading>,
    started: Instant,
    shared: &Shared,
) {
    let labels = DeviceLabels {
        device: state.device.id.to_string(),
    };
    if answered {
        if state.offline {
            info!(device = %state.device.id, "modbus device responds again");
            report_liveness(state, true, LivenessCause::Reading, shared).await;
        }
        state.failures = 0;
        state.offline = false;
        state.last_warned = None;
        shared.metrics.online.get_or_create(&labels).set(1);
    } else {
        state.failures += 1;
        let threshold = state.device.config.offline_after_failures;
        if state.failures >= threshold && !state.offline {
            state.offline = true;
            warn!(device = %state.device.id, failures = state.failures, "modbus device offline");
            shared.metrics.online.get_or_create(&labels).set(0);
            report_liveness(
                state,
                false,
                LivenessCause::PollFailures(state.failures),
                shared,
            )
            .await;
        }
    }
    let (stored, unstored) = split_reported(state, readings);
    let count = stored.len() as u64;
    if shared.ingest.submit(stored).await.is_err()
        || shared.ingest.submit_unstored(unstored).await.is_err()
    {
        debug!(device = %state.device.id, "pipeline closed; readings dropped at shutdown");
    } else {
        shared.metrics.readings.get_or_create(&labels).inc_by(count);
    }
    state.next_due = next_due(state, started);
}

async fn report_liveness(state: &DeviceState, online: bool, cause: LivenessCause, shared: &Shared) {
    if shared
        .ingest
        .liveness(state.device.id.clone(), online, cause)
        .await
        .is_err()
    {
        debug!(device = %state.device.id, "pipeline closed; liveness change dropped at shutdown");
    }
}

/// Applies report-on-change, which decides only what is stored: returns the readings to
/// store (moved past the deadband, changed state, or last stored `report_max_interval` ago)
/// and the rest, which the rules and liveness still see.
fn split_reported(state: &mut DeviceState, readings: Vec<Reading>) -> (Vec<Reading>, Vec<Reading>) {
    let Some(deadband) = state.device.config.report_deadband else {
        return (readings, Vec::new());
    };
    let max_interval = state.device.config.report_max_interval;
    let now = Instant::now();
    readings.into_iter().partition(|reading| {
        let report = match state.last_reported.get(&reading.metric) {
            None => true,
            Some((last, at)) => {
                let moved = match (last, reading.value) {
                    (Value::Number(a), Value::Number(b)) => (a - b).abs() > deadband,
                    (a, b) => *a != b,
                };
                moved || now.duration_since(*at) >= max_interval
            }
        };
        if report {
            state
                .last_reported
                .insert(reading.metric.clone(), (reading.value, now));
        }
        report
    })
}

/// Computes the next poll time: the interval after the last start, or an exponential
/// backoff with jitter once the device is offline.
fn next_due(state: &DeviceState, started: Instant) -> Instant {
    if !state.offline {
        let due = started + state.interval;
        return due.max(Instant::now());
    }
    let jitter = rand::rng().random_range(BACKOFF_JITTER);
    Instant::now() + offline_backoff(state, jitter)
}

/// Range of the factor that spreads the polls of devices that went offline together.
const BACKOFF_JITTER: std::ops::Range<f64> = 0.8..1.2;

/// Computes the wait before the next poll of an offline device: `interval` × 2^k, where k
/// counts the failed polls since it went offline, capped at `max_backoff` (but never below
/// `interval`), times `jitter`.
fn offline_backoff(state: &DeviceState, jitter: f64) -> Duration {
    let steps = state
        .failures
        .saturating_sub(state.device.config.offline_after_failures)
        .min(16);
    let backoff = state
        .interval
        .saturating_mul(1 << steps)
        .min(state.device.config.max_backoff.max(state.interval));
    backoff.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::ModbusDeviceConfig;
    use crate::model::{DeviceId, SiteId};

    fn offline_state(failures: u32) -> DeviceState {
        let text = "name = \"one\"\n[[metrics]]\nname = \"level\"\nmodbus = { register = 40001 }\n";
        let profile = crate::profile::parse(text, None).expect("profile parses");
        let mut config = ModbusDeviceConfig::tcp("127.0.0.1:502".to_owned(), 1);
        config.poll_interval = Some(Duration::from_secs(1));
        config.offline_after_failures = 3;
        config.max_backoff = Duration::from_secs(10);
        let device = PolledDevice {
            id: DeviceId::new("d"),
            site: SiteId::new("s"),
            profile: Arc::new(profile),
            config,
        };
        let mut state = DeviceState::new(device).expect("plans");
        state.failures = failures;
        state.offline = true;
        state
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        let seconds = |failures| offline_backoff(&offline_state(failures), 1.0).as_secs_f64();
        assert_eq!(seconds(3), 1.0);
        assert_eq!(seconds(4), 2.0);
        assert_eq!(seconds(5), 4.0);
        assert_eq!(seconds(6), 8.0);
        assert_eq!(seconds(7), 10.0);
        assert_eq!(seconds(1000), 10.0);
    }

    #[test]
    fn backoff_jitter_scales_the_wait() {
        let state = offline_state(5);
        assert_eq!(
            offline_backoff(&state, BACKOFF_JITTER.start),
            Duration::from_secs_f64(3.2)
        );
        assert!((offline_backoff(&state, BACKOFF_JITTER.end).as_secs_f64() - 4.8).abs() < 1e-9);
    }

    #[tokio::test]
    async fn next_poll_of_offline_device_is_jittered() {
        let state = offline_state(5);
        let mut waits = Vec::new();
        for _ in 0..200 {
            let before = Instant::now();
            let due = next_due(&state, before);
            let after = Instant::now();
            assert!(
                due >= before + Duration::from_secs_f64(3.2),
                "wait shorter than 0.8 x 4 s"
            );
            assert!(
                due <= after + Duration::from_secs_f64(4.8),
                "wait longer than 1.2 x 4 s"
            );
            waits.push(due.duration_since(before));
        }
        let (min, max) = (
            waits.iter().min().expect("samples"),
            waits.iter().max().expect("samples"),
        );
        assert!(
            *max - *min > Duration::from_millis(100),
            "no jitter: waits from {min:?} to {max:?}"
        );
    }
}
