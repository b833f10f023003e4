//! Counting and rate-limited logging of rejected input.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::payload::{RejectReason, Rejection};
use crate::metrics::SharedRegistry;

/// How often one rejection reason is logged at WARN; repeats in between are counted and
/// reported with the next line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Counts rejections by reason and logs them at WARN, at most once per reason per interval.
pub struct RejectLog {
    rejected: Family<ReasonLabel, Counter>,
    last_logged: Mutex<HashMap<RejectReason, (Instant, u64)>>,
}

impl RejectLog {
    pub fn new(registry: &SharedRegistry) -> Self {
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(|r| {
            r.register(
                "ingest_rejected",
                "Messages and values rejected, by reason",
                rejected.clone(),
            );
        });
        Self {
            rejected,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a rejection and logs it unless the same reason was logged recently.
    pub fn reject(&self, source: &str, subject: &str, rejection: &Rejection) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: rejection.reason.as_str().to_owned(),
            })
            .inc();

        let now = Instant::now();
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = last
            .entry(rejection.reason)
            .or_insert((now - LOG_INTERVAL, 0));
        if now.duration_since(entry.0) < LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1;
        *entry = (now, 0);
        drop(last);
        tracing::warn!(
            source,
            subject,
            reason = rejection.reason.as_str(),
            suppressed_since_last_log = suppressed,
            "rejected input: {}",
            rejection.message
        );
    }

    /// Returns how many rejections of `reason` were counted.
    pub fn count(&self, reason: RejectReason) -> u64 {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .get()
    }
}
