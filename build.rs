// `sqlx::migrate!` embeds `migrations/` at compile time; this makes a changed or added
// migration rebuild the crate (stable Rust cannot track those files from the macro itself).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
