//! Rebuilds this crate when a migration is added: `sqlx::migrate!` embeds `migrations/` but
//! on stable Rust only tracks the files it read, so a new file would go unnoticed.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
