//! Test support.
pub mod schema_support;
