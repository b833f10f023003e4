pub mod engine;
pub mod spec;
