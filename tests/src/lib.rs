//! Test support.
pub mod schema_support;
pub mod engine;
