//! Webhook notifications: every alarm event is POSTed, signed, to each subscribed webhook.
//!
//! Deliveries go through an outbox table in the state database. The alarm stage calls
//! [`enqueue`] inside the transaction that stores an alarm transition, commits, then calls
//! [`DispatcherHandle::wake`]. The dispatcher started by [`spawn_dispatcher`] runs one task
//! per webhook with its own database connection. Each task sends the oldest eligible row,
//! deletes it after a 2xx response, and on any failure retries with capped exponential
//! backoff, forever: a row leaves the outbox only when its receiver accepts it.
//!
//! Ordering: events of one alarm reach a webhook in the order they were queued. A failing
//! delivery holds back the later events of its alarm, and the webhook's backoff delays
//! every delivery to that webhook, but other webhooks are not affected.
//! Delivery is at least once: a crash between the response and the row's deletion sends
//! the row again with the same `X-Stonelion-Delivery` id.

mod config;
mod dispatcher;
mod metrics;
mod outbox;
mod signature;

pub use config::{ConfigProblem, Secret, Webhook, WebhookConfig};
pub use dispatcher::{
    DispatcherError, DispatcherHandle, RESCAN_INTERVAL, spawn_dispatcher,
    spawn_dispatcher_with_metrics,
};
pub use metrics::{NotifyMetrics, WebhookLabel};
pub use outbox::{QueueState, enqueue, init_schema, queue_state};
pub use signature::signature_header;
