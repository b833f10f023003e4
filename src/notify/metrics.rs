//! Prometheus metrics of the webhook dispatcher, labelled by webhook name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `webhook` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub webhook: String,
}

/// Counters and gauges of webhook deliveries.
#[derive(Clone, Default)]
pub struct NotifyMetrics {
    /// Deliveries that got a 2xx response and left the outbox.
    pub delivered: Family<WebhookLabel, Counter>,
    /// Attempts of a delivery that had failed before.
    pub retries: Family<WebhookLabel, Counter>,
    /// Attempts that failed: network error, timeout or non-2xx response.
    pub failed_attempts: Family<WebhookLabel, Counter>,
    /// Deliveries waiting in the outbox.
    pub queue_depth: Family<WebhookLabel, Gauge>,
    /// Age of the oldest waiting delivery in seconds, 0 when the queue is empty.
    pub oldest_pending_seconds: Family<WebhookLabel, Gauge>,
}

impl NotifyMetrics {
    /// Creates the metrics and registers them under `webhook_*`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries that got a 2xx response",
            metrics.delivered.clone(),
        );
        registry.register(
            "webhook_retries",
            "Webhook delivery attempts that repeat a failed attempt",
            metrics.retries.clone(),
        );
        registry.register(
            "webhook_failed_attempts",
            "Webhook delivery attempts that failed (network error, timeout, non-2xx)",
            metrics.failed_attempts.clone(),
        );
        registry.register(
            "webhook_queue_depth",
            "Webhook deliveries waiting in the outbox",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "webhook_oldest_pending_seconds",
            "Age of the oldest waiting webhook delivery in seconds",
            metrics.oldest_pending_seconds.clone(),
        );
        metrics
    }

    pub(crate) fn label(webhook: &str) -> WebhookLabel {
        WebhookLabel {
            webhook: webhook.to_owned(),
        }
    }
}
