//! The Prometheus registry that every stage registers its own metrics in.
//!
//! Each stage owns a small metrics struct built with `new(&mut Registry)`, so stages do not
//! share one large type. `/metrics` encodes the whole registry in the text format.

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;

/// The server's registry, shared by the stages that register metrics and by `/metrics`.
#[derive(Clone, Default)]
pub struct SharedRegistry(Arc<Mutex<Registry>>);

impl SharedRegistry {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Registry::with_prefix("stonelion"))))
    }

    /// Runs `register` with the registry locked.
    pub fn register<T>(&self, register: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        register(&mut registry)
    }

    /// Encodes every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let registry = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
