//! Test support.
pub mod audit;
pub mod engine;
pub mod ops;
pub mod schema_support;
pub mod stand_in;
