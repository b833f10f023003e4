//! Client-id takeovers: a CONNECT with the client id of a live connection makes rumqttd
//! close the older connection (MQTT 3.1.1 section 3.1.4, "If the ClientId represents a
//! Client already connected to the Server then the Server MUST disconnect the existing
//! Client").
//!
//! Two devices that share a client id, or a stolen credential, would take the id over
//! from each other in a loop. Each takeover is counted in
//! `stonelion_mqtt_client_takeovers_total` and logged at WARN, at most once per
//! `LOG_INTERVAL`, and the start of each backoff is logged at WARN. A client id taken over more than `max_per_minute` times within a
//! minute is in backoff: its further CONNECTs are denied for `backoff`, while the
//! connection that holds it stays.
//!
//! Live connections are tracked by [`LiveConnection`] values that the per-connection
//! guard holds from its CONNACK until it sees DISCONNECT or is dropped with its
//! connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::metrics::SharedRegistry;

/// The window that `max_per_minute` counts takeovers in.
const WINDOW: Duration = Duration::from_secs(60);
/// How often a takeover is logged at WARN; repeats in between are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Connections between two sweeps of client ids that have no live connection left.
const SWEEP_EVERY: u64 = 1024;

/// Limits of client-id takeovers.
#[derive(Clone, Copy, Debug)]
pub struct TakeoverLimits {
    /// Takeovers of one client id per minute above which it is in backoff; 0 turns the
    /// limit off, but takeovers are still counted and logged.
    pub max_per_minute: u32,
    pub backoff: Duration,
}

/// Live connections, recent takeovers and backoffs, by client id.
pub struct ClientIds {
    limits: TakeoverLimits,
    state: Mutex<State>,
    takeovers: Counter,
}

#[derive(Default)]
struct State {
    clients: HashMap<String, ClientState>,
    connections: u64,
    last_logged: Option<Instant>,
    suppressed: u64,
}

#[derive(Default)]
struct ClientState {
    live: u32,
    takeovers: VecDeque<Instant>,
    backoff_until: Option<Instant>,
}

impl ClientState {
    fn forget_before(&mut self, now: Instant) {
        while self
            .takeovers
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
        {
            self.takeovers.pop_front();
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.live == 0
            && self.backoff_until.is_none_or(|until| now >= until)
            && self
                .takeovers
                .back()
                .is_none_or(|at| now.saturating_duration_since(*at) >= WINDOW)
    }
}

impl ClientIds {
    pub fn new(limits: TakeoverLimits, registry: &SharedRegistry) -> Self {
        let takeovers = Counter::default();
        registry.register(|r| {
            r.register(
                "mqtt_client_takeovers",
                "MQTT connections closed because a new connection used their client id",
                takeovers.clone(),
            );
        });
        Self {
            limits,
            state: Mutex::default(),
            takeovers,
        }
    }

    /// Returns the time left of `client_id`'s backoff, or `None` when it may connect.
    pub fn backoff_remaining(&self, client_id: &str, now: Instant) -> Option<Duration> {
        let state = self.lock();
        let until = state.clients.get(client_id)?.backoff_until?;
        (now < until).then(|| until - now)
    }

    /// Returns whether a connection with `client_id` is live.
    pub fn is_live(&self, client_id: &str) -> bool {
        self.lock()
            .clients
            .get(client_id)
            .is_some_and(|client| client.live > 0)
    }

    /// Records an accepted connection of `client_id`. When another connection with this
    /// client id was live at its CONNECT (`live_at_connect`, from [`Self::is_live`]) or is
    /// live now, rumqttd has closed it, so a takeover is counted. The older connection's
    /// record can end before the new CONNACK, because rumqttd closes it first.
    pub fn connected(self: &Arc<Self>, client_id: &str, live_at_connect: bool) -> LiveConnection {
        let now = Instant::now();
        let mut state = self.lock();
        state.connections += 1;
        if state.connections.is_multiple_of(SWEEP_EVERY) {
            state.clients.retain(|_, client| !client.is_idle(now));
        }
        let client = state.clients.entry(client_id.to_owned()).or_default();
        let taken_over = live_at_connect || client.live > 0;
        client.live += 1;
        let mut backoff_started = false;
        if taken_over {
            self.takeovers.inc();
            client.forget_before(now);
            client.takeovers.push_back(now);
            let max = self.limits.max_per_minute;
            let over_limit = max > 0 && client.takeovers.len() > max as usize;
            if over_limit && client.backoff_until.is_none_or(|until| now >= until) {
                client.backoff_until = Some(now + self.limits.backoff);
                client.takeovers.clear();
                backoff_started = true;
            }
        }
        if backoff_started {
            drop(state);
            tracing::warn!(
                client_id,
                max_takeovers_per_minute = self.limits.max_per_minute,
                backoff = %humantime::format_duration(self.limits.backoff),
                "MQTT client id taken over too often; its new connections are denied for the \
                 backoff. Two clients may share this client id, or a credential may be stolen"
            );
        } else if taken_over {
            self.log_takeover(state, client_id, now);
        }
        LiveConnection {
            clients: self.clone(),
            client_id: client_id.to_owned(),
        }
    }

    /// Logs a takeover at WARN unless one was logged within `LOG_INTERVAL`.
    fn log_takeover(
        &self,
        mut state: std::sync::MutexGuard<'_, State>,
        client_id: &str,
        now: Instant,
    ) {
        let recent = state
            .last_logged
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_INTERVAL);
        if recent {
            state.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut state.suppressed);
        state.last_logged = Some(now);
        drop(state);
        tracing::warn!(
            client_id,
            suppressed_since_last_log = suppressed,
            "MQTT client id taken over: a new connection used it, so the broker closed the \
             older one"
        );
    }

    fn disconnected(&self, client_id: &str) {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(client) = state.clients.get_mut(client_id) else {
            return;
        };
        client.live = client.live.saturating_sub(1);
        if client.is_idle(now) {
            state.clients.remove(client_id);
        }
    }

    pub fn count(&self) -> u64 {
        self.takeovers.get()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One live connection of a client id; dropping it ends the connection's record.
pub struct LiveConnection {
    clients: Arc<ClientIds>,
    client_id: String,
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.clients.disconnected(&self.client_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(max_per_minute: u32) -> Arc<ClientIds> {
        let limits = TakeoverLimits {
            max_per_minute,
            backoff: Duration::from_secs(60),
        };
        Arc::new(ClientIds::new(limits, &SharedRegistry::new()))
    }

    #[test]
    fn second_connection_is_takeover() {
        let clients = clients(5);
        let first = clients.connected("gas-01", false);
        assert_eq!(clients.count(), 0);
        let _second = clients.connected("gas-01", false);
        assert_eq!(clients.count(), 1);
        drop(first);
        let _other = clients.connected("gas-02", false);
        assert_eq!(clients.count(), 1);
    }

    #[test]
    fn reconnect_after_drop_is_not_takeover() {
        let clients = clients(5);
        drop(clients.connected("gas-01", false));
        let _again = clients.connected("gas-01", false);
        assert_eq!(clients.count(), 0);
        assert_eq!(clients.lock().clients.len(), 1);
    }

    #[test]
    fn takeovers_above_limit_start_backoff() {
        let clients = clients(2);
        let mut live = vec![clients.connected("gas-01", false)];
        for _ in 0..2 {
            live.push(clients.connected("gas-01", false));
            live.remove(0);
        }
        assert_eq!(
            clients.backoff_remaining("gas-01", Instant::now()),
            None,
            "2 takeovers are within the limit"
        );
        live.push(clients.connected("gas-01", false));
        assert_eq!(clients.count(), 3);
        assert!(
            clients
                .backoff_remaining("gas-01", Instant::now())
                .is_some()
        );
        assert_eq!(clients.backoff_remaining("gas-02", Instant::now()), None);
    }

    #[test]
    fn live_at_connect_is_takeover() {
        let clients = clients(5);
        let first = clients.connected("gas-01", false);
        let live = clients.is_live("gas-01");
        drop(first);
        let _second = clients.connected("gas-01", live);
        assert_eq!(clients.count(), 1);
    }

    #[test]
    fn idle_client_ids_are_forgotten() {
        let clients = clients(0);
        let first = clients.connected("gas-01", false);
        let second = clients.connected("gas-01", false);
        drop(first);
        drop(second);
        assert_eq!(
            clients.lock().clients.len(),
            1,
            "a recent takeover keeps the entry"
        );
        assert_eq!(clients.backoff_remaining("gas-01", Instant::now()), None);
    }
}
