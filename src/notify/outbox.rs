//! The webhook outbox: a table in the server's state database.
//!
//! The alarm stage writes an alarm transition and its outbox rows in one transaction, so a
//! committed transition always has its deliveries queued. A row is deleted once its receiver
//! returned 2xx. Until then it stays, across restarts.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

use crate::alarms::event::AlarmEvent;
use crate::model::Timestamp;
use crate::notify::config::Webhook;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook         TEXT    NOT NULL,
    delivery_id     TEXT    NOT NULL UNIQUE,
    event           TEXT    NOT NULL,
    alarm_id        TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    retry_rank      INTEGER NOT NULL DEFAULT 0,
    last_attempt_at INTEGER,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_by_alarm ON webhook_outbox (webhook, alarm_id, seq);
";

/// Creates the outbox table and its index if they do not exist.
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// Queues `event` for every webhook in `webhooks` that subscribes to its kind, each row with
/// a fresh delivery id.
///
/// Call it inside the transaction that stores the alarm transition, then call
/// [`DispatcherHandle::wake`](crate::notify::DispatcherHandle::wake) after the commit.
pub fn enqueue(
    tx: &Transaction<'_>,
    webhooks: &[Webhook],
    event: &AlarmEvent,
    now: Timestamp,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO webhook_outbox (webhook, delivery_id, event, alarm_id, body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for webhook in webhooks.iter().filter(|w| w.subscribes_to(event.kind)) {
        let delivery_id = uuid::Uuid::now_v7().to_string();
        insert.execute(params![
            webhook.name,
            delivery_id,
            event.kind.as_str(),
            event.alarm_id,
            event.body,
            now.as_millis(),
        ])?;
    }
    Ok(())
}

/// A queued delivery as the dispatcher reads it.
#[derive(Clone, Debug)]
pub(crate) struct PendingDelivery {
    pub seq: i64,
    pub delivery_id: String,
    pub event: String,
    pub alarm_id: String,
    pub body: Vec<u8>,
    pub attempts: u32,
}

/// Returns the delivery to attempt next for `webhook`.
///
/// Only the oldest row of each alarm is eligible, so events of one alarm go out in order.
/// Among those, rows never attempted come first, oldest first. A failed row moves behind
/// every other eligible row, so one rejected event does not hold back other alarms.
// NOTE: this scans every pending row of the webhook, which is fine for thousands of rows
// but would want a per-alarm head table if outboxes grow to millions.
pub(crate) fn next_delivery(
    conn: &Connection,
    webhook: &str,
) -> rusqlite::Result<Option<PendingDelivery>> {
    let mut select = conn.prepare_cached(
        "SELECT o.seq, o.delivery_id, o.event, o.alarm_id, o.body, o.attempts
         FROM webhook_outbox o
         WHERE o.webhook = ?1
           AND o.seq = (SELECT MIN(h.seq) FROM webhook_outbox h
                        WHERE h.webhook = o.webhook AND h.alarm_id = o.alarm_id)
         ORDER BY o.retry_rank, o.seq
         LIMIT 1",
    )?;
    select
        .query_row([webhook], |row| {
            Ok(PendingDelivery {
                seq: row.get(0)?,
                delivery_id: row.get(1)?,
                event: row.get(2)?,
                alarm_id: row.get(3)?,
                body: row.get(4)?,
                attempts: row.get(5)?,
            })
        })
        .optional()
}

/// Removes a delivered row.
pub(crate) fn mark_delivered(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?
        .execute([seq])?;
    Ok(())
}

/// Stores a failed attempt and moves the row behind the other eligible rows of its webhook.
pub(crate) fn record_failure(
    conn: &Connection,
    seq: i64,
    now: Timestamp,
    error: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE webhook_outbox
         SET attempts = attempts + 1,
             last_attempt_at = ?2,
             last_error = ?3,
             retry_rank = 1 + (SELECT MAX(r.retry_rank) FROM webhook_outbox r
                               WHERE r.webhook = webhook_outbox.webhook)
         WHERE seq = ?1",
    )?
    .execute(params![seq, now.as_millis(), error])?;
    Ok(())
}

/// Outbox state of one webhook, for the API and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueState {
    pub webhook: String,
    /// Whether the webhook is in the current config. Rows of a removed or renamed webhook
    /// stay queued and are never sent until a webhook of that name is configured again.
    pub configured: bool,
    /// Deliveries waiting.
    pub pending: u64,
    /// Creation time of the oldest waiting delivery.
    pub oldest_created_at: Option<Timestamp>,
    /// Age of the oldest waiting delivery in milliseconds, 0 when none waits.
    pub oldest_age_ms: i64,
    /// Highest number of failed attempts of any waiting delivery.
    pub max_attempts: u32,
    /// Error of the most recent failed attempt of a waiting delivery.
    pub last_error: Option<String>,
}

/// Reads the outbox state of every configured webhook and of every webhook name that still
/// has rows, sorted by name.
pub fn queue_state(
    conn: &Connection,
    webhooks: &[Webhook],
    now: Timestamp,
) -> rusqlite::Result<Vec<QueueState>> {
    let mut states: Vec<QueueState> = webhooks
        .iter()
        .map(|w| empty_state(&w.name, true))
        .collect();

    let mut select = conn.prepare_cached(
        "SELECT webhook, COUNT(*), MIN(created_at), MAX(attempts)
         FROM webhook_outbox GROUP BY webhook",
    )?;
    let rows = select.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, u64>(1)?,
            row.get(2)?,
            row.get(3)?,
        ))
    })?;
    for row in rows {
        let (name, pending, oldest, max_attempts): (String, u64, i64, u32) = row?;
        let index = match states.iter().position(|s| s.webhook == name) {
            Some(index) => index,
            None => {
                states.push(empty_state(&name, false));
                states.len() - 1
            }
        };
        let state = &mut states[index];
        state.pending = pending;
        state.oldest_created_at = Some(Timestamp(oldest));
        state.oldest_age_ms = now.as_millis().saturating_sub(oldest).max(0);
        state.max_attempts = max_attempts;
        state.last_error = last_error(conn, &name)?;
    }

    states.sort_by(|a, b| a.webhook.cmp(&b.webhook));
    Ok(states)
}

fn empty_state(webhook: &str, configured: bool) -> QueueState {
    QueueState {
        webhook: webhook.to_owned(),
        configured,
        pending: 0,
        oldest_created_at: None,
        oldest_age_ms: 0,
        max_attempts: 0,
        last_error: None,
    }
}

fn last_error(conn: &Connection, webhook: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT last_error FROM webhook_outbox
         WHERE webhook = ?1 AND last_error IS NOT NULL
         ORDER BY last_attempt_at DESC, seq DESC LIMIT 1",
    )?
    .query_row([webhook], |row| row.get(0))
    .optional()
}

/// Returns the number of waiting rows of `webhook` and the creation time of the oldest.
pub(crate) fn pending_summary(
    conn: &Connection,
    webhook: &str,
) -> rusqlite::Result<(u64, Option<Timestamp>)> {
    conn.prepare_cached("SELECT COUNT(*), MIN(created_at) FROM webhook_outbox WHERE webhook = ?1")?
        .query_row([webhook], |row| {
            Ok((row.get(0)?, row.get::<_, Option<i64>>(1)?.map(Timestamp)))
        })
}
