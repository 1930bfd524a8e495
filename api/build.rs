// `sqlx::migrate!` embeds the migration files at compile time, but on stable Rust it cannot tell
// cargo to watch their directory: without this, a new migration is silently left out of a
// binary built from a warm target directory (it happened: 0005 was missing from a release
// build and from the tests until this file existed). What `sqlx migrate build-script` writes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
