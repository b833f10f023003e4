//! The per-connection guard: a wrapper around rumqttd's MQTT 3.1.1 codec that checks
//! every CONNECT, PUBLISH and SUBSCRIBE against the connection's account, because rumqttd
//! has no topic ACL of its own.
//!
//! rumqttd clones the codec for each connection and decodes every packet through
//! `read_mut`, so the guard sees each packet before the router. A denied packet does not
//! close the connection, because a client that reconnects would resend its unacknowledged
//! messages, and a persistent session would loop on the denied one:
//!
//! - a denied QoS 0 publish is dropped;
//! - a denied QoS 1 publish is answered with PUBACK by the guard itself, and a QoS 2 one
//!   with PUBREC and then PUBCOMP, without reaching the router;
//! - denied SUBSCRIBE filters are removed and get Failure (0x80) in the SUBACK.
//!
//! The guard's own replies are written before the next packet the broker sends. To make
//! sure one follows, a dropped packet that needs a reply is replaced by a PINGREQ, which
//! the router answers with PINGRESP.
//!
//! A denied last will in CONNECT closes the connection before CONNACK, and so does a
//! CONNECT whose client id is in takeover backoff ([`super::takeover`]). A second CONNECT
//! on one connection closes it too, because MQTT 3.1.1 (section 3.1) makes it a protocol
//! violation. rumqttd 0.20 ignores it without checking its credentials, so the guard must
//! not take its username as the connection's account. From its CONNACK until DISCONNECT
//! or the end of the connection, the guard holds the connection's [`LiveConnection`], so
//! takeovers of its client id are counted.
//!
//! A reload or device change that removes a connection's account, changes its password
//! or changes a viewer's sites closes the connection at the next packet in either
//! direction, so no packet passes on the old credentials. A device moved to another site
//! stays connected and publishes to its new site's topics. A viewer's CONNECT always
//! starts a clean session, because rumqttd would restore a kept session's subscriptions
//! without a SUBSCRIBE for the guard to check against the viewer's current sites.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnectReturnCode, Error, Packet, PingReq, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, SubAck, Subscribe, SubscribeReasonCode,
};

use super::auth::{
    DenyReason, LoginAccount, LoginPolicy, MqttAccounts, MqttDenials, MqttIdentity, SharedAccounts,
};
use super::takeover::{ClientIds, LiveConnection};

/// What every connection's guard shares.
pub struct GuardPolicy {
    pub accounts: SharedAccounts,
    pub denials: Arc<MqttDenials>,
    /// Average publishes per second of one authenticated device; 0 disables the limit.
    pub max_messages_per_second: f64,
    /// Publishes one device may send at once above the average.
    pub max_burst_messages: u32,
    /// Verified-login cache and failed-login backoff.
    pub login: LoginPolicy,
    /// Live connections and takeovers by client id.
    pub clients: Arc<ClientIds>,
}

/// The guarded codec; see the module docs.
pub struct GuardedV4 {
    policy: Arc<GuardPolicy>,
    inner: V4,
    client_id: String,
    /// The CONNECT's username, or empty without one.
    username: String,
    /// Whether another connection held this client id when the CONNECT arrived.
    client_id_was_live: bool,
    /// Whether the connection's CONNECT was read.
    connected: bool,
    identity: Option<MqttIdentity>,
    /// The account of the CONNECT's username when the CONNECT was read.
    login: Option<LoginAccount>,
    /// The accounts' generation that `login` was last found valid in.
    checked_generation: AtomicU64,
    /// Set once the account changed, so the closing is counted once.
    account_changed: AtomicBool,
    bucket: Option<TokenBucket>,
    replies: Mutex<Replies>,
}

/// Packets the guard answers itself, written before the broker's next packet.
#[derive(Default)]
struct Replies {
    pending: Vec<Packet>,
    /// For each SUBSCRIBE packet id, the positions of the filters that were removed.
    removed_filters: HashMap<u16, Vec<usize>>,
    /// Packet ids of denied QoS 2 publishes whose PUBREL the guard answers.
    denied_exactly_once: HashSet<u16>,
    /// This connection's record as the live connection of its client id, from CONNACK.
    live: Option<LiveConnection>,
}

impl GuardPolicy {
    /// Replaces the broker's accounts after a reload or device change, and drops the
    /// verified logins of removed accounts. A cached login of an account whose password
    /// hash changed no longer matches, because the hash is part of its tag. Live
    /// connections of changed accounts close at their next packet (see the module docs).
    /// Failed logins counted against a password that changed are forgotten, so they do
    /// not lock out the new one: those of its username, and those of every source
    /// address, which the TLS listener counts without knowing whose password they tried.
    /// An open broker keeps no accounts until a restart.
    pub fn replace_accounts(&self, accounts: MqttAccounts) {
        let before = self.accounts.load();
        let changed: Vec<String> = accounts
            .usernames()
            .filter(|username| before.password_hash(username) != accounts.password_hash(username))
            .map(str::to_owned)
            .collect();
        if self.accounts.replace(accounts) {
            self.login.verified.retain_accounts(&self.accounts.load());
            for username in &changed {
                self.login.usernames.forget(username);
            }
            if !changed.is_empty() {
                self.login.sources.clear();
            }
        }
    }
}

impl GuardedV4 {
    pub fn new(policy: Arc<GuardPolicy>) -> Self {
        Self {
            policy,
            inner: V4,
            client_id: String::new(),
            username: String::new(),
            client_id_was_live: false,
            connected: false,
            identity: None,
            login: None,
            checked_generation: AtomicU64::new(0),
            account_changed: AtomicBool::new(false),
            bucket: None,
            replies: Mutex::default(),
        }
    }

    /// Fails once the connection's account was removed or changed since the CONNECT
    /// (see [`MqttAccounts::still_valid`]), which closes the connection.
    fn check_account(&self) -> Result<(), Error> {
        if !self.connected || self.policy.accounts.is_open() {
            return Ok(());
        }
        if self.account_changed.load(Ordering::Acquire) {
            return Err(Error::InvalidProtocol);
        }
        let generation = self.policy.accounts.generation();
        if generation == self.checked_generation.load(Ordering::Acquire) {
            return Ok(());
        }
        let accounts = self.policy.accounts.load();
        let valid = self
            .login
            .as_ref()
            .is_some_and(|login| accounts.still_valid(&self.username, login));
        if valid {
            self.checked_generation.store(generation, Ordering::Release);
            return Ok(());
        }
        if !self.account_changed.swap(true, Ordering::AcqRel) {
            self.policy
                .denials
                .deny(DenyReason::AccountChanged, &self.client_id, &self.username);
        }
        Err(Error::InvalidProtocol)
    }

    fn replies(&mut self) -> &mut Replies {
        self.replies
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks one decoded packet. `Ok(None)` drops it and decodes the next one.
    fn inspect(
        &mut self,
        packet: Packet,
        publish: Option<PublishHeader>,
    ) -> Result<Option<Packet>, Error> {
        match packet {
            Packet::Connect(mut connect, properties, will, will_properties, login) => {
                if self.connected {
                    let username = login.as_ref().map_or("", |l| l.username.as_str());
                    self.policy
                        .denials
                        .deny(DenyReason::SecondConnect, &self.client_id, username);
                    return Err(Error::InvalidProtocol);
                }
                self.connected = true;
                self.client_id.clone_from(&connect.client_id);
                self.check_takeover_backoff()?;
                self.client_id_was_live = self.policy.clients.is_live(&self.client_id);
                if !self.policy.accounts.is_open() {
                    let username = login.as_ref().map_or("", |l| l.username.as_str());
                    self.username = username.to_owned();
                    let generation = self.policy.accounts.generation();
                    let accounts = self.policy.accounts.load();
                    self.identity = accounts.identity(username).cloned();
                    self.login = accounts.login_account(username);
                    *self.checked_generation.get_mut() = generation;
                    // A kept session would restore subscriptions that were checked against
                    // the sites a viewer had then, so a viewer always starts clean.
                    if matches!(self.identity, Some(MqttIdentity::Viewer { .. })) {
                        connect.clean_session = true;
                    }
                    self.bucket = self.new_bucket();
                    if let Some(will) = &will {
                        let topic = String::from_utf8_lossy(&will.topic);
                        if !self
                            .identity
                            .as_ref()
                            .is_some_and(|id| id.may_publish(&topic))
                        {
                            self.policy.denials.deny(
                                DenyReason::WillNotAllowed,
                                &self.client_id,
                                &topic,
                            );
                            return Err(Error::InvalidProtocol);
                        }
                    }
                }
                Ok(Some(Packet::Connect(
                    connect,
                    properties,
                    will,
                    will_properties,
                    login,
                )))
            }
            Packet::Publish(message, properties) => {
                let topic = String::from_utf8_lossy(&message.topic).into_owned();
                match self.check_publish(&topic) {
                    Ok(()) => Ok(Some(Packet::Publish(message, properties))),
                    Err(reason) => {
                        self.policy.denials.deny(reason, &self.client_id, &topic);
                        Ok(self.deny_publish(publish))
                    }
                }
            }
            Packet::Subscribe(subscribe, properties) => {
                Ok(Some(self.filter_subscribe(subscribe, properties)))
            }
            Packet::Disconnect(disconnect, properties) => {
                // A client that disconnects cleanly and reconnects takes nothing over.
                self.replies().live = None;
                Ok(Some(Packet::Disconnect(disconnect, properties)))
            }
            Packet::PubRel(release, properties) => {
                if self.replies().denied_exactly_once.remove(&release.pkid) {
                    let complete = PubComp {
                        pkid: release.pkid,
                        reason: PubCompReason::Success,
                    };
                    self.replies().pending.push(Packet::PubComp(complete, None));
                    return Ok(Some(Packet::PingReq(PingReq)));
                }
                Ok(Some(Packet::PubRel(release, properties)))
            }
            other => Ok(Some(other)),
        }
    }

    /// Denies a CONNECT whose client id is in takeover backoff.
    fn check_takeover_backoff(&self) -> Result<(), Error> {
        let Some(remaining) = self
            .policy
            .clients
            .backoff_remaining(&self.client_id, Instant::now())
        else {
            return Ok(());
        };
        let subject = format!(
            "client id taken over too often, {} s of backoff left",
            remaining.max(Duration::from_secs(1)).as_secs()
        );
        self.policy
            .denials
            .deny(DenyReason::TakeoverBackoff, &self.client_id, &subject);
        Err(Error::InvalidProtocol)
    }

    fn new_bucket(&self) -> Option<TokenBucket> {
        let is_device = matches!(self.identity, Some(MqttIdentity::Device { .. }));
        (is_device && self.policy.max_messages_per_second > 0.0).then(|| {
            TokenBucket::new(
                self.policy.max_messages_per_second,
                self.policy.max_burst_messages,
            )
        })
    }

    fn check_publish(&mut self, topic: &str) -> Result<(), DenyReason> {
        if self.policy.accounts.is_open() {
            return Ok(());
        }
        let allowed = |identity: &Option<MqttIdentity>| {
            identity.as_ref().is_some_and(|id| id.may_publish(topic))
        };
        if !allowed(&self.identity) {
            // A reload or device change since the CONNECT may have added the account or
            // moved the device to another site, so the current account decides.
            let current = self
                .policy
                .accounts
                .load()
                .identity(&self.username)
                .cloned();
            if current.is_none() || current == self.identity || !allowed(&current) {
                return Err(DenyReason::PublishNotAllowed);
            }
            self.identity = current;
            if self.bucket.is_none() {
                self.bucket = self.new_bucket();
            }
        }
        let within_rate = self
            .bucket
            .as_mut()
            .is_none_or(|bucket| bucket.take(Instant::now()));
        if within_rate {
            Ok(())
        } else {
            Err(DenyReason::RateLimited)
        }
    }

    /// Drops a denied publish, queueing the acknowledgement its QoS needs.
    fn deny_publish(&mut self, header: Option<PublishHeader>) -> Option<Packet> {
        let header = header?;
        let reply = match header.qos {
            1 => Packet::PubAck(
                PubAck {
                    pkid: header.pkid,
                    reason: PubAckReason::NotAuthorized,
                },
                None,
            ),
            2 => {
                self.replies().denied_exactly_once.insert(header.pkid);
                Packet::PubRec(
                    PubRec {
                        pkid: header.pkid,
                        reason: PubRecReason::NotAuthorized,
                    },
                    None,
                )
            }
            _ => return None,
        };
        self.replies().pending.push(reply);
        Some(Packet::PingReq(PingReq))
    }

    fn filter_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        properties: Option<rumqttd::protocol::SubscribeProperties>,
    ) -> Packet {
        if self.policy.accounts.is_open() {
            return Packet::Subscribe(subscribe, properties);
        }
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        for (index, filter) in subscribe.filters.into_iter().enumerate() {
            if self
                .identity
                .as_ref()
                .is_some_and(|id| id.may_subscribe(&filter.path))
            {
                kept.push(filter);
            } else {
                self.policy.denials.deny(
                    DenyReason::SubscribeNotAllowed,
                    &self.client_id,
                    &filter.path,
                );
                removed.push(index);
            }
        }
        subscribe.filters = kept;
        if removed.is_empty() {
            return Packet::Subscribe(subscribe, properties);
        }
        if subscribe.filters.is_empty() {
            let codes = vec![SubscribeReasonCode::Failure; removed.len()];
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes: codes,
            };
            self.replies().pending.push(Packet::SubAck(ack, None));
            return Packet::PingReq(PingReq);
        }
        self.replies()
            .removed_filters
            .insert(subscribe.pkid, removed);
        Packet::Subscribe(subscribe, properties)
    }
}

impl Clone for GuardedV4 {
    /// Returns a guard for a new connection: the shared policy with no connection state.
    fn clone(&self) -> Self {
        GuardedV4::new(self.policy.clone())
    }
}

impl Protocol for GuardedV4 {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        loop {
            let header = PublishHeader::peek(stream);
            let packet = self.inner.read_mut(stream, max_size)?;
            self.check_account()?;
            if let Some(packet) = self.inspect(packet, header)? {
                return Ok(packet);
            }
        }
    }

    fn write(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
        // A failed CONNACK write leaves rumqttd's link half started, so an account that
        // changed since the CONNECT is left to the connection's next packet.
        if !matches!(packet, Packet::ConnAck(..)) {
            self.check_account()?;
        }
        let mut replies = self
            .replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut size = 0;
        for reply in replies.pending.drain(..) {
            size += self.inner.write(reply, buffer)?;
        }
        let packet = match packet {
            Packet::ConnAck(ack, properties) => {
                // An empty client id gets a unique one from rumqttd, so it is not tracked.
                if ack.code == ConnectReturnCode::Success && !self.client_id.is_empty() {
                    let clients = &self.policy.clients;
                    let live = clients.connected(&self.client_id, self.client_id_was_live);
                    replies.live = Some(live);
                }
                Packet::ConnAck(ack, properties)
            }
            Packet::SubAck(mut ack, properties) => {
                for index in replies
                    .removed_filters
                    .remove(&ack.pkid)
                    .unwrap_or_default()
                {
                    let index = index.min(ack.return_codes.len());
                    ack.return_codes.insert(index, SubscribeReasonCode::Failure);
                }
                Packet::SubAck(ack, properties)
            }
            other => other,
        };
        drop(replies);
        Ok(size + self.inner.write(packet, buffer)?)
    }
}

/// QoS and packet id of a PUBLISH, read from its bytes because rumqttd keeps both fields
/// private.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PublishHeader {
    pub(crate) qos: u8,
    pub(crate) pkid: u16,
}

impl PublishHeader {
    /// Reads the header of the packet at the start of `stream` if it is a PUBLISH.
    pub(crate) fn peek(stream: &[u8]) -> Option<PublishHeader> {
        let first = *stream.first()?;
        if first >> 4 != 3 {
            return None;
        }
        let qos = (first >> 1) & 0b11;
        // The remaining length is a variable-length integer of 1 to 4 bytes.
        let mut position = 1;
        loop {
            let byte = *stream.get(position)?;
            position += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if position > 4 {
                return None;
            }
        }
        if qos == 0 {
            return Some(PublishHeader { qos, pkid: 0 });
        }
        let topic_len = usize::from(u16::from_be_bytes([
            *stream.get(position)?,
            *stream.get(position + 1)?,
        ]));
        let at = position + 2 + topic_len;
        let pkid = u16::from_be_bytes([*stream.get(at)?, *stream.get(at + 1)?]);
        Some(PublishHeader { qos, pkid })
    }
}

/// A token bucket: `rate` tokens per second up to `burst`, one per publish.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn peeks_publish_header() {
        // PUBLISH QoS 1, remaining length 9, topic "a/b", packet id 0x0102, payload "xy".
        let packet = [0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'x', b'y'];
        assert_eq!(
            PublishHeader::peek(&packet),
            Some(PublishHeader {
                qos: 1,
                pkid: 0x0102
            })
        );
        assert_eq!(
            PublishHeader::peek(&[0x30, 5, 0, 3, b'a', b'/', b'b']),
            Some(PublishHeader { qos: 0, pkid: 0 })
        );
        assert_eq!(PublishHeader::peek(&[0xC0, 0]), None);
        assert_eq!(PublishHeader::peek(&[0x32, 9, 0]), None);
    }

    #[test]
    fn bucket_refills_at_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 2);
        assert!(bucket.take(start));
        assert!(bucket.take(start));
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(100)));
        assert!(!bucket.take(start + Duration::from_millis(100)));
    }
}
